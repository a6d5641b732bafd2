"""Kernels of the row norms, ``persample::layer_norm`` and ``persample::rms_norm``, on
CPU and CUDA.

A row norm normalises each row of D = prod(normalized_shape) elements on its own. Seen
as ``[N, M, D]`` (N samples, M rows per sample: every dim between the sample dim and
the normalised ones), the per-sample gradient of a parameter is a sum over the M rows of
one sample, ``[N, D]``, where the stock layers sum over all N*M rows.

Three implementations share one contract (``forward``/``backward`` below, on the
``[N, M, D]`` view): the C++ library's fused CPU kernels (ops/csrc/row_norm*, via
ops/row_norm/cpu.py), the Triton kernels on CUDA (ops/row_norm/triton_launch.py), and the ATen-op
formulas here, which serve every call the other two do not (no library, no triton,
fp64 on CUDA). Inputs that are not contiguous are copied, and the output and grad_input
are contiguous, as ``aten::native_layer_norm`` gives them.
"""

import torch

from ..library import lib
from ..shared import backends
from ..shared.checks import acc_dtype
from . import cpu
from .checks import check_row_norm, check_row_norm_backward, rms_eps, rows, stats_shape

_native_layer_norm = torch.ops.aten.native_layer_norm.default
_fused_rms_norm = torch.ops.aten._fused_rms_norm.default


def _rows(p, dtype):
    """A ``[D]`` or per-sample ``[N, D]`` parameter, to broadcast against ``[N, M, D]``."""
    p = p if p.dtype == dtype else p.to(dtype)
    return p if p.dim() == 1 else p.unsqueeze(1)


def aten_forward(x3, weight, bias, rms, eps):
    """``(y, mean or None, rstd)`` of ``[N, M, D]`` input, as ATen ops (the contract of
    the fused kernels). ATen's fused kernels where the parameters are shared and the
    statistics keep the input's dtype; elementwise ops for per-sample parameters."""
    dtype = acc_dtype(x3.dtype)
    shared = all(p is None or (p.dim() == 1 and p.dtype == dtype) for p in (weight, bias))
    if dtype == x3.dtype and shared:
        d = x3.shape[-1]
        if rms:
            y, rstd = _fused_rms_norm(x3, [d], weight, eps)
            return y, None, rstd.squeeze(-1)
        y, mean, rstd = _native_layer_norm(x3, [d], weight, bias, eps)
        return y, mean.squeeze(-1), rstd.squeeze(-1)
    x = x3.to(dtype)
    if rms:
        mean = None
        rstd = torch.rsqrt(x.square().mean(-1) + eps)
        y = x * rstd.unsqueeze(-1)
    else:
        var, mean = torch.var_mean(x, -1, correction=0)
        rstd = torch.rsqrt(var + eps)
        y = (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * _rows(weight, dtype)
    if bias is not None:
        y = y + _rows(bias, dtype)
    return y.to(x3.dtype), mean, rstd


def aten_backward(dy3, x3, mean, rstd, weight, rms, output_mask):
    """``(grad_input, grad_weight [N, D], grad_bias [N, D])`` as ATen ops, None where
    ``output_mask`` says so. Centred: ``dy * (x - mean)``, never ``dy * x - mean * dy``."""
    dtype = acc_dtype(x3.dtype)
    x, dy, r = x3.to(dtype), dy3.to(dtype), rstd.unsqueeze(-1)
    x_hat = x * r if rms else (x - mean.unsqueeze(-1)) * r
    gi = gw = gb = None
    if output_mask[0]:
        g = dy if weight is None else dy * _rows(weight, dtype)
        gi = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
        if not rms:
            gi = gi - g.mean(-1, keepdim=True)
        gi = (gi * r).to(x3.dtype)
    if output_mask[1]:
        gw = (dy * x_hat).sum(1)
    if output_mask[2]:
        gb = dy.sum(1)
    return gi, gw, gb


def _implementation(x3, weight, bias, backward):
    """The forward (or backward) of the fused kernels that serve this call, else ATen's."""
    if x3.is_cpu:
        pick = cpu.backward_kernel(x3, weight) if backward else cpu.forward_kernel(x3, weight, bias)
        if pick is not None:
            return pick
    launch = backends.triton_for(x3, backends.ROW_NORM_TRITON)
    if launch is not None:
        return launch.backward if backward else launch.forward
    return aten_backward if backward else aten_forward


def _flat(p, normalized_shape, n, d):
    """A ``[*normalized_shape]`` or ``[N, *normalized_shape]`` parameter as ``[D]`` or
    ``[N, D]`` with a unit inner stride (rows may stay expanded, stride 0)."""
    if p is None:
        return None
    p = p.reshape(d) if p.dim() == len(normalized_shape) else p.reshape(n, d)
    return p if p.stride(-1) == 1 else p.contiguous()


def forward(input, normalized_shape, weight, bias, eps, rms):
    """The forward op's work for a validated call: ``(out, mean or None, rstd)`` with
    the statistics in ATen's shape (``stats_shape``)."""
    n, m, d = rows(input, normalized_shape)
    shape = stats_shape(input, normalized_shape)
    if input.numel() == 0:
        # The statistics of an empty row are zeros here, as for group_norm.
        stats = input.new_zeros(shape, dtype=acc_dtype(input.dtype))
        return torch.empty_like(input, memory_format=torch.contiguous_format), stats, stats.clone()
    x3 = input.contiguous().view(n, m, d)
    w, b = _flat(weight, normalized_shape, n, d), _flat(bias, normalized_shape, n, d)
    with backends.on_device(input):
        y, mean, rstd = _implementation(x3, w, b, backward=False)(x3, w, b, rms, eps)
    return y.view(input.shape), (None if mean is None else mean.view(shape)), rstd.view(shape)


def backward(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, rms):
    """The backward op's work for a validated call, without placeholders: masked-out
    gradients are None; parameter gradients are ``[N, *normalized_shape]``."""
    n, m, d = rows(input, normalized_shape)
    per_sample = (n, *normalized_shape)
    dtype = acc_dtype(input.dtype)
    mask = (*output_mask, False) if rms else tuple(output_mask)
    if input.numel() == 0:
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0] else None,
            input.new_zeros(per_sample, dtype=dtype) if mask[1] else None,
            input.new_zeros(per_sample, dtype=dtype) if mask[2] else None,
        )
    x3 = input.contiguous().view(n, m, d)
    dy3 = grad_out.contiguous().view(n, m, d)
    mean3 = None if rms else mean.reshape(n, m)
    rstd3 = rstd.reshape(n, m)
    w = _flat(weight, normalized_shape, n, d)
    with backends.on_device(input):
        gi, gw, gb = _implementation(x3, w, None, backward=True)(dy3, x3, mean3, rstd3, w, rms, mask)
    return (
        None if gi is None else gi.view(input.shape),
        None if gw is None else gw.view(per_sample),
        None if gb is None else gb.view(per_sample),
    )


