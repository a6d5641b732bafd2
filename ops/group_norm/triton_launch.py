"""Launch wrappers of the Triton kernels (ops/group_norm/triton_kernels.py): layouts, geometry,
grids. ops/group_norm/cuda.py imports this module lazily, when triton is installed.

Layouts follow ops/group_norm/layout.py. The input decides one format (``layout.dense``); the
output and grad_input are allocated as the fake implementations say
(``output_memory_format``: the input's format, on every device), which is dense in the
same format, and grad_out is made dense in it (a copy only where it lies otherwise).
So the kernels get one layout flag for all four tensors and read channels_last as it
lies.

Everything a launch needs is decided once, in :class:`Plan`, from the sizes, the
layout, the dtype and the device; the launch functions only consume it.
"""

import functools
import math

import torch
import triton

from ..shared.triton_helpers import NOMINAL_SMS, fits, interpreted, num_warps, sm_count  # noqa: F401  (fits: ops/shared/backends.py's)
from . import triton_kernels as k
from .checks import grad_param_dtype
from .layout import CONTIGUOUS, dense, output_memory_format

# Geometry knobs, set from measurements on an H200 (docs/benchmarks.md; the GPU check
# sweeps them, persample/bench/kernels.py). Tests lower them to reach every path.
REGISTER_ELEMENTS = 4096
"""Largest group block (padded elements) that one program holds in registers: then the
forward and backward read each tensor exactly once."""
CHUNK_ELEMENTS = 4096
"""Elements per chunk of a block that programs sweep (twice: statistics or sums, then
the output, which re-reads the block from L2)."""
BYTES_PER_THREAD = 64
"""Bytes of a chunk (of one tensor) per thread: four 16-byte loads. Sets the warps of a
program (ptxas gave bf16 channels_last backward chunks at 8 warps a stack frame)."""
BLOCK_ELEMENTS = 2048
"""Groups smaller than this are batched, several to a program (where G allows)."""
RUN_BYTES = 64
"""Least contiguous bytes a channels_last program reads at each position: several
groups to a program where one group's channels are narrower."""
PROGRAMS_PER_SM = 2
"""A grid of fewer group blocks than this many per SM splits each block's positions
over several programs (the split kernels), where the block spans several chunks."""
MIN_SPLIT_CHUNK = 1024
"""Least elements of a chunk that the split kernels shrink their chunks to."""
NUM_STAGES = None
"""Triton's software pipelining depth of the sweep loops (None: Triton's default)."""

INTERPRETED = interpreted(k.forward_tile)
"""True when triton runs the kernels in its interpreter (``TRITON_INTERPRET=1`` when
ops/group_norm/triton_kernels.py was imported): then they take CPU tensors, which tests use."""

_MERGE_BLOCK = 1024  # range statistics (or channel sums) a merge program reads at a time


def _pow2_factor(n):
    return n & -n


