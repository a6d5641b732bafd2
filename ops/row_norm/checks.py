"""Input validation of the row norms, ``persample::layer_norm`` and ``persample::rms_norm``
(and their backward ops), shared by their kernels, fake impls and decompositions, so
that a bad call fails with the same message in eager, under fake tensors and compiled
(read ops/shared/checks.py, whose helpers these use).

The batch-first contract: dim 0 of the input is the sample dim N; the trailing
``len(normalized_shape)`` dims are normalised, row by row; every dim in between (a
sequence, say) is summed over in the per-sample parameter gradients. So the input needs
at least one dim more than ``normalized_shape``.
"""

import math

import torch

from ..shared.checks import REDUCED, _check, _shape, _v, acc_dtype, check_param_placement


def stats_shape(input, normalized_shape):
    """Shape of the saved statistics, as ATen's: the input's, with the normalised dims 1."""
    k = len(normalized_shape)
    return (*input.shape[: input.dim() - k], *(1,) * k)


def _prefix(op):
    return f"persample.{op}"


def check_input(op, input, normalized_shape):
    k = len(normalized_shape)
    _check(
        k >= 1,
        lambda: f"{_prefix(op)}: normalized_shape must name at least one dim, got {list(normalized_shape)}",
    )
    _check(
        input.dim() >= k + 1,
        lambda: f"{_prefix(op)}: expected input of shape [N, *, *normalized_shape] with a sample "
        f"dim 0 outside the normalised dims (rank >= {k + 1}), got shape {_shape(input)} "
        f"for normalized_shape={list(normalized_shape)}",
    )
    _check(
        input.dtype.is_floating_point,
        lambda: f"{_prefix(op)}: expected a floating-point input, got {input.dtype}",
    )
    trailing = input.shape[input.dim() - k :]
    _check(
        all(a == b for a, b in zip(trailing, normalized_shape)),
        lambda: f"{_prefix(op)}: input shape {_shape(input)} does not end with "
        f"normalized_shape={list(normalized_shape)}",
    )


def _check_param(op, name, p, input, normalized_shape):
    if p is None:
        return
    ns = tuple(normalized_shape)
    k = len(ns)
    _check(
        p.dim() in (k, k + 1),
        lambda: f"{_prefix(op)}: {name} must be Tensor{list(ns)} (shared) or "
        f"Tensor[N, {', '.join(map(str, ns))}] (per-sample), got a tensor of shape {_shape(p)}",
    )
    check_param_placement(_prefix(op), name, p, input)
    trailing = p.shape[p.dim() - k :]
    _check(
        all(a == b for a, b in zip(trailing, ns)),
        lambda: f"{_prefix(op)}: {name} of shape {_shape(p)} does not end with "
        f"normalized_shape={list(ns)}",
    )
    if p.dim() == k + 1:
        _check(
            p.shape[0] == input.shape[0],
            lambda: f"{_prefix(op)}: per-sample {name} has N={_v(p.shape[0])} rows but input "
            f"has batch size N={_v(input.shape[0])}",
        )


def _fast_ok(input, normalized_shape, params):
    """Every check at once with plain comparisons, for a valid call with concrete sizes
    (the detailed checks cost ~1 us each); anything else takes the detailed checks."""
    shape = input.shape
    k = len(normalized_shape)
    if not input.dtype.is_floating_point or k == 0 or len(shape) <= k:
        return False
    ns = tuple(normalized_shape)
    if type(shape[0]) is not int or tuple(shape[len(shape) - k :]) != ns:
        return False
    for p in params:
        if p is None:
            continue
        if p.device != input.device or (
            p.dtype != input.dtype and (p.dtype != torch.float32 or input.dtype not in REDUCED)
        ):
            return False
        ps = tuple(p.shape)
        if ps != ns and ps != (shape[0], *ns):
            return False
    return True


def _check_eps(op, eps):
    _check(eps is None or eps >= 0, lambda: f"{_prefix(op)}: eps must be >= 0, got {eps}")


def check_row_norm(op, input, normalized_shape, weight, bias, eps):
    """The forward op's checks (``bias`` None for rms_norm)."""
    if (eps is None or eps >= 0) and _fast_ok(input, normalized_shape, (weight, bias)):
        return
    check_input(op, input, normalized_shape)
    _check_eps(op, eps)
    _check_param(op, "weight", weight, input, normalized_shape)
    _check_param(op, "bias", bias, input, normalized_shape)


def check_row_norm_backward(op, grad_out, input, normalized_shape, stats, weight, output_mask, eps):
    """The backward op's checks; ``stats`` is ``{"mean": t, "rstd": t}`` (rstd alone for
    rms_norm)."""
    name = f"{op}_backward"
    # The schema's bool[3] / bool[2] does not hold a Python list to its length.
    grads = ("grad_input", "grad_weight") + (("grad_bias",) if "mean" in stats else ())
    _check(
        len(output_mask) == len(grads),
        lambda: f"{_prefix(name)}: output_mask must have {len(grads)} entries "
        f"({', '.join(grads)}), got {len(output_mask)}",
    )
    want = stats_shape(input, normalized_shape) if input.dim() > len(normalized_shape) else None
    acc = acc_dtype(input.dtype)
    if (eps is None or eps >= 0) and _fast_ok(input, normalized_shape, (weight,)):
        if (
            grad_out.shape == input.shape
            and grad_out.dtype == input.dtype
            and grad_out.device == input.device
            and all(
                t.shape == want and t.dtype == acc and t.device == input.device
                for t in stats.values()
            )
        ):
            return
    check_input(name, input, normalized_shape)
    _check_eps(name, eps)
    _check(
        grad_out.shape == input.shape,
        lambda: f"{_prefix(name)}: grad_out shape {_shape(grad_out)} does not match input "
        f"shape {_shape(input)}",
    )
    _check(
        grad_out.dtype == input.dtype and grad_out.device == input.device,
        lambda: f"{_prefix(name)}: grad_out ({grad_out.dtype}, {grad_out.device}) must match "
        f"input ({input.dtype}, {input.device})",
    )
    for key, t in stats.items():
        _check(
            t.dim() == len(want) and all(a == b for a, b in zip(t.shape, want)),
            lambda: f"{_prefix(name)}: {key} must have shape {[_v(s) for s in want]}, got {_shape(t)}",
        )
        _check(
            t.dtype == acc and t.device == input.device,
            lambda: f"{_prefix(name)}: {key} must be {acc} on {input.device}, got {t.dtype} on {t.device}",
        )
    _check_param(name, "weight", weight, input, normalized_shape)


def rows(input, normalized_shape):
    """``(N, M, D)``: samples, rows per sample, elements per row; sizes, not -1, so that a
    view of an empty batch is not ambiguous."""
    n = input.shape[0]
    d = math.prod(normalized_shape)
    m = math.prod(input.shape[1 : input.dim() - len(normalized_shape)])
    return n, m, d


def rms_eps(eps, input_dtype):
    """RMSNorm's eps when None: the accumulation dtype's machine epsilon, as
    ``aten::_fused_rms_norm`` takes it (fp32's for fp16/bf16 input)."""
    return torch.finfo(acc_dtype(input_dtype)).eps if eps is None else eps
