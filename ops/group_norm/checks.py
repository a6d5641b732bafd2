"""Input validation of ``persample::group_norm`` and its backward, shared by the real
kernels and the fake implementations (the helpers and dtype rules of every norm are in
ops/shared/checks.py).
"""

import torch

from ..shared.checks import REDUCED, _check, _shape, _v, acc_dtype, check_param_placement


def grad_param_dtype(input, weight):
    """Dtype of the per-sample weight/bias gradients returned by the backward op: the
    accumulation dtype, fp32 for fp16/bf16 input even with fp16/bf16 parameters.

    Rounding each sample's row to bf16 before autograd sums the rows for a shared
    ``[C]`` parameter made that sum less accurate than stock GroupNorm's, which sums
    in fp32 and rounds once (measured: worse than twice stock's error in 1 of 5
    random bf16 cases). Autograd rounds to the parameter's dtype after the sum.
    """
    del weight  # its dtype is the input's, or fp32 (checked), so never wider
    return acc_dtype(input.dtype)


def _check_param(name, p, input):
    if p is None:
        return
    n, c = input.shape[0], input.shape[1]
    _check(
        p.dim() in (1, 2),
        lambda: f"persample.group_norm: {name} must be Tensor[C] (shared) or Tensor[N, C] "
        f"(per-sample), got a tensor of shape {_shape(p)}",
    )
    check_param_placement("persample.group_norm", name, p, input)
    _check(
        p.shape[-1] == c,
        lambda: f"persample.group_norm: {name} has {_v(p.shape[-1])} channels but input has "
        f"C={_v(c)} (input shape {_shape(input)})",
    )
    if p.dim() == 2:
        _check(
            p.shape[0] == n,
            lambda: f"persample.group_norm: per-sample {name} has N={_v(p.shape[0])} rows but "
            f"input has batch size N={_v(n)}",
        )


def check_input(input, num_groups):
    _check(
        input.dim() >= 2,
        lambda: f"persample.group_norm: expected input of shape [N, C, *] (rank >= 2), "
        f"got shape {_shape(input)}",
    )
    _check(
        input.dtype.is_floating_point,
        lambda: f"persample.group_norm: expected a floating-point input, got {input.dtype}",
    )
    _check(
        num_groups > 0,
        lambda: f"persample.group_norm: num_groups must be positive, got {num_groups}",
    )
    _check(
        input.shape[1] % num_groups == 0,
        lambda: f"persample.group_norm: num_channels={_v(input.shape[1])} is not divisible "
        f"by num_groups={num_groups}",
    )


def _fast_ok(input, num_groups, params):
    """All checks at once, with plain comparisons, for a valid call with concrete sizes.

    The detailed checks below cost ~1 us each; eager GroupNorm at small shapes is
    dominated by such overheads. Any failure, or a symbolic size, falls through to the
    detailed checks, which then raise (or defer to runtime asserts).
    """
    shape, dtype, device = input.shape, input.dtype, input.device
    if len(shape) < 2 or not dtype.is_floating_point or num_groups <= 0:
        return False
    n, c = shape[0], shape[1]
    if type(n) is not int or type(c) is not int or c % num_groups:
        return False
    for p in params:
        if p is None:
            continue
        if p.device != device or (p.dtype != dtype and (p.dtype != torch.float32 or dtype not in REDUCED)):
            return False
        ps = p.shape
        if not (tuple.__eq__(ps, (c,)) or tuple.__eq__(ps, (n, c))) or type(ps[0]) is not int:
            return False
    return True


def check_group_norm(input, num_groups, weight, bias, eps):
    if eps >= 0 and _fast_ok(input, num_groups, (weight, bias)):
        return
    check_input(input, num_groups)
    _check(eps >= 0, lambda: f"persample.group_norm: eps must be >= 0, got {eps}")
    _check_param("weight", weight, input)
    _check_param("bias", bias, input)


def check_group_norm_backward(grad_out, input, mean, rstd, weight, num_groups, eps):
    if eps >= 0 and _fast_ok(input, num_groups, (weight,)):
        stats = (input.shape[0], num_groups)
        acc = acc_dtype(input.dtype)
        if (
            tuple.__eq__(grad_out.shape, input.shape)
            and grad_out.dtype == input.dtype
            and grad_out.device == input.device
            and tuple.__eq__(mean.shape, stats)
            and tuple.__eq__(rstd.shape, stats)
            and mean.dtype == acc
            and rstd.dtype == acc
            and mean.device == input.device
            and rstd.device == input.device
        ):
            return
    check_input(input, num_groups)
    _check(eps >= 0, lambda: f"persample.group_norm_backward: eps must be >= 0, got {eps}")
    _check(
        grad_out.shape == input.shape,
        lambda: f"persample.group_norm_backward: grad_out shape {_shape(grad_out)} "
        f"does not match input shape {_shape(input)}",
    )
    _check(
        grad_out.dtype == input.dtype and grad_out.device == input.device,
        lambda: f"persample.group_norm_backward: grad_out ({grad_out.dtype}, {grad_out.device}) "
        f"must match input ({input.dtype}, {input.device})",
    )
    n = input.shape[0]
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check(
            t.dim() == 2 and t.shape[0] == n and t.shape[1] == num_groups,
            lambda: f"persample.group_norm_backward: {name} must have shape [N, num_groups]="
            f"[{_v(n)}, {num_groups}], got {_shape(t)}",
        )
        _check(
            t.dtype == acc_dtype(input.dtype) and t.device == input.device,
            lambda: f"persample.group_norm_backward: {name} must be {acc_dtype(input.dtype)} on "
            f"{input.device}, got {t.dtype} on {t.device}",
        )
    _check_param("weight", weight, input)

