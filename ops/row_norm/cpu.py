"""The row norms' CPU kernels from the C++ library (ops/csrc/row_norm.cpp, fused, read
why in ops/csrc/row_norm_kernels.h), for ops/row_norm/kernels.py to pick per call.
Without the library (ops/shared/backends.py), the selectors return None and the ATen
formulas of kernels.py serve the call.
"""

import torch

from ..shared.backends import LIBRARY
from ..shared.checks import REDUCED

_forward_op = torch.ops.persample._cpu_row_norm_forward.default if LIBRARY else None
_backward_op = torch.ops.persample._cpu_row_norm_backward.default if LIBRARY else None

# The row norms (persample::layer_norm, rms_norm) on [N, M, D] inputs: the library's
# fused kernels (ops/csrc/row_norm_kernels.h, read why there). fp16/bf16 inputs compute
# in fp32 there, row by row, with the same results as the fp32 kernels on fp32 copies
# (output and grad_input rounded once; statistics and parameter gradients fp32; fp32
# parameters allowed) and without the copies' memory traffic (with copies, forward and
# backward took 1.3-1.4x stock bf16's time, measured; without, 0.5-0.75x).
_DTYPES = (torch.float32, torch.float64, *REDUCED)


def forward_kernel(input, weight, bias):
    """The library's row-norm forward kernel for a CPU call with these tensors, else
    None: a callable ``(input, weight, bias, rms, eps) -> (y, mean, rstd)`` on an
    ``[N, M, D]`` input (mean None for RMSNorm); weight and bias ``[D]`` or ``[N, D]``."""
    if _forward_op is None:
        return None
    params = [p.dtype for p in (weight, bias) if p is not None]
    allowed = (input.dtype, torch.float32) if input.dtype in REDUCED else (input.dtype,)
    if input.dtype in _DTYPES and all(p in allowed for p in params):
        return _forward
    return None


def backward_kernel(input, weight):
    """The library's row-norm backward kernel for a CPU call with these tensors, else
    None: a callable ``(grad_out, input, mean, rstd, weight, rms, output_mask) ->
    (grad_input, grad_weight, grad_bias)`` on ``[N, M, D]`` tensors, the parameter
    gradients ``[N, D]`` per sample; None where masked out (grad_bias always for RMSNorm)."""
    if _backward_op is None:
        return None
    allowed = (input.dtype, torch.float32) if input.dtype in REDUCED else (input.dtype,)
    if input.dtype in _DTYPES and (weight is None or weight.dtype in allowed):
        return _backward
    return None


def _forward(input, weight, bias, rms, eps):
    y, mean, rstd = _forward_op(input, weight, bias, rms, eps)
    return y, (None if rms else mean), rstd


def _backward(grad_out, input, mean, rstd, weight, rms, output_mask):
    mask = [output_mask[0], output_mask[1], output_mask[2] and not rms]
    # RMSNorm's mean is None and unread: any tensor stands in for it.
    gi, gw, gb = _backward_op(grad_out, input, rstd if mean is None else mean, rstd, weight, rms, mask)
    return tuple(g if wanted else None for g, wanted in zip((gi, gw, gb), mask))
