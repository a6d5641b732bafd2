"""Launch wrappers of the row norms' Triton kernels (ops/row_norm/triton_kernels.py),
for ``persample::layer_norm`` and ``persample::rms_norm``: the glue (ops/row_norm/kernels.py)
hands them a contiguous ``[N, M, D]`` view (N samples, M rows a sample, rows of D
elements) and imports this module lazily, through ``cuda.triton_for``.

Everything a launch needs is decided once, in :class:`Plan`, from (N, M, D) and the SM
count; the launch functions only consume it. What the launchers
share with group_norm's (ops/group_norm/triton_launch.py) lives in ops/shared/triton_helpers.py.

Compiled variants: D is specialised (its ``% 16`` class: 1, a multiple of 16, or
other), M and the program counts are not. A model's layer of width D therefore
compiles, per dtype, flags (RMS, params present, the backward's output mask) and D's
class, one ``*_rows`` kernel per tile height ``BLOCK_R``, which varies only while
``M < TILE_ELEMENTS / BLOCK_D`` (at most log2 of that many heights, one at long
sequences), plus one ``param_merge``.
"""

import functools

import torch
import triton

from ..shared.checks import acc_dtype
from ..shared.triton_helpers import fits, interpreted, num_warps, sm_count  # noqa: F401  (fits: ops/shared/backends.py's)
from . import triton_kernels as k
from .checks import rms_eps

# Geometry knobs (tests change them to reach every path).
REGISTER_ELEMENTS = 2048
"""Widest row (padded to a power of two) that a program holds in registers; wider rows
are swept in chunks (the ``*_swept`` kernels), which read them twice (the second time
mostly from L2)."""
TILE_ELEMENTS = 2048
"""Elements of a register tile: narrow rows go several to a tile (``BLOCK_R`` rows)."""
CHUNK_ELEMENTS = 2048
"""Elements of a swept row's chunk."""
BYTES_PER_THREAD = 32
"""Bytes of a tile's fp32 working copy (of one tensor) per thread: 8 elements, two
16-byte loads in fp32, one in bf16. Sets the warps (up to MAX_WARPS) in every dtype.
(At 16 elements, backward tiles took 108-229 registers a thread, ptxas for sm_90.)"""
MAX_WARPS = 8
"""Warps of a program at most."""
PROGRAMS_PER_SM = 2
"""The backward cuts each sample's rows into the fewest ranges (one program each) that
give the GPU this many programs per SM; each range adds ``2 * D`` fp32 partial sums
that ``param_merge`` reduces, so ranges stay as long as the grid allows."""
MERGE_ELEMENTS = 2048
"""Elements of a ``param_merge`` tile (ranges x columns)."""

INTERPRETED = interpreted(k.forward_rows)
"""True when triton runs the kernels in its interpreter (``TRITON_INTERPRET=1`` when
ops/row_norm/triton_kernels.py was imported): then they take CPU tensors (tests)."""


