"""CUDA kernels of group_norm and its backward: fused Triton kernels, or ATen's CUDA GroupNorm.

fp32, bf16 and fp16 inputs run the Triton kernels of ops/group_norm/triton_kernels.py (launched by
ops/group_norm/triton_launch.py), which read x once in the forward and x and dy once in the
backward where a group block fits on chip, in the input's own layout (channels_last
included, with no copy) and dtype, with fp32 statistics and no cancellation when
|mean| >> std.

They are launched from these plain CUDA kernels rather than through
``torch.library.triton_op``: under torch.compile a triton_op is decomposed into its
Triton launch even for CPU tensors, which breaks CPU compile wherever triton is
installed (BRIEF), while the op stays opaque to compile and export either way.

fp64, samples of 2**31 elements or more (the kernels' offsets are int32), and every
call when triton is not installed (or ``PERSAMPLE_DISABLE_TRITON=1``) run ATen's fused
CUDA GroupNorm kernels on the per-sample view (ops/group_norm/aten_kernels.py). ATen's CUDA
GroupNorm has no channels_last kernel, so that path computes on a contiguous copy;
half/bfloat16 inputs run in fp32 there, because ATen's CUDA kernels read params and
statistics in the input dtype, while this package keeps fp32 statistics.

Either way the output and grad_input take the input's memory format
(``layout.output_memory_format``), as on CPU. Stock CUDA GroupNorm returns contiguous
output for channels_last input (pytorch/pytorch#111824), which makes a channels_last
network convert its activations at every GroupNorm and back at the next conv.
"""

from ..library import lib
from ..shared import backends
from ..shared.backends import on_device
from . import aten_kernels as k
from .checks import acc_dtype, check_group_norm, grad_param_dtype
from .layout import in_format, output_memory_format


def triton_launch():
    """The launch module of group_norm's Triton kernels (ops/group_norm/triton_launch.py),
    or None (see ``backends.triton_module``)."""
    return backends.triton_module(backends.GROUP_NORM_TRITON)


def _triton_for(input):
    """That module when its kernels serve ``input``, else None (tests patch this to
    reach the ATen path)."""
    return backends.triton_for(input, backends.GROUP_NORM_TRITON)


def _up(t):
    return t if t is None or t.dtype == acc_dtype(t.dtype) else t.float()


def aten_forward(input, num_groups, weight, bias, eps):
    """The forward on ATen's kernels (fp64, or no triton), for a validated call."""
    out, mean, rstd = k.forward(_up(input).contiguous(), num_groups, _up(weight), _up(bias), eps)
    return in_format(out.to(input.dtype), output_memory_format(input)), mean, rstd


def aten_backward(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """The backward on ATen's kernels; masked-out gradients are None."""
    gi, gw, gb = k.backward(
        _up(grad_out), _up(input).contiguous(), mean, rstd, _up(weight), num_groups, output_mask
    )
    dtype = grad_param_dtype(input, weight)
    if gi is not None:
        gi = in_format(gi.to(input.dtype), output_memory_format(input))
    return tuple(None if g is None else g.to(t) for g, t in ((gi, input.dtype), (gw, dtype), (gb, dtype)))


def group_norm_cuda(input, num_groups, weight=None, bias=None, eps=1e-5):
    check_group_norm(input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return k.empty_forward(input, num_groups, output_memory_format(input))
    launch = _triton_for(input)
    if launch is None:
        return aten_forward(input, num_groups, weight, bias, eps)
    with on_device(input):
        return launch.forward(input, num_groups, weight, bias, eps)


def backward_cuda(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """The backward kernel without validation or placeholders (see cpu.backward_cpu)."""
    if input.numel() == 0:
        return k.empty_backward(input, weight, output_mask, output_memory_format(input))
    launch = _triton_for(input)
    if launch is None:
        return aten_backward(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    with on_device(input):
        return launch.backward(grad_out, input, mean, rstd, weight, num_groups, output_mask)


group_norm_backward_cuda = k.backward_op_kernel(backward_cuda)

lib.impl("group_norm", group_norm_cuda, "CUDA")
lib.impl("group_norm_backward", group_norm_backward_cuda, "CUDA")
