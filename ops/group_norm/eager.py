"""The eager fast path of group_norm, on CPU and CUDA: ``persample::_eager_group_norm``
from the compiled library that ``setup.py`` builds out of ``ops/csrc/group_norm.cpp``
(read why there; ops/shared/backends.py loads it).

The library is optional. Without it, or with ``PERSAMPLE_DISABLE_CPP=1``, every call
takes the public op ``persample::group_norm``, whose Python kernels compute the same
results, slower in eager mode.
"""

import torch
import torch.autograd.forward_ad as fwAD

from ..shared.backends import LIBRARY
from ..shared.checks import REDUCED
from . import cuda

_op = torch.ops.persample._eager_group_norm.default if LIBRARY else None
_stats_op = torch.ops.persample._eager_group_norm_stats.default if LIBRARY else None
_cpu_backward = torch.ops.persample._cpu_group_norm_backward.default if LIBRARY else None
_cpu_forward = torch.ops.persample._cpu_group_norm_forward.default if LIBRARY else None
_FUSED_DTYPES = (torch.float32, torch.float64)

TRITON_MIN_NUMEL = 1 << 24
"""fp32 CUDA inputs of at least this many elements skip the C++ path for the public op,
whose CUDA kernels are Triton's (ops/group_norm/cuda.py). On CUDA the C++ path runs ATen's
kernels (about 8 passes over memory, against the Triton kernels' 5) with less host
time (README, H200: 0.95x plain's 0.40 ms at 64x64x32x32, the Python path 1.40x), so
it wins while a step is host-bound. PROVISIONAL, chosen without a GPU: 2^24 elements
(64 MB in fp32) keeps every host-bound benchmark shape (at most 4.2M elements) on the
C++ path and sends the kernel-bound ones (33M-67M) to Triton. ``python -m
persample.bench --device cuda --kernels`` measures the crossover; set this from it."""


def fast_op(input, stats=False):
    """The C++ op when this call on ``input`` may take it, else None; with ``stats``,
    the variant that also returns the statistics, ``(out, mean, rstd)``.

    It is for plain eager mode only; its kernel sends calls it does not handle
    (dispatch modes, subclasses, reduced precision, invalid ones) to the public op.
    What reaches or records the call before its kernel runs is checked here: dynamo, the
    JIT tracer and torch function modes, which would record the private op; torch.func
    transforms, which would run it under vmap's per-item fallback; and forward-mode AD,
    which its Function does not implement. Large fp32 CUDA inputs go to the public op
    too (``TRITON_MIN_NUMEL``).
    """
    if (
        _op is None
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
        or fwAD._current_level >= 0
        or torch._C._get_tracing_state() is not None
        or _triton_serves(input)
    ):
        return None
    return _stats_op if stats else _op


def _triton_serves(input):
    """Whether the public op's Triton kernels should take this (large fp32 CUDA) input."""
    return (
        isinstance(input, torch.Tensor)
        and input.is_cuda
        and input.dtype == torch.float32
        and input.numel() >= TRITON_MIN_NUMEL
        and cuda.triton_launch() is not None
    )


def cpu_backward(input, weight):
    """The library's backward kernel, when it handles a backward-op call on this dense
    (contiguous or channels_last) CPU input, else None. Same signature and results as
    the Python body in ops/group_norm/cpu.py, faster (read ops/csrc/group_norm.cpp)."""
    if _cpu_backward is None:
        return None
    if input.dtype in _FUSED_DTYPES and (weight is None or weight.dtype == input.dtype):
        return _cpu_backward
    return _reduced_backward if input.dtype in REDUCED else None


def cpu_forward(input, weight, bias):
    """The library's forward kernel, when it handles a forward-op call on this dense
    (contiguous or channels_last) CPU input, else None (read ops/csrc/group_norm.cpp:
    it keeps the precision that ATen's kernels lose when |mean| >> std)."""
    if _cpu_forward is None:
        return None
    if input.dtype in _FUSED_DTYPES and all(p is None or p.dtype == input.dtype for p in (weight, bias)):
        return _cpu_forward
    return _reduced_forward if input.dtype in REDUCED else None


# fp16/bf16 run the fp32 kernels on fp32 copies (the statistics and per-sample gradients
# are fp32 anyway). ATen's mixed-dtype CPU backward, the alternative, cancels when
# |mean| >> std or a group is one element: grad_input off by 64 where stock fp16 is
# off by 0, measured; the fused kernels' error stays within an fp16 rounding of stock's.
def _fp32(t):
    return None if t is None else t.to(torch.float32)


def _reduced_forward(input, num_groups, weight, bias, eps):
    out, mean, rstd = _cpu_forward(_fp32(input), num_groups, _fp32(weight), _fp32(bias), eps)
    return out.to(input.dtype), mean, rstd


def _reduced_backward(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    # mean and rstd are fp32 already (checks.acc_dtype).
    gi, gw, gb = _cpu_backward(
        _fp32(grad_out), _fp32(input), mean, rstd, _fp32(weight), num_groups, output_mask
    )
    return (None if gi is None else gi.to(input.dtype)), gw, gb
