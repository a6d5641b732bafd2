"""The persample ops as ATen ops, for exported graphs that run outside PyTorch.

The ops stay opaque to ``torch.export`` (and to a default ``ep.run_decompositions()``),
so that an exported program keeps the fast kernels. Two consumers need ATen instead:

- **ONNX.** The exporter has no translation for a custom op. While
  ``torch.onnx.is_in_onnx_export()`` holds, the ops decompose into the functions below
  when the exporter traces the program under functionalization, and the exporter
  translates the ATen ops they emit. The hook is a ``torch.library.register_torch_dispatch``
  rule for ``FunctionalTensorMode``: the one torch's own ``torch.library.triton_op`` uses
  to decompose under functionalization only when it should. Every other trace (compile,
  export, AOTInductor) calls the mode's own dispatch, so its graphs keep the ops.
- **Core ATen** (ExecuTorch's ``to_edge``, ...): ``ep.run_decompositions(
  core_aten_decompositions())`` lowers both ops, forward and backward (a joint graph
  from ``torch.export.experimental._export_forward_backward`` included).

Why not the usual global decomposition (``torch._decomp.register_decomposition``),
which the ONNX exporter would pick up too: inductor then refuses to fall back to the op
whenever the ``CI`` environment variable is set ("make_fallback(...): a decomposition
exists, we should switch to it", pytorch/pytorch#171863), so every compiled persample
model would fail in CI, and FakeTensorMode runs a global decomposition instead of the
op's fake implementation whenever sizes are symbolic. A CompositeImplicitAutograd kernel
would decompose the ops in every compiled and exported graph.
"""

import math
import sys

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .ops.group_norm.aten_kernels import empty_forward
from .ops.group_norm.checks import check_group_norm, check_group_norm_backward, grad_param_dtype
from .ops.group_norm.layout import output_memory_format
from .ops.library import (
    group_norm_backward_op,
    group_norm_op,
    layer_norm_backward_op,
    layer_norm_op,
    rms_norm_backward_op,
    rms_norm_op,
)
from .ops.row_norm.checks import check_row_norm, check_row_norm_backward, rms_eps, rows, stats_shape
from .ops.shared.checks import acc_dtype

__all__ = [
    "DECOMPOSITIONS",
    "core_aten_decompositions",
    "group_norm_backward_decomposition",
    "group_norm_decomposition",
    "layer_norm_backward_decomposition",
    "layer_norm_decomposition",
    "rms_norm_backward_decomposition",
    "rms_norm_decomposition",
]


def _group_size(input, num_groups):
    """D*L, the elements of one (sample, group): a size, not -1, so that a reshape of an
    empty batch is not ambiguous."""
    return input.shape[1] // num_groups * math.prod(input.shape[2:])