def _placeholder(g, like, dtype=None):
    # The schemas return Tensor, not Tensor?: a masked-out gradient is an empty tensor.
    return like.new_empty((0,), dtype=dtype) if g is None else g


# The public ops' kernels (every device: the implementation is picked per call).


def layer_norm_kernel(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    check_row_norm("layer_norm", input, normalized_shape, weight, bias, eps)
    return forward(input, normalized_shape, weight, bias, eps, rms=False)


def layer_norm_backward_body(grad_out, input, normalized_shape, mean, rstd, weight, output_mask):
    return backward(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, rms=False)


def layer_norm_backward_kernel(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, eps=1e-5):
    check_row_norm_backward(
        "layer_norm", grad_out, input, normalized_shape, {"mean": mean, "rstd": rstd}, weight, output_mask, eps
    )
    gi, gw, gb = layer_norm_backward_body(grad_out, input, normalized_shape, mean, rstd, weight, output_mask)
    dtype = acc_dtype(input.dtype)
    return _placeholder(gi, input), _placeholder(gw, input, dtype), _placeholder(gb, input, dtype)


def rms_norm_kernel(input, normalized_shape, weight=None, eps=None):
    check_row_norm("rms_norm", input, normalized_shape, weight, None, eps)
    out, _, rstd = forward(input, normalized_shape, weight, None, rms_eps(eps, input.dtype), rms=True)
    return out, rstd


def rms_norm_backward_body(grad_out, input, normalized_shape, rstd, weight, output_mask):
    gi, gw, _ = backward(grad_out, input, normalized_shape, None, rstd, weight, output_mask, rms=True)
    return gi, gw


def rms_norm_backward_kernel(grad_out, input, normalized_shape, rstd, weight, output_mask, eps=None):
    check_row_norm_backward("rms_norm", grad_out, input, normalized_shape, {"rstd": rstd}, weight, output_mask, eps)
    gi, gw = rms_norm_backward_body(grad_out, input, normalized_shape, rstd, weight, output_mask)
    return _placeholder(gi, input), _placeholder(gw, input, acc_dtype(input.dtype))


for _device in ("CPU", "CUDA"):
    lib.impl("layer_norm", layer_norm_kernel, _device)
    lib.impl("layer_norm_backward", layer_norm_backward_kernel, _device)
    lib.impl("rms_norm", rms_norm_kernel, _device)
    lib.impl("rms_norm_backward", rms_norm_backward_kernel, _device)
