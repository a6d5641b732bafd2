"""Fake (meta) implementations of the persample ops.

They run the kernels' own validation, then allocate outputs with the kernels' shapes,
dtypes and strides. Nothing here reads a size as a Python int, so a dynamic batch
size stays symbolic and never recompiles.
"""

import torch

from persample.ops.group_norm.checks import check_group_norm, check_group_norm_backward, grad_param_dtype
from persample.ops.group_norm.layout import output_memory_format
from persample.ops.shared.checks import acc_dtype


@torch.library.register_fake("persample::group_norm")
def _group_norm_fake(input, num_groups, weight=None, bias=None, eps=1e-5):
    check_group_norm(input, num_groups, weight, bias, eps)
    out = torch.empty_like(input, memory_format=output_memory_format(input))
    mean = input.new_empty((input.shape[0], num_groups), dtype=acc_dtype(input.dtype))
    return out, mean, torch.empty_like(mean)


@torch.library.register_fake("persample::group_norm_backward")
def _group_norm_backward_fake(
    grad_out, input, mean, rstd, weight, num_groups, output_mask, eps=1e-5
):
    check_group_norm_backward(grad_out, input, mean, rstd, weight, num_groups, eps)
    fmt = output_memory_format(input)
    dtype = grad_param_dtype(input, weight)
    per_sample = (input.shape[0], input.shape[1])
    return (
        torch.empty_like(input, memory_format=fmt) if output_mask[0] else input.new_empty((0,)),
        input.new_empty(per_sample if output_mask[1] else (0,), dtype=dtype),
        input.new_empty(per_sample if output_mask[2] else (0,), dtype=dtype),
    )
