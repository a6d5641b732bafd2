"""CPU kernels of the public ops: the C++ library's fused kernels where it is loaded,
else ATen's kernels on the per-sample view and centred ATen-op formulas
(ops/group_norm/aten_kernels.py)."""

from . import aten_kernels as k
from . import eager
from .checks import check_group_norm
from .layout import CONTIGUOUS, dense, in_format, output_memory_format
from ..library import lib


def group_norm_cpu(input, num_groups, weight=None, bias=None, eps=1e-5):
    check_group_norm(input, num_groups, weight, bias, eps)
    fmt = output_memory_format(input)
    if input.numel() == 0:
        return k.empty_forward(input, num_groups, fmt)
    input, _ = dense(input)
    fused = eager.cpu_forward(input, weight, bias)
    out, mean, rstd = (fused or k.forward)(input, num_groups, weight, bias, eps)
    return in_format(out, fmt), mean, rstd


def backward_cpu(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """The backward kernel without validation or placeholders, for callers whose
    arguments autograd has already matched (a masked-out gradient is None)."""
    fmt = output_memory_format(input)
    if input.numel() == 0:
        return k.empty_backward(input, weight, output_mask, fmt)
    # One layout for both, decided once (read ops/group_norm/layout.py).
    input, dense_fmt = dense(input)
    grad_out, _ = dense(grad_out, dense_fmt)
    fused = eager.cpu_backward(input, weight)
    if fused is not None:
        gi, gw, gb = fused(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    elif dense_fmt == CONTIGUOUS:
        gi, gw, gb = k.backward(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    else:
        gi, gw, gb = k.backward_centred(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    return (None if gi is None else in_format(gi, fmt)), gw, gb


group_norm_backward_cpu = k.backward_op_kernel(backward_cpu)

lib.impl("group_norm", group_norm_cpu, "CPU")
lib.impl("group_norm_backward", group_norm_backward_cpu, "CPU")