def group_norm_decomposition(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``persample::group_norm`` as ATen ops, with the op's checks, dtypes and layout.

    Args:
        input (Tensor[N, C, *]): floating-point input of rank >= 2.
        num_groups (int): G, which divides C.
        weight (Tensor[C] or Tensor[N, C], optional): scale, shared or per-sample.
        bias (Tensor[C] or Tensor[N, C], optional): shift, shared or per-sample.
        eps (float): added to the variance, >= 0.

    Returns:
        (Tensor[N, C, *], Tensor[N, G], Tensor[N, G]): the output, in the input's dtype
        and in the memory format the op's kernels give it; the mean and the reciprocal
        standard deviation of each (sample, group), in fp32 for fp16/bf16 input, else
        in the input's dtype (zeros for an empty input, as the kernels give them).
    """
    check_group_norm(input, num_groups, weight, bias, eps)
    fmt = output_memory_format(input)
    if input.numel() == 0:
        return empty_forward(input, num_groups, fmt)
    n, c = input.shape[0], input.shape[1]
    x = input.to(acc_dtype(input.dtype)).reshape(n, num_groups, _group_size(input, num_groups))
    # Not ops/group_norm/composite.py's stats(): its var_mean is not a core ATen op, and the
    # default core ATen table has no decomposition for it.
    var = torch.var(x, 2, correction=0, keepdim=True)
    mean = x.mean(2, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    out = ((x - mean) * rstd).reshape(n, c, -1)
    # [C] and [N, C] parameters both broadcast against [N, C, L] once unsqueezed.
    if weight is not None:
        out = out * weight.to(out.dtype).unsqueeze(-1)
    if bias is not None:
        out = out + bias.to(out.dtype).unsqueeze(-1)
    out = out.reshape(input.shape).to(input.dtype).contiguous(memory_format=fmt)
    return out, mean.squeeze(2), rstd.squeeze(2)


def group_norm_backward_decomposition(
    grad_out, input, mean, rstd, weight, num_groups, output_mask, eps=1e-5
):
    """``persample::group_norm_backward`` as ATen ops, from the saved statistics.

    Like the op's kernels (and unlike ``ops/group_norm/composite.py``'s ``explicit_backward``,
    which recomputes them to differentiate them), it normalises with the given
    ``mean`` and ``rstd``; ``eps`` is only validated.

    Args:
        grad_out (Tensor[N, C, *]): gradient of the output, the input's shape and dtype.
        input (Tensor[N, C, *]): the forward's input.
        mean (Tensor[N, G]): the forward's mean (fp32 for fp16/bf16 input).
        rstd (Tensor[N, G]): the forward's reciprocal standard deviation.
        weight (Tensor[C] or Tensor[N, C], optional): the forward's scale.
        num_groups (int): G.
        output_mask (list[bool] of 3): which of (grad_input, grad_weight, grad_bias) to
            compute; a masked-out one is returned as an empty tensor.
        eps (float): the forward's eps, >= 0.

    Returns:
        (Tensor[N, C, *], Tensor[N, C], Tensor[N, C]): grad_input (input's dtype and
        the kernels' memory format) and the per-sample weight and bias gradients (one
        row per sample, in the dtype the op declares), or ``Tensor[0]`` where masked.
    """
    check_group_norm_backward(grad_out, input, mean, rstd, weight, num_groups, eps)
    n, c = input.shape[0], input.shape[1]
    dtype = acc_dtype(input.dtype)
    grouped = (n, num_groups, _group_size(input, num_groups))
    per_channel = (n, c, math.prod(input.shape[2:]))
    x = input.to(dtype).reshape(grouped)
    x_hat = (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dy = grad_out.to(dtype).reshape(grouped)
    param_dtype = grad_param_dtype(input, weight)
    # The schema returns Tensor, not Tensor?: a masked-out gradient is an empty tensor.
    gi = input.new_empty((0,)) if not output_mask[0] else None
    gw, gb = (
        None if keep else input.new_empty((0,), dtype=param_dtype) for keep in output_mask[1:]
    )
    if output_mask[0]:
        g = dy
        if weight is not None:
            g = (dy.reshape(per_channel) * weight.to(dtype).unsqueeze(-1)).reshape(dy.shape)
        gi = rstd.unsqueeze(-1) * (
            g - g.mean(2, keepdim=True) - x_hat * (g * x_hat).mean(2, keepdim=True)
        )
        fmt = output_memory_format(input)
        gi = gi.reshape(input.shape).to(input.dtype).contiguous(memory_format=fmt)
    if output_mask[1]:
        gw = (dy * x_hat).reshape(per_channel).sum(2).to(param_dtype)
    if output_mask[2]:
        gb = dy.reshape(per_channel).sum(2).to(param_dtype)
    return gi, gw, gb


def _row_view(input, normalized_shape):
    """``input`` as ``[N, M, D]`` in the accumulation dtype."""
    return input.to(acc_dtype(input.dtype)).reshape(rows(input, normalized_shape))


def _row_param(p, normalized_shape, dtype):
    """A ``[*ns]`` or ``[N, *ns]`` parameter as ``[D]`` or ``[N, 1, D]``."""
    p = p.to(dtype)
    if p.dim() == len(normalized_shape):
        return p.reshape(math.prod(normalized_shape))
    return p.reshape(p.shape[0], 1, math.prod(normalized_shape))


def _row_forward(input, normalized_shape, weight, bias, eps, rms):
    shape = stats_shape(input, normalized_shape)
    if input.numel() == 0:
        stats = input.new_zeros(shape, dtype=acc_dtype(input.dtype))
        return torch.empty_like(input, memory_format=torch.contiguous_format), stats, stats.clone()
    x = _row_view(input, normalized_shape)
    if rms:
        mean = None
        rstd = torch.rsqrt((x * x).mean(2, keepdim=True) + eps)
        out = x * rstd
    else:
        mean = x.mean(2, keepdim=True)
        rstd = torch.rsqrt(torch.var(x, 2, correction=0, keepdim=True) + eps)
        out = (x - mean) * rstd
    if weight is not None:
        out = out * _row_param(weight, normalized_shape, out.dtype)
    if bias is not None:
        out = out + _row_param(bias, normalized_shape, out.dtype)
    out = out.reshape(input.shape).to(input.dtype).contiguous()
    return out, (None if mean is None else mean.reshape(shape)), rstd.reshape(shape)


def layer_norm_decomposition(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``persample::layer_norm`` as ATen ops, with the op's checks, dtypes and layout:
    ``(out, mean, rstd)``, the statistics in ATen's shape (the input's with the
    normalised dims 1), fp32 for fp16/bf16 input."""
    check_row_norm("layer_norm", input, normalized_shape, weight, bias, eps)
    return _row_forward(input, normalized_shape, weight, bias, eps, rms=False)


