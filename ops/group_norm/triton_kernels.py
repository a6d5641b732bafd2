"""Triton kernels of the persample ops (fp32, bf16, fp16), for ops/group_norm/cuda.py.

The unit of work is a *group block*: ``GB`` consecutive groups of one sample, that is
``GB * D`` consecutive channels (D = C / G) by all L spatial positions. The kernels
read it in chunks of ``BLOCK_C = GB * BLOCK_D`` channels by ``BLOCK_L`` positions and
reduce each chunk per channel, then per group (a ``[GB, BLOCK_D]`` reshape). Several
groups per program give a channels_last program wide contiguous runs (all its
channels at each position) and a program of small groups enough work.

Tensors x, y, dy and dx share one layout (ops/group_norm/triton_launch.py makes them so), dense
with canonical strides, so an element's offset follows from (n, c, l), C and L alone:
``n*C*L + c*L + l`` (contiguous) or ``n*C*L + l*C + c`` (channels_last, ``CL``). The
unit stride is a literal, which is what lets Triton prove contiguity; the sizes it
needs divisibility facts about (C, L, the split length) are specialised (Triton's
``% 16`` classes), so masked accesses vectorise. Offsets within a sample are int32:
the launcher routes samples of 2**31 elements or more to ATen's kernels.

Kernels:
- ``*_tile``: one program per group block. With ``SINGLE`` (the block fits in one
  chunk) it holds the block in registers: the forward reads x once and writes y once,
  the backward reads x and dy once and writes dx once (the 5-pass floor). Otherwise it
  sweeps the block twice, the second sweep backwards, so that it re-reads first what it
  read last, while still in L2.
- ``*_partial``, ``*_merge``, ``forward_normalize``, ``backward_grad_input``: the split
  path, for grids with too few group blocks to fill the GPU. A block's positions are cut
  into ``S`` ranges of ``L_PER`` positions, one program each; a merge program per
  (sample, group) combines the ranges' statistics or sums.

Numerics: statistics and sums accumulate in fp32. The statistics of a swept block are
of ``x - shift`` (shift: the group's first element), per chunk by two passes over the
chunk in registers, merged by Chan's parallel formula; a register-held block gets a
mean-refinement step instead. The backward sums ``dy * (x - mean)``, never
``dy * x - mean * dy``. Nothing cancels when |mean| >> std.
"""

import triton
import triton.language as tl

from ..shared.triton_helpers import jit

_kernel = jit(("NGB", "G", "S"))
"""The counts that only index programs (NGB, G, S) stay unspecialised; C, L and L_PER
are specialised, so that masked accesses vectorise (``shared.triton_helpers.jit``)."""


# ---- tile helpers ----------------------------------------------------------------------


@triton.jit
def _offsets(n, ch, l, C, L, CL: tl.constexpr):
    """Offsets of channels ``ch`` ([BLOCK_C], absolute) at positions ``l`` ([BLOCK_L]) of
    sample n (int64)."""
    if CL:
        return n * C * L + l[None, :] * C + ch[:, None]
    else:
        return n * C * L + ch[:, None] * L + l[None, :]


@triton.jit
def _first(n, ch, C, L, CL: tl.constexpr):
    """Offsets of channels ``ch`` at position 0 of sample n."""
    if CL:
        return n * C * L + ch
    else:
        return n * C * L + ch * L


