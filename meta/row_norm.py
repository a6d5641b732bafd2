"""Fake (meta) implementations of the row norms, ``persample::layer_norm`` and
``persample::rms_norm``: the kernels' checks, then outputs with the kernels' shapes,
dtypes and (contiguous) strides. No size is read as a Python int."""

import torch

from persample.ops.shared.checks import acc_dtype
from persample.ops.row_norm.checks import check_row_norm, check_row_norm_backward, stats_shape


def _contiguous_like(input):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _stats(input, normalized_shape):
    return input.new_empty(stats_shape(input, normalized_shape), dtype=acc_dtype(input.dtype))


def _grads(input, normalized_shape, output_mask):
    """grad_input and the per-sample parameter gradients, or ``Tensor[0]`` where masked."""
    dtype = acc_dtype(input.dtype)
    per_sample = (input.shape[0], *normalized_shape)
    return (
        _contiguous_like(input) if output_mask[0] else input.new_empty((0,)),
        *(input.new_empty(per_sample if keep else (0,), dtype=dtype) for keep in output_mask[1:]),
    )


@torch.library.register_fake("persample::layer_norm")
def _layer_norm_fake(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    check_row_norm("layer_norm", input, normalized_shape, weight, bias, eps)
    return _contiguous_like(input), _stats(input, normalized_shape), _stats(input, normalized_shape)


@torch.library.register_fake("persample::layer_norm_backward")
def _layer_norm_backward_fake(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, eps=1e-5):
    check_row_norm_backward(
        "layer_norm", grad_out, input, normalized_shape, {"mean": mean, "rstd": rstd}, weight, output_mask, eps
    )
    return _grads(input, normalized_shape, output_mask)


@torch.library.register_fake("persample::rms_norm")
def _rms_norm_fake(input, normalized_shape, weight=None, eps=None):
    check_row_norm("rms_norm", input, normalized_shape, weight, None, eps)
    return _contiguous_like(input), _stats(input, normalized_shape)


@torch.library.register_fake("persample::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, input, normalized_shape, rstd, weight, output_mask, eps=None):
    check_row_norm_backward("rms_norm", grad_out, input, normalized_shape, {"rstd": rstd}, weight, output_mask, eps)
    return _grads(input, normalized_shape, output_mask)
