"""CUDA kernels: ATen's fused CUDA GroupNorm kernels on the per-sample view.

ATen's CUDA GroupNorm has no channels_last kernel: it makes the input contiguous and
returns contiguous output, and so do these. Half/bfloat16 inputs run in fp32, because
ATen's CUDA kernels read params and statistics in the input dtype, while this package
keeps fp32 statistics.
"""


from . import aten_kernels as k
from .checks import (
    acc_dtype,
    check_group_norm,
    grad_param_dtype,
)
from .layout import output_memory_format
from .library import lib


def _up(t):
    return t if t is None or t.dtype == acc_dtype(t.dtype) else t.float()


def group_norm_cuda(input, num_groups, weight=None, bias=None, eps=1e-5):
    check_group_norm(input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return k.empty_forward(input, num_groups, output_memory_format(input))
    out, mean, rstd = k.forward(_up(input).contiguous(), num_groups, _up(weight), _up(bias), eps)
    return out.to(input.dtype), mean, rstd


def backward_cuda(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """The backward kernel without validation or placeholders (see cpu.backward_cpu)."""
    if input.numel() == 0:
        return k.empty_backward(input, weight, output_mask, output_memory_format(input))
    gi, gw, gb = k.backward(
        _up(grad_out), _up(input).contiguous(), mean, rstd, _up(weight), num_groups, output_mask
    )
    dtype = grad_param_dtype(input, weight)
    return tuple(None if g is None else g.to(t) for g, t in ((gi, input.dtype), (gw, dtype), (gb, dtype)))


group_norm_backward_cuda = k.backward_op_kernel(backward_cuda)

lib.impl("group_norm", group_norm_cuda, "CUDA")
lib.impl("group_norm_backward", group_norm_backward_cuda, "CUDA")