@triton.jit
def _per_group(v, GB: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[GB * BLOCK_D]`` per-channel values -> ``[GB]`` per-group sums."""
    return tl.sum(tl.reshape(v, [GB, BLOCK_D]), 1)


@triton.jit
def _to_channels(v, GB: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[GB]`` per-group values -> ``[GB * BLOCK_D]``, each repeated over its channels."""
    return tl.reshape(tl.broadcast_to(v[:, None], [GB, BLOCK_D]), [GB * BLOCK_D])


@triton.jit
def _channels(cb, D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Channels ``cb + [0, BLOCK_C)`` of the group block, relative to its first channel,
    and which of them exist. Several groups per block only where BLOCK_D == D."""
    c = cb + tl.arange(0, GB * BLOCK_D)
    return c, c < GB * D


@triton.jit
def _param(P, n, ch, cmask, s_n, s_c, other):
    """fp32 values of a ``[C]`` (s_n = 0) or ``[N, C]`` parameter at channels ``ch``."""
    return tl.load(P + n * s_n + ch * s_c, mask=cmask, other=other).to(tl.float32)


@triton.jit
def _group_stats(MEAN, RSTD, n, g0, G, GB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Saved mean and rstd of the block's groups, repeated over their channels."""
    g = n * G + g0 + tl.arange(0, GB)
    return (_to_channels(tl.load(MEAN + g), GB, BLOCK_D),
            _to_channels(tl.load(RSTD + g), GB, BLOCK_D))


@triton.jit
def _store_group_stats(MEAN, RSTD, n, g0, G, mean, rstd, GB: tl.constexpr):
    g = n * G + g0 + tl.arange(0, GB)
    tl.store(MEAN + g, mean)
    tl.store(RSTD + g, rstd)


@triton.jit
def _chunk_count(l0, L, cb, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Elements per group in the chunk at (cb, l0), as fp32."""
    return (tl.minimum(L - l0, BLOCK_L) * tl.minimum(D - cb, BLOCK_D)).to(tl.float32)


# ---- forward ---------------------------------------------------------------------------


@triton.jit
def _stats_sweep(X, n, g0, l_begin, n_chunks, C, L,
                 D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_L: tl.constexpr, C_BLOCKS: tl.constexpr, CL: tl.constexpr):
    """Per-group (count, mean of x - shift, M2, shift) over ``n_chunks`` chunks of
    positions from ``l_begin``, every channel of the block."""
    first = g0 * D + tl.arange(0, GB) * D
    shift = tl.load(X + _first(n, first, C, L, CL)).to(tl.float32)
    shift_c = _to_channels(shift, GB, BLOCK_D)[:, None]
    total = tl.zeros([GB], tl.float32)
    mean = tl.zeros([GB], tl.float32)
    m2 = tl.zeros([GB], tl.float32)
    for cbi in range(C_BLOCKS):
        c, cmask = _channels(cbi * BLOCK_D, D, GB, BLOCK_D)
        for i in range(n_chunks):
            l0 = l_begin + i * BLOCK_L
            l = l0 + tl.arange(0, BLOCK_L)
            mask = cmask[:, None] & (l < L)[None, :]
            x = tl.load(X + _offsets(n, g0 * D + c, l, C, L, CL), mask=mask, other=0.0)
            xs = tl.where(mask, x.to(tl.float32) - shift_c, 0.0)
            count = _chunk_count(l0, L, cbi * BLOCK_D, D, BLOCK_D, BLOCK_L)
            chunk_mean = _per_group(tl.sum(xs, 1), GB, BLOCK_D) / count
            dev = tl.where(mask, xs - _to_channels(chunk_mean, GB, BLOCK_D)[:, None], 0.0)
            chunk_m2 = _per_group(tl.sum(dev * dev, 1), GB, BLOCK_D)
            merged = total + count
            delta = chunk_mean - mean
            mean += delta * (count / merged)
            m2 += chunk_m2 + delta * delta * (total * count / merged)
            total = merged
    return total, mean, m2, shift


@triton.jit
def _affine(W, B, n, ch, cmask, w_sn, w_sc, b_sn, b_sc, rstd_c,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (scale, shift) of ``y = (x - mean) * scale + shift``."""
    scale = rstd_c
    if HAS_W:
        scale = scale * _param(W, n, ch, cmask, w_sn, w_sc, 0.0)
    shift = tl.zeros_like(rstd_c)
    if HAS_B:
        shift = _param(B, n, ch, cmask, b_sn, b_sc, 0.0)
    return scale, shift


@triton.jit
def _normalize_sweep(X, Y, W, B, n, g0, mean_c, rstd_c, l_begin, n_chunks, C, L,
                     w_sn, w_sc, b_sn, b_sc,
                     D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_L: tl.constexpr, C_BLOCKS: tl.constexpr, CL: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The output over the chunks, last chunk first (what was read last is in L2)."""
    for cbi in range(C_BLOCKS):
        c, cmask = _channels((C_BLOCKS - 1 - cbi) * BLOCK_D, D, GB, BLOCK_D)
        scale, shift = _affine(W, B, n, g0 * D + c, cmask, w_sn, w_sc, b_sn, b_sc, rstd_c,
                               HAS_W, HAS_B)
        for i in range(n_chunks):
            l = l_begin + (n_chunks - 1 - i) * BLOCK_L + tl.arange(0, BLOCK_L)
            mask = cmask[:, None] & (l < L)[None, :]
            offsets = _offsets(n, g0 * D + c, l, C, L, CL)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean_c[:, None]) * scale[:, None] + shift[:, None]
            tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@_kernel
def forward_tile(
    X, Y, W, B, MEAN, RSTD, C, L, NGB, w_sn, w_sc, b_sn, b_sc, count, eps,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, SINGLE: tl.constexpr, CL: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """One program per group block: statistics and output (``count`` = D * L as a
    float: a size specialised to 1 could not be cast)."""
    pid = tl.program_id(0)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    G = NGB * GB
    if SINGLE:
        c, cmask = _channels(0, D, GB, BLOCK_D)
        l = tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (l < L)[None, :]
        offsets = _offsets(n, g0 * D + c, l, C, L, CL)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = _per_group(tl.sum(x, 1), GB, BLOCK_D) / count
        # x - mean is exact where |x - mean| << |mean|: this step recovers what the
        # rounding of the first sum lost, which grows with |mean| * log2(count).
        xc = tl.where(mask, x - _to_channels(mean, GB, BLOCK_D)[:, None], 0.0)
        mean += _per_group(tl.sum(xc, 1), GB, BLOCK_D) / count
        mean_c = _to_channels(mean, GB, BLOCK_D)
        xc = tl.where(mask, x - mean_c[:, None], 0.0)
        rstd = tl.rsqrt(_per_group(tl.sum(xc * xc, 1), GB, BLOCK_D) / count + eps)
        _store_group_stats(MEAN, RSTD, n, g0, G, mean, rstd, GB)
        scale, shift = _affine(W, B, n, g0 * D + c, cmask, w_sn, w_sc, b_sn, b_sc,
                               _to_channels(rstd, GB, BLOCK_D), HAS_W, HAS_B)
        y = xc * scale[:, None] + shift[:, None]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    else:
        n_chunks = tl.cdiv(L, BLOCK_L)
        total, mean, m2, shift = _stats_sweep(X, n, g0, 0, n_chunks, C, L,
                                              D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL)
        mean += shift
        rstd = tl.rsqrt(m2 / total + eps)
        _store_group_stats(MEAN, RSTD, n, g0, G, mean, rstd, GB)
        _normalize_sweep(X, Y, W, B, n, g0, _to_channels(mean, GB, BLOCK_D),
                         _to_channels(rstd, GB, BLOCK_D), 0, n_chunks, C, L,
                         w_sn, w_sc, b_sn, b_sc, D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL,
                         HAS_W, HAS_B)


@_kernel
def forward_partial(
    X, P_COUNT, P_MEAN, P_M2, C, L, NGB, S, L_PER,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, CL: tl.constexpr,
):
    """Split phase 1, grid (N * NGB, S): each range's per-group count, mean of
    ``x - shift`` and M2, into ``[N * G, S]`` buffers."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    l_begin = s * L_PER
    n_chunks = tl.cdiv(tl.minimum(L - l_begin, L_PER), BLOCK_L)
    total, mean, m2, _ = _stats_sweep(X, n, g0, l_begin, n_chunks, C, L,
                                      D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL)
    out = (n * NGB * GB + g0 + tl.arange(0, GB)) * S + s
    tl.store(P_COUNT + out, total)
    tl.store(P_MEAN + out, mean)
    tl.store(P_M2 + out, m2)


@_kernel
def forward_merge(
    X, P_COUNT, P_MEAN, P_M2, MEAN, RSTD, C, L, G, S, eps,
    D: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """Split phase 2, one program per (n, g): merges the ranges' statistics by Chan's
    parallel formula, block by block: every term is a sum of non-negative values or a
    difference of shifted means, so nothing cancels."""
    pid = tl.program_id(0)
    n, g = (pid // G).to(tl.int64), pid % G
    base = pid.to(tl.int64) * S
    total = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)  # fp32 scalars for the loop
    mean, m2 = total, total
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        valid = s < S
        cnt = tl.load(P_COUNT + base + s, mask=valid, other=0.0)
        range_mean = tl.load(P_MEAN + base + s, mask=valid, other=0.0)
        block = tl.sum(cnt, 0)
        block_mean = tl.sum(cnt * range_mean, 0) / block
        spread = tl.where(valid, range_mean - block_mean, 0.0)
        block_m2 = tl.sum(tl.load(P_M2 + base + s, mask=valid, other=0.0), 0)
        block_m2 += tl.sum(cnt * spread * spread, 0)
        merged = total + block
        delta = block_mean - mean
        mean += delta * (block / merged)
        m2 += block_m2 + delta * delta * (total * block / merged)
        total = merged
    shift = tl.load(X + _first(n, g * D, C, L, CL)).to(tl.float32)
    tl.store(MEAN + pid, shift + mean)
    tl.store(RSTD + pid, tl.rsqrt(m2 / total + eps))


@_kernel
def forward_normalize(
    X, Y, W, B, MEAN, RSTD, C, L, NGB, L_PER, w_sn, w_sc, b_sn, b_sc,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """Split phase 3, grid (N * NGB, S): the output of each range."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    mean_c, rstd_c = _group_stats(MEAN, RSTD, n, g0, NGB * GB, GB, BLOCK_D)
    l_begin = s * L_PER
    n_chunks = tl.cdiv(tl.minimum(L - l_begin, L_PER), BLOCK_L)
    _normalize_sweep(X, Y, W, B, n, g0, mean_c, rstd_c, l_begin, n_chunks, C, L,
                     w_sn, w_sc, b_sn, b_sc, D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL,
                     HAS_W, HAS_B)


# ---- backward --------------------------------------------------------------------------
#
# With per-channel sums sdy[c] = sum_l dy and sdyx[c] = sum_l dy * (x - mean) over one
# (n, g) group of count = D * L elements, and gamma the weight (ones when absent):
#   per-sample dgamma[n, c] = rstd * sdyx[c]        dbeta[n, c] = sdy[c]
#   dx = rstd * (gamma[c] * dy - a - (x - mean) * b), with
#   a = sum_c gamma * sdy / count,  b = rstd^2 * sum_c gamma * sdyx / count.
# rstd multiplies last, so that a one-element group's gamma * dy - a is exactly 0, as
# is its true grad_input (rstd = 1/sqrt(eps) is large there: stock's is exact too).


@triton.jit
def _sums_sweep(DY, X, n, ch, cmask, mean_c, l_begin, n_chunks, C, L,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CL: tl.constexpr):
    """Per-channel ``(sum dy, sum dy * (x - mean))`` over the chunks. The sums
    accumulate elementwise and reduce once, after the loop: fewer shuffles per chunk,
    and triton 3.8 fails to compile a loop-carried ``acc += tl.sum(...)`` whose result
    has several uses (OptimizeThreadLocality: ``loopResult.hasOneUse()``)."""
    sdy = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    sdyx = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    for i in range(n_chunks):
        l = l_begin + i * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (l < L)[None, :]
        offsets = _offsets(n, ch, l, C, L, CL)
        xc = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean_c[:, None], 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        sdy += dy
        sdyx += dy * xc
    return tl.sum(sdy, 1), tl.sum(sdyx, 1)


@triton.jit
def _grad_input_sweep(DY, X, DX, W, n, g0, mean_c, rstd_c, a_c, b_c, l_begin, n_chunks,
                      C, L, w_sn, w_sc,
                      D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_L: tl.constexpr, C_BLOCKS: tl.constexpr, CL: tl.constexpr,
                      HAS_W: tl.constexpr):
    """grad_input over the chunks, last chunk first (what was read last is in L2)."""
    for cbi in range(C_BLOCKS):
        c, cmask = _channels((C_BLOCKS - 1 - cbi) * BLOCK_D, D, GB, BLOCK_D)
        gamma = tl.full([GB * BLOCK_D], 1.0, tl.float32)
        if HAS_W:
            gamma = _param(W, n, g0 * D + c, cmask, w_sn, w_sc, 0.0)
        for i in range(n_chunks):
            l = l_begin + (n_chunks - 1 - i) * BLOCK_L + tl.arange(0, BLOCK_L)
            mask = cmask[:, None] & (l < L)[None, :]
            offsets = _offsets(n, g0 * D + c, l, C, L, CL)
            xc = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean_c[:, None]
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
            dx = rstd_c[:, None] * (gamma[:, None] * dy - a_c[:, None] - xc * b_c[:, None])
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _store_param_grads(DW, DB, n, C, ch, cmask, sdy, sdyx, rstd_c,
                       WANT_DW: tl.constexpr, WANT_DB: tl.constexpr):
    """Per-sample grads into fresh contiguous ``[N, C]`` tensors."""
    if WANT_DW:
        tl.store(DW + n * C + ch, (sdyx * rstd_c).to(DW.dtype.element_ty), mask=cmask)
    if WANT_DB:
        tl.store(DB + n * C + ch, sdy.to(DB.dtype.element_ty), mask=cmask)


@triton.jit
def _weighted(W, n, ch, cmask, w_sn, w_sc, sdy, sdyx, HAS_W: tl.constexpr):
    """``(gamma * sdy, gamma * sdyx)``, the terms of grad_input's coefficients."""
    if HAS_W:
        gamma = _param(W, n, ch, cmask, w_sn, w_sc, 0.0)
        sdy, sdyx = gamma * sdy, gamma * sdyx
    return sdy, sdyx


@_kernel
def backward_tile(
    DY, X, MEAN, RSTD, W, DX, DW, DB, C, L, NGB, w_sn, w_sc, count,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, SINGLE: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
):
    """One program per group block: sums, per-sample grads and grad_input."""
    pid = tl.program_id(0)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    mean_c, rstd_c = _group_stats(MEAN, RSTD, n, g0, NGB * GB, GB, BLOCK_D)
    if SINGLE:
        c, cmask = _channels(0, D, GB, BLOCK_D)
        ch = g0 * D + c
        l = tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (l < L)[None, :]
        offsets = _offsets(n, ch, l, C, L, CL)
        xc = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean_c[:, None], 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        sdy, sdyx = tl.sum(dy, 1), tl.sum(dy * xc, 1)
        _store_param_grads(DW, DB, n, C, ch, cmask, sdy, sdyx, rstd_c, WANT_DW, WANT_DB)
        if WANT_DX:
            gsdy, gsdyx = _weighted(W, n, ch, cmask, w_sn, w_sc, sdy, sdyx, HAS_W)
            a = _to_channels(_per_group(gsdy, GB, BLOCK_D), GB, BLOCK_D) / count
            b = rstd_c * rstd_c * _to_channels(_per_group(gsdyx, GB, BLOCK_D), GB, BLOCK_D) / count
            gamma = tl.full([GB * BLOCK_D], 1.0, tl.float32)
            if HAS_W:
                gamma = _param(W, n, ch, cmask, w_sn, w_sc, 0.0)
            dx = rstd_c[:, None] * (gamma[:, None] * dy - a[:, None] - xc * b[:, None])
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        n_chunks = tl.cdiv(L, BLOCK_L)
        gsdy = tl.zeros([GB], tl.float32)
        gsdyx = tl.zeros([GB], tl.float32)
        for cbi in range(C_BLOCKS):
            c, cmask = _channels(cbi * BLOCK_D, D, GB, BLOCK_D)
            ch = g0 * D + c
            sdy, sdyx = _sums_sweep(DY, X, n, ch, cmask, mean_c, 0, n_chunks, C, L,
                                    GB * BLOCK_D, BLOCK_L, CL)
            _store_param_grads(DW, DB, n, C, ch, cmask, sdy, sdyx, rstd_c, WANT_DW, WANT_DB)
            wsdy, wsdyx = _weighted(W, n, ch, cmask, w_sn, w_sc, sdy, sdyx, HAS_W)
            gsdy += _per_group(wsdy, GB, BLOCK_D)
            gsdyx += _per_group(wsdyx, GB, BLOCK_D)
        if WANT_DX:
            a = _to_channels(gsdy, GB, BLOCK_D) / count
            b = rstd_c * rstd_c * _to_channels(gsdyx, GB, BLOCK_D) / count
            _grad_input_sweep(DY, X, DX, W, n, g0, mean_c, rstd_c, a, b, 0, n_chunks, C, L,
                              w_sn, w_sc, D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL, HAS_W)


@_kernel
def backward_partial(
    DY, X, MEAN, RSTD, P_DY, P_DYX, C, L, NGB, S, L_PER,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, CL: tl.constexpr,
):
    """Split phase 1, grid (N * NGB, S): each range's per-channel sums, into
    ``[N, S, C]`` buffers."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    mean_c, _ = _group_stats(MEAN, RSTD, n, g0, NGB * GB, GB, BLOCK_D)
    l_begin = s * L_PER
    n_chunks = tl.cdiv(tl.minimum(L - l_begin, L_PER), BLOCK_L)
    for cbi in range(C_BLOCKS):
        c, cmask = _channels(cbi * BLOCK_D, D, GB, BLOCK_D)
        ch = g0 * D + c
        sdy, sdyx = _sums_sweep(DY, X, n, ch, cmask, mean_c, l_begin, n_chunks, C, L,
                                GB * BLOCK_D, BLOCK_L, CL)
        out = (n * S + s) * C + ch
        tl.store(P_DY + out, sdy, mask=cmask)
        tl.store(P_DYX + out, sdyx, mask=cmask)


@_kernel
def backward_merge(
    P_DY, P_DYX, RSTD, W, DW, DB, COEF, C, G, S, w_sn, w_sc, count,
    D: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split phase 2, one program per (n, g): the ranges' sums per channel give the
    per-sample grads, and their gamma-weighted totals grad_input's ``a`` and ``b``."""
    pid = tl.program_id(0)
    n, g = (pid // G).to(tl.int64), pid % G
    rstd = tl.load(RSTD + pid)
    gsdy = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)
    gsdyx = gsdy
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ch, cmask = g * D + d, d < D
        sdy = tl.zeros([BLOCK_D], tl.float32)
        sdyx = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[:, None]
            mask = (s < S) & cmask[None, :]
            offsets = (n * S + s) * C + ch[None, :]
            sdy += tl.sum(tl.load(P_DY + offsets, mask=mask, other=0.0), 0)
            sdyx += tl.sum(tl.load(P_DYX + offsets, mask=mask, other=0.0), 0)
        _store_param_grads(DW, DB, n, C, ch, cmask, sdy, sdyx, rstd, WANT_DW, WANT_DB)
        wsdy, wsdyx = _weighted(W, n, ch, cmask, w_sn, w_sc, sdy, sdyx, HAS_W)
        gsdy += tl.sum(wsdy, 0)
        gsdyx += tl.sum(wsdyx, 0)
    tl.store(COEF + 2 * pid, gsdy / count)
    tl.store(COEF + 2 * pid + 1, rstd * rstd * gsdyx / count)


@_kernel
def backward_grad_input(
    DY, X, MEAN, RSTD, W, COEF, DX, C, L, NGB, L_PER, w_sn, w_sc,
    D: tl.constexpr, GB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    C_BLOCKS: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
):
    """Split phase 3, grid (N * NGB, S): grad_input of each range."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g0 = (pid // NGB).to(tl.int64), (pid % NGB) * GB
    mean_c, rstd_c = _group_stats(MEAN, RSTD, n, g0, NGB * GB, GB, BLOCK_D)
    g = n * NGB * GB + g0 + tl.arange(0, GB)
    a_c = _to_channels(tl.load(COEF + 2 * g), GB, BLOCK_D)
    b_c = _to_channels(tl.load(COEF + 2 * g + 1), GB, BLOCK_D)
    l_begin = s * L_PER
    n_chunks = tl.cdiv(tl.minimum(L - l_begin, L_PER), BLOCK_L)
    _grad_input_sweep(DY, X, DX, W, n, g0, mean_c, rstd_c, a_c, b_c, l_begin, n_chunks,
                      C, L, w_sn, w_sc, D, GB, BLOCK_D, BLOCK_L, C_BLOCKS, CL, HAS_W)