def rms_norm_decomposition(input, normalized_shape, weight=None, eps=None):
    """``persample::rms_norm`` as ATen ops: ``(out, rstd)``."""
    check_row_norm("rms_norm", input, normalized_shape, weight, None, eps)
    out, _, rstd = _row_forward(input, normalized_shape, weight, None, rms_eps(eps, input.dtype), rms=True)
    return out, rstd


def _row_backward(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, rms):
    dtype = acc_dtype(input.dtype)
    n = input.shape[0]
    per_sample = (n, *normalized_shape)
    x = _row_view(input, normalized_shape)
    dy = grad_out.to(dtype).reshape(x.shape)
    r = rstd.reshape(x.shape[0], x.shape[1], 1)
    x_hat = x * r if rms else (x - mean.reshape(r.shape)) * r
    outs = []
    if output_mask[0]:
        g = dy if weight is None else dy * _row_param(weight, normalized_shape, dtype)
        gi = g - x_hat * (g * x_hat).mean(2, keepdim=True)
        if not rms:
            gi = gi - g.mean(2, keepdim=True)
        outs.append((gi * r).reshape(input.shape).to(input.dtype).contiguous())
    else:
        outs.append(input.new_empty((0,)))
    sums = ((dy * x_hat).sum(1), dy.sum(1))
    for keep, g in zip(output_mask[1:], sums):
        outs.append(g.reshape(per_sample) if keep else input.new_empty((0,), dtype=dtype))
    return tuple(outs)


def layer_norm_backward_decomposition(
    grad_out, input, normalized_shape, mean, rstd, weight, output_mask, eps=1e-5
):
    """``persample::layer_norm_backward`` as ATen ops, from the saved statistics:
    grad_input (contiguous) and the per-sample ``[N, *normalized_shape]`` weight and
    bias gradients, ``Tensor[0]`` where masked."""
    check_row_norm_backward(
        "layer_norm", grad_out, input, normalized_shape, {"mean": mean, "rstd": rstd}, weight, output_mask, eps
    )
    return _row_backward(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, rms=False)


def rms_norm_backward_decomposition(grad_out, input, normalized_shape, rstd, weight, output_mask, eps=None):
    """``persample::rms_norm_backward`` as ATen ops: grad_input and the per-sample
    weight gradient."""
    check_row_norm_backward("rms_norm", grad_out, input, normalized_shape, {"rstd": rstd}, weight, output_mask, eps)
    return _row_backward(grad_out, input, normalized_shape, None, rstd, weight, output_mask, rms=True)


DECOMPOSITIONS = {
    group_norm_op: group_norm_decomposition,
    group_norm_backward_op: group_norm_backward_decomposition,
    layer_norm_op: layer_norm_decomposition,
    layer_norm_backward_op: layer_norm_backward_decomposition,
    rms_norm_op: rms_norm_decomposition,
    rms_norm_backward_op: rms_norm_backward_decomposition,
}
"""``{op: decomposition}`` for the persample ops, to merge into a decomposition table of
one's own; :func:`core_aten_decompositions` merges it into torch's core ATen table."""


def core_aten_decompositions():
    """The table that lowers an exported program to core ATen, persample ops included.

    ``torch.export.default_decompositions()`` plus the persample ops. A default
    ``ep.run_decompositions()`` keeps the persample ops (they have no decomposition
    of their own there); pass this table to lower them too.

    Returns:
        dict: ``{OpOverload: decomposition}`` for ``ep.run_decompositions(...)``.

    Example:
        >>> ep = torch.export.export(model, (x,))
        >>> core = ep.run_decompositions(persample.export.core_aten_decompositions())
        >>> "persample" in core.graph_module.code
        False
    """
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    return table


def _exporting_onnx():
    # No import of torch.onnx for the check: if nothing imported it, nothing is exporting.
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _decompose_for_onnx(mode, op, types, args, kwargs):
    """FunctionalTensorMode's dispatch of a persample op: the ATen decomposition while an
    ONNX export runs, else the mode's own dispatch (the op stays in the graph)."""
    if not _exporting_onnx():
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return DECOMPOSITIONS[op](*args, **kwargs)


for _op in DECOMPOSITIONS:
    torch.library.register_torch_dispatch(_op, FunctionalTensorMode, _decompose_for_onnx)
