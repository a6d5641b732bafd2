"""Memory layouts: the one rule by which every kernel decides the layout of a tensor.

A tensor with size-1 dimensions can be dense in several memory formats at once: with
C = 1, or H = W = 1, it is both contiguous and channels_last. ``is_contiguous()``,
``is_contiguous(memory_format=...)`` and ``suggest_memory_format()`` then give answers
that disagree. ATen's GroupNorm kernels pick their layout by ``suggest_memory_format()``
of the tensor they are handed. When this package decided "contiguous" and ATen read
the same memory as channels_last under the per-sample view (N*C channels in one
sample), samples were mixed and the results were silently wrong.

So every kernel decides a layout here, once, and hands on tensors whose strides are
that layout's canonical strides (a free view: the memory is the same), so that nobody
downstream can decide otherwise.
"""

import torch
from torch._prims_common import (
    make_channels_last_strides_for,
    make_contiguous_strides_for,
    suggest_memory_format,
)

CONTIGUOUS = torch.contiguous_format
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense_format(t):
    """The memory format ``t`` is dense in, contiguous first when it is dense in
    several; None when it is dense in none (sliced, permuted, expanded)."""
    if t.is_contiguous():
        return CONTIGUOUS
    fmt = CHANNELS_LAST.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt):
        return fmt
    return None


def canonical_strides(shape, fmt):
    if fmt == CONTIGUOUS:
        return make_contiguous_strides_for(shape)
    return make_channels_last_strides_for(shape)


def dense(t, fmt=None):
    """``(t', fmt)``: ``t``'s values, dense in ``fmt``, with ``fmt``'s canonical strides.

    Without ``fmt``, the format is :func:`dense_format`'s, and a tensor dense in none is
    first copied to the format ``suggest_memory_format`` picks (ATen's own rule for
    such inputs). Pass ``fmt`` to match another tensor, e.g. grad_out to the input.
    """
    if fmt is None:
        fmt = dense_format(t)
        if fmt is None:
            t = t.contiguous(memory_format=suggest_memory_format(t))
            fmt = dense_format(t)
    elif not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    if 1 not in t.shape:  # then dense strides are the canonical ones
        return t, fmt
    strides = canonical_strides(t.shape, fmt)
    return (t if t.stride() == strides else t.as_strided(t.shape, strides)), fmt


def output_memory_format(input):
    """Memory format of the output and of grad_input, on every device: the one
    ``nn.GroupNorm`` gives on CPU, ``suggest_memory_format(input)``, by which stock
    GroupNorm copies its input, even for an input dense in another format (strides of
    size-1 dims can make one so). Only the strides of dimensions of size > 1 are
    significant.

    Stock CUDA GroupNorm returns contiguous output for channels_last input
    (pytorch/pytorch#111824); this package keeps the input's format there too, so that
    a channels_last network does not convert its activations at every GroupNorm (and
    back at the next conv). Upstream moves the same way (pytorch/pytorch#191945).
    """
    if input.dim() < 4:
        return CONTIGUOUS
    return suggest_memory_format(input)


def in_format(t, fmt):
    """``t`` dense in ``fmt``: a copy only where its layout differs."""
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)