class Plan:
    """How the kernels cut an ``[N, M, D]`` problem.

    ``swept``: rows wider than ``REGISTER_ELEMENTS`` go one to a program, in chunks of
    ``block_d``; otherwise a tile is ``block_r`` rows of ``block_d`` (D padded to a
    power of two). The forward runs one tile (swept: one row) a program, ``tiles``
    programs a sample. The backward runs ``ranges`` programs a sample, of ``m_per``
    rows each (a multiple of ``block_r``).
    """

    def __init__(self, n, m, d, sms):
        full_d = triton.next_power_of_2(d)
        self.swept = full_d > max(1, REGISTER_ELEMENTS)
        if self.swept:
            self.block_d = min(full_d, 1 << max(0, int(CHUNK_ELEMENTS).bit_length() - 1))
            self.block_r = 1
        else:
            self.block_d = full_d
            self.block_r = min(triton.next_power_of_2(m), max(1, TILE_ELEMENTS // full_d))
        self.tiles = triton.cdiv(m, self.block_r)
        ranges = min(self.tiles, triton.cdiv(PROGRAMS_PER_SM * sms, n))
        self.m_per = triton.cdiv(self.tiles, max(1, ranges)) * self.block_r
        self.ranges = triton.cdiv(m, self.m_per)
        self.num_warps = min(MAX_WARPS, num_warps(self.block_r * self.block_d, 4, BYTES_PER_THREAD))

    def __repr__(self):
        kind = "swept" if self.swept else f"rows={self.block_r}"
        return (f"Plan(block_d={self.block_d}, {kind}, tiles={self.tiles}, ranges={self.ranges}"
                f"x{self.m_per}, warps={self.num_warps})")


def plan_for(x3):
    knobs = (REGISTER_ELEMENTS, TILE_ELEMENTS, CHUNK_ELEMENTS, BYTES_PER_THREAD, MAX_WARPS,
             PROGRAMS_PER_SM)
    n, m, d = x3.shape
    return _plan(n, m, d, sm_count(x3.device), knobs)


@functools.lru_cache(maxsize=256)
def _plan(n, m, d, sms, knobs):
    """Plans by their arguments and the knobs' values (a step's host time matters)."""
    return Plan(n, m, d, sms)


def _param(p, input):
    """(tensor, row stride): a shared ``[D]`` row reads with stride 0; absent, any pointer."""
    if p is None:
        return input, 0
    if p.stride(-1) != 1:
        p = p.contiguous()
    return p, (p.stride(0) if p.dim() == 2 else 0)


def _or(t, other):
    """``t``, or where it is None (a masked output) any pointer: the kernel skips it."""
    return other if t is None else t


def forward(input3, weight, bias, rms, eps):
    """LayerNorm (``rms``: RMSNorm, ``bias`` None) of each row of a contiguous non-empty
    fp32/bf16/fp16 ``input3``.

    Args:
        input3 (Tensor[N, M, D]): contiguous.
        weight, bias (Tensor[D] or Tensor[N, D] or None): input dtype or fp32, unit
            inner stride (rows may be expanded, stride 0).

    Returns:
        (Tensor[N, M, D], Tensor[N, M] or None, Tensor[N, M]): output in the input dtype,
        mean (None for rms) and rstd in the accumulation dtype.
    """
    x = input3.contiguous()
    n, m, d = x.shape
    if rms:
        eps = rms_eps(eps, x.dtype)
    plan = plan_for(x)
    y = torch.empty_like(x)
    rstd = torch.empty((n, m), device=x.device, dtype=acc_dtype(x.dtype))
    mean = None if rms else torch.empty_like(rstd)
    (w, w_sn), (b, b_sn) = _param(weight, x), _param(bias, x)
    flags = dict(RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, num_warps=plan.num_warps)
    stats = (rstd if rms else mean, rstd)
    if plan.swept:
        k.forward_swept[(n * m,)](x, y, w, b, *stats, m, d, w_sn, b_sn, float(d), eps,
                                  BLOCK_D=plan.block_d, **flags)
    else:
        k.forward_rows[(n * plan.tiles,)](x, y, w, b, *stats, m, d, plan.tiles, w_sn, b_sn,
                                          float(d), eps, BLOCK_R=plan.block_r,
                                          BLOCK_D=plan.block_d, **flags)
    return y, mean, rstd


def backward(grad_out3, input3, mean, rstd, weight, rms, output_mask):
    """The backward of :func:`forward`, from its saved statistics.

    Args:
        grad_out3, input3 (Tensor[N, M, D]): input3 as the forward's.
        mean (Tensor[N, M] or None), rstd (Tensor[N, M]): the forward's.
        output_mask (3 bools): grad_input, grad_weight, grad_bias (False for rms).

    Returns:
        (Tensor[N, M, D] or None, Tensor[N, D] or None, Tensor[N, D] or None):
        grad_input in the input dtype, per-sample ``sum_m dy * xhat`` and ``sum_m dy``
        in the accumulation dtype; None where ``output_mask`` says so.
    """
    want_dx, want_dw, want_db = (bool(v) for v in output_mask)
    if not (want_dx or want_dw or want_db):
        return None, None, None
    x = input3.contiguous()
    dy = grad_out3.contiguous()
    n, m, d = x.shape
    plan = plan_for(x)
    acc = acc_dtype(x.dtype)
    gi = torch.empty_like(x) if want_dx else None
    gw = torch.empty((n, d), device=x.device, dtype=acc) if want_dw else None
    gb = torch.empty((n, d), device=x.device, dtype=acc) if want_db else None
    rstd = rstd.contiguous()
    mean = rstd if rms else mean.contiguous()
    w, w_sn = _param(weight, x)
    if plan.ranges == 1 or not (want_dw or want_db):
        p_dw, p_db = gw, gb  # one range a sample: its sums are the result
    else:
        parts = torch.empty((2, n, plan.ranges, d), device=x.device, dtype=torch.float32)
        p_dw, p_db = parts[0], parts[1]
    args = (dy, x, mean, rstd, w, _or(gi, x), _or(p_dw, x), _or(p_db, x), m, d, plan.ranges,
            plan.m_per, w_sn, float(d))
    flags = dict(RMS=rms, HAS_W=weight is not None, WANT_DX=want_dx, WANT_DW=want_dw,
                 WANT_DB=want_db, num_warps=plan.num_warps)
    if plan.swept:
        k.backward_swept[(n * plan.ranges,)](*args, BLOCK_D=plan.block_d, **flags)
    else:
        k.backward_rows[(n * plan.ranges,)](*args, BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, **flags)
    if p_dw is not gw or p_db is not gb:
        block_d = min(triton.next_power_of_2(d), 256)
        block_s = min(triton.next_power_of_2(plan.ranges), max(1, MERGE_ELEMENTS // block_d))
        k.param_merge[(n * triton.cdiv(d, block_d),)](
            _or(p_dw, x), _or(p_db, x), _or(gw, x), _or(gb, x), d, plan.ranges,
            BLOCK_S=block_s, BLOCK_D=block_d, WANT_DW=want_dw, WANT_DB=want_db,
            num_warps=num_warps(block_s * block_d, 4, BYTES_PER_THREAD),
        )
    return gi, gw, gb
