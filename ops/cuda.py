"""CUDA kernels of both ops: fused Triton kernels, or ATen's CUDA GroupNorm.

fp32, bf16 and fp16 inputs run the Triton kernels of ops/triton_kernels.py (launched by
ops/triton_launch.py), which read x once in the forward and x and dy once in the
backward where a group block fits on chip, in the input's own layout (channels_last
included, with no copy) and dtype, with fp32 statistics and no cancellation when
|mean| >> std.

They are launched from these plain CUDA kernels rather than through
``torch.library.triton_op``: under torch.compile a triton_op is decomposed into its
Triton launch even for CPU tensors, which breaks CPU compile wherever triton is
installed (BRIEF), while the op stays opaque to compile and export either way.

fp64, samples of 2**31 elements or more (the kernels' offsets are int32), and every
call when triton is not installed (or ``PERSAMPLE_DISABLE_TRITON=1``) run ATen's fused
CUDA GroupNorm kernels on the per-sample view (ops/aten_kernels.py). ATen's CUDA
GroupNorm has no channels_last kernel, so that path computes on a contiguous copy;
half/bfloat16 inputs run in fp32 there, because ATen's CUDA kernels read params and
statistics in the input dtype, while this package keeps fp32 statistics.

Either way the output and grad_input take the input's memory format
(``layout.output_memory_format``), as on CPU. Stock CUDA GroupNorm returns contiguous
output for channels_last input (pytorch/pytorch#111824), which makes a channels_last
network convert its activations at every GroupNorm and back at the next conv.
"""

import contextlib
import importlib
import os
import warnings

import torch

from . import aten_kernels as k
from .checks import acc_dtype, check_group_norm, grad_param_dtype
from .layout import in_format, output_memory_format
from .library import lib

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_modules = {}  # name -> the imported launch module, or False when it cannot be


def triton_module(name="triton_launch"):
    """A Triton launch module of this package (``triton_launch`` for group_norm,
    ``triton_row_norm`` for the row norms), imported on first use, or None when triton
    is not installed or ``PERSAMPLE_DISABLE_TRITON=1``."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = False
        if os.environ.get("PERSAMPLE_DISABLE_TRITON") != "1":
            try:
                module = _modules[name] = importlib.import_module("." + name, __package__)
            except ImportError as e:
                warnings.warn(
                    f"persample: triton is not available ({e}); CUDA norms run ATen's "
                    "kernels, which make more passes over memory (pip install triton)",
                    stacklevel=3,
                )
    return module or None


def triton_launch():
    """The group_norm launch module (ops/triton_launch.py), or None (see triton_module)."""
    return triton_module("triton_launch")


def triton_for(input, name="triton_launch"):
    """The launch module ``name`` when its Triton kernels serve this input, else None:
    CUDA tensors, and CPU tensors when triton interprets the kernels (tests)."""
    if input.dtype not in TRITON_DTYPES:
        return None
    if input.is_cuda:
        launch = triton_module(name)
        return launch if launch is not None and launch.fits(input) else None
    if name not in _modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None  # no interpreter: not worth importing triton to learn that
    launch = triton_module(name)
    return launch if launch is not None and launch.INTERPRETED and launch.fits(input) else None


_triton_for = triton_for


def _on_device(t):
    """Triton launches on the current device; make it ``t``'s (asked only where there
    are several: ``current_device()`` costs a step's host time)."""
    if t.is_cuda and torch.cuda.device_count() > 1 and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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
    with _on_device(input):
        return launch.forward(input, num_groups, weight, bias, eps)


def backward_cuda(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """The backward kernel without validation or placeholders (see cpu.backward_cpu)."""
    if input.numel() == 0:
        return k.empty_backward(input, weight, output_mask, output_memory_format(input))
    launch = _triton_for(input)
    if launch is None:
        return aten_backward(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    with _on_device(input):
        return launch.backward(grad_out, input, mean, rstd, weight, num_groups, output_mask)


group_norm_backward_cuda = k.backward_op_kernel(backward_cuda)

lib.impl("group_norm", group_norm_cuda, "CUDA")
lib.impl("group_norm_backward", group_norm_backward_cuda, "CUDA")