class Plan:
    """How the kernels cut an ``[N, C, L]`` problem with G groups of D = C / G channels.

    A program takes a *group block* of ``gb`` groups (``block_c = gb * block_d``
    channels; ``gb > 1`` only where D is a power of two) in chunks of ``block_c`` x
    ``block_l``, over ``c_blocks`` channel blocks where D exceeds a chunk. ``single``:
    the block is one chunk, held in registers. ``splits > 1``: each block's positions
    are cut into ranges of ``l_per`` positions, one program each (the split kernels).
    """

    def __init__(self, n, c, length, groups, channels_last, itemsize, sms=NOMINAL_SMS):
        d = c // groups
        self.d, self.length = d, length
        self.channels_last = channels_last
        d_pow2, full_l = triton.next_power_of_2(d), triton.next_power_of_2(length)
        chunk = 1 << max(0, int(CHUNK_ELEMENTS).bit_length() - 1)
        # Wide groups are cut into channel blocks; contiguous ones keep runs of at
        # least RUN_BYTES along positions, their unit-stride dim.
        run = 1 if channels_last else min(full_l, chunk, max(1, RUN_BYTES // itemsize))
        self.block_d = min(d_pow2, chunk // run)
        self.c_blocks = triton.cdiv(d, self.block_d)
        gb = 1
        if self.block_d == d:  # several groups only where a chunk holds whole groups
            while (gb * 2 <= _pow2_factor(groups) and gb * 2 * d <= chunk
                   and (gb * d * length < BLOCK_ELEMENTS
                        or (channels_last and gb * d * itemsize < RUN_BYTES))):
                gb *= 2
        self.gb = gb
        self.block_c = gb * self.block_d
        self.single = self.c_blocks == 1 and self.block_c * full_l <= REGISTER_ELEMENTS
        self.block_l = full_l if self.single else max(1, min(full_l, chunk // self.block_c))
        self.programs = n * (groups // gb)
        self.splits, self.l_per = 1, length
        target = PROGRAMS_PER_SM * sms
        if not self.single and self.programs < target:
            # Too few blocks to fill the GPU: split positions over programs, with chunks
            # small enough (down to MIN_SPLIT_CHUNK) to give every program one.
            needed = triton.cdiv(target, self.programs)
            while (triton.cdiv(length, self.block_l) < needed
                   and self.block_l > run and self.block_c * self.block_l > MIN_SPLIT_CHUNK):
                self.block_l //= 2
            l_chunks = triton.cdiv(length, self.block_l)
            if l_chunks > 1:
                self.l_per = l_chunks // min(l_chunks, needed) * self.block_l
                self.splits = triton.cdiv(length, self.l_per)
        self.num_warps = num_warps(self.block_c * self.block_l, itemsize, BYTES_PER_THREAD)

    def meta(self):
        """The constexprs and launch options that every sweep kernel takes."""
        meta = dict(D=self.d, GB=self.gb, BLOCK_D=self.block_d, BLOCK_L=self.block_l,
                    C_BLOCKS=self.c_blocks, CL=self.channels_last, num_warps=self.num_warps)
        if NUM_STAGES is not None:
            meta["num_stages"] = NUM_STAGES
        return meta

    def __repr__(self):
        kind = "single" if self.single else f"splits={self.splits}" if self.splits > 1 else "swept"
        return (f"Plan(D={self.d}, L={self.length}, gb={self.gb}, chunk={self.block_c}x"
                f"{self.block_l}, c_blocks={self.c_blocks}, {kind}, warps={self.num_warps})")


def plan_for(x, fmt, num_groups):
    """The plan of an input that ``layout.dense`` returned dense in ``fmt``."""
    knobs = (REGISTER_ELEMENTS, CHUNK_ELEMENTS, BYTES_PER_THREAD, BLOCK_ELEMENTS,
             RUN_BYTES, PROGRAMS_PER_SM)
    return _plan(x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups,
                 fmt != CONTIGUOUS, x.element_size(), sm_count(x.device), knobs)


@functools.lru_cache(maxsize=256)
def _plan(n, c, length, groups, channels_last, itemsize, sms, knobs):
    """Plans by their arguments and the knobs' values: a step's host time matters at
    small shapes, and a model asks for the same few plans at every step."""
    return Plan(n, c, length, groups, channels_last, itemsize, sms)


def _param(p, input):
    """(tensor, s_n, s_c): a shared [C] row reads with s_n = 0; absent, any pointer."""
    if p is None:
        return input, 0, 0
    if p.dim() == 1:
        return p, 0, p.stride(0)
    return p, p.stride(0), p.stride(1)


def _output(input, fmt, dtype=None):
    """(output, the kernels' view of it): allocated as the fake implementation states,
    which is dense in ``fmt`` too (formats differ only by size-1 dims' strides)."""
    out = torch.empty_like(input, dtype=dtype, memory_format=output_memory_format(input))
    view, _ = dense(out, fmt)
    if view.data_ptr() != out.data_ptr():  # a copy would take the kernels' writes
        raise AssertionError(f"persample: output {out.stride()} is not dense in {fmt}")
    return out, view


def forward(input, num_groups, weight, bias, eps):
    """``persample::group_norm`` of a non-empty fp32/bf16/fp16 input (validated).

    Returns:
        (Tensor[N, C, *], Tensor[N, G], Tensor[N, G]): output in the input dtype and
        memory format, fp32 mean and rstd.
    """
    x, fmt = dense(input)
    plan = plan_for(x, fmt, num_groups)
    n, c, length = x.shape[0], x.shape[1], plan.length
    out, y = _output(input, fmt)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    (w, w_sn, w_sc), (b, b_sn, b_sc) = _param(weight, x), _param(bias, x)
    params = (w_sn, w_sc, b_sn, b_sc)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, **plan.meta())
    ngb = num_groups // plan.gb
    if plan.splits == 1:
        k.forward_tile[(plan.programs,)](
            x, y, w, b, mean, rstd, c, length, ngb, *params, float(plan.d * length), eps,
            SINGLE=plan.single, **flags,
        )
        return out, mean, rstd
    parts = torch.empty((3, n * num_groups, plan.splits), device=x.device, dtype=torch.float32)
    k.forward_partial[(plan.programs, plan.splits)](
        x, parts[0], parts[1], parts[2], c, length, ngb, plan.splits, plan.l_per, **plan.meta(),
    )
    k.forward_merge[(n * num_groups,)](
        x, parts[0], parts[1], parts[2], mean, rstd, c, length, num_groups, plan.splits, eps,
        D=plan.d, BLOCK_S=min(triton.next_power_of_2(plan.splits), _MERGE_BLOCK),
        CL=plan.channels_last,
    )
    k.forward_normalize[(plan.programs, plan.splits)](
        x, y, w, b, mean, rstd, c, length, ngb, plan.l_per, *params, **flags,
    )
    return out, mean, rstd


def backward(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """``persample::group_norm_backward`` of a non-empty fp32/bf16/fp16 input, without
    validation or placeholders (see ops/group_norm/cpu.py's ``backward_cpu``).

    Returns:
        (Tensor[N, C, *] or None, Tensor[N, C] or None, Tensor[N, C] or None):
        grad_input in the input dtype and memory format and the per-sample weight and
        bias gradients in ``checks.grad_param_dtype``, each None where ``output_mask``
        says so.
    """
    x, fmt = dense(input)
    dy, _ = dense(grad_out, fmt)  # a copy only where grad_out lies in another layout
    plan = plan_for(x, fmt, num_groups)
    n, c, length = x.shape[0], x.shape[1], plan.length
    want_dx, want_dw, want_db = output_mask
    gi, dx = _output(input, fmt) if want_dx else (None, x)
    p_dtype = grad_param_dtype(input, weight)
    gw = torch.empty((n, c), device=x.device, dtype=p_dtype) if want_dw else None
    gb = torch.empty((n, c), device=x.device, dtype=p_dtype) if want_db else None
    dw, db = x if gw is None else gw, x if gb is None else gb  # any pointer when masked
    mean, rstd = mean.contiguous(), rstd.contiguous()
    w, w_sn, w_sc = _param(weight, x)
    count, ngb, has_w = float(plan.d * length), num_groups // plan.gb, weight is not None
    if plan.splits == 1:
        k.backward_tile[(plan.programs,)](
            dy, x, mean, rstd, w, dx, dw, db, c, length, ngb, w_sn, w_sc, count,
            SINGLE=plan.single, HAS_W=has_w, WANT_DX=want_dx, WANT_DW=want_dw,
            WANT_DB=want_db, **plan.meta(),
        )
        return gi, gw, gb
    sums = torch.empty((2, n, plan.splits, c), device=x.device, dtype=torch.float32)
    k.backward_partial[(plan.programs, plan.splits)](
        dy, x, mean, rstd, sums[0], sums[1], c, length, ngb, plan.splits, plan.l_per,
        **plan.meta(),
    )
    coef = torch.empty((n * num_groups, 2), device=x.device, dtype=torch.float32)
    merge_d = min(triton.next_power_of_2(plan.d), _MERGE_BLOCK)
    k.backward_merge[(n * num_groups,)](
        sums[0], sums[1], rstd, w, dw, db, coef, c, num_groups, plan.splits, w_sn, w_sc, count,
        D=plan.d, HAS_W=has_w, WANT_DW=want_dw, WANT_DB=want_db,
        BLOCK_S=max(1, min(triton.next_power_of_2(plan.splits), _MERGE_BLOCK * 2 // merge_d)),
        BLOCK_D=merge_d,
    )
    if want_dx:
        k.backward_grad_input[(plan.programs, plan.splits)](
            dy, x, mean, rstd, w, coef, dx, c, length, ngb, plan.l_per, w_sn, w_sc,
            HAS_W=has_w, **plan.meta(),
        )
    return gi, gw, gb
