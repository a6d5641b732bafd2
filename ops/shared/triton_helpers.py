"""What the Triton launch modules share (ops/group_norm/triton_launch.py for group_norm,
ops/row_norm/triton_launch.py for layer_norm and rms_norm): the GPU's size, the int32 offset
bound, interpreter detection, the warps-from-bytes rule and the ``jit`` that leaves
program counts unspecialised. Each launch module keeps its own tuning knobs, which
tests patch on that module.
"""

import functools
import inspect

import torch
import triton

NOMINAL_SMS = 132
"""The SM count that plans assume without a GPU (an H200's), so that the interpreter
tests reach the plans a GPU would make."""

MAX_SAMPLE_ELEMENTS = 2**31
"""Offsets within a sample are int32: larger samples take ATen's kernels (ops/shared/backends.py's triton_for)."""


@functools.lru_cache(maxsize=None)
def sm_count(device):
    if device.type != "cuda":
        return NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def fits(input):
    """Whether the kernels' int32 in-sample offsets can address ``input`` (arithmetic on
    sizes: ``input[0]`` would cost a view, ~10 us of a step's host time)."""
    return input.numel() < MAX_SAMPLE_ELEMENTS * max(1, input.shape[0] if input.dim() else 1)


def interpreted(kernel):
    """True when triton runs ``kernel`` in its interpreter (``TRITON_INTERPRET=1`` when
    its module was imported): then it takes CPU tensors, which tests use."""
    return type(kernel).__name__ == "InterpretedFunction"


def num_warps(elements, itemsize, bytes_per_thread):
    """Warps of a program whose tile holds ``elements`` of ``itemsize`` bytes (of one
    tensor), ``bytes_per_thread`` of them a thread: a power of two in [1, 16]."""
    threads = elements * itemsize // bytes_per_thread
    return min(16, max(1, triton.next_power_of_2(triton.cdiv(threads, 32))))


def jit(counts):
    """``triton.jit``, without specialising the parameters named in ``counts`` that a
    kernel has: counts that only index programs, whose divisibility tells the compiler
    nothing, so that each ``% 16`` class would only add a compilation. Sizes that
    addresses are computed from stay specialised: their ``% 16`` class is what proves
    the alignment of masked accesses, so that loads and stores vectorise."""

    def decorate(fn):
        names = [name for name in counts if name in inspect.signature(fn).parameters]
        return triton.jit(do_not_specialize=names)(fn)

    return decorate
