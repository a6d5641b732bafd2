"""Triton kernels of the persample ops (fp32, bf16, fp16), for ops/cuda.py.

The unit of work is one (sample, group) tile: D = C / G channels by L spatial elements.
When a tile fits on chip (``launch.ON_CHIP_ELEMENTS``), one program holds it in
registers, so the forward reads x once and writes y once, and the backward reads x and
dy once and writes dx once: the 5-pass floor of a forward and backward, where ATen's
CUDA GroupNorm makes about 8 passes. A larger tile is split into chunks, and each phase
is its own kernel: partial statistics (or per-channel sums) per chunk, a merge per
(sample, group), then an elementwise pass.

Every kernel takes the strides of its tensors as arguments: element (n, c, l) of a
tensor lies at ``n * s_n + c * s_c + l * s_l``, with the spatial dims flattened into l,
which holds for the canonical strides of the contiguous and channels_last formats
(ops/layout.py), so one kernel reads each layout as it lies and writes another.
Parameters take ``(s_n, s_c)`` too: ``s_n = 0`` serves a shared ``[C]`` row, and any
``[N, C]`` strides (expanded, transposed) read in place.

Numerics: statistics and sums accumulate in fp32. The variance is ``sum((x - mean)^2)``
on the tile, never ``E[x^2] - mean^2``, and the backward sums ``dy * (x - mean)``, never
``dy * x - mean * dy``: both cancel when |mean| >> std. The tile's mean gets one
refinement step (the mean of ``x - mean``), so that it is as exact as fp32 allows: the
per-sample dgamma error is bounded by the saved mean's rounding. Chunk statistics are
taken of x minus the group's first element and merge by Chan's parallel formula.
"""

import inspect

import triton
import triton.language as tl


def _kernel(fn):
    """``triton.jit``, without specialising on the sizes the kernel takes: they vary from
    call to call, and a compilation per value class (triton specialises integers equal
    to 1 or divisible by 16) would only add compilations. Strides stay specialised: a
    stride of 1 is what lets loads vectorise."""
    sizes = [name for name in ("G", "D", "L", "C", "SL", "S") if name in inspect.signature(fn).parameters]
    return triton.jit(do_not_specialize=sizes)(fn)


@triton.jit
def _tile(n, g, D, L, s_n, s_c, s_l, d0, l0, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets ``[BLOCK_D, BLOCK_L]`` and mask of the tile of channels ``d0 + ...`` and
    spatial positions ``l0 + ...`` of group g of sample n (n is int64: no overflow)."""
    d = d0 + tl.arange(0, BLOCK_D)[:, None]
    l = l0 + tl.arange(0, BLOCK_L)[None, :]
    offsets = n * s_n + (g * D + d) * s_c + l * s_l
    return offsets, (d < D) & (l < L)


@triton.jit
def _channel_param(P, n, g, D, s_n, s_c, d0, other, BLOCK_D: tl.constexpr):
    """``[BLOCK_D]`` fp32 values of a ``[C]`` or ``[N, C]`` parameter for the tile's
    channels (``other`` beyond D)."""
    d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(P + n * s_n + (g * D + d) * s_c, mask=d < D, other=other).to(tl.float32)


@triton.jit
def _mean_m2(x, mask, count):
    """Mean and sum of squared deviations of the masked fp32 tile ``x``."""
    mean = tl.sum(tl.sum(x, 1), 0) / count
    # x - mean is exact for |x - mean| << |mean|, so this step corrects the rounding of
    # the first sum, which grows with |mean| * log2(count).
    mean += tl.sum(tl.sum(tl.where(mask, x - mean, 0.0), 1), 0) / count
    xc = tl.where(mask, x - mean, 0.0)
    return mean, tl.sum(tl.sum(xc * xc, 1), 0), xc


@triton.jit
def _affine(xhat, W, B, n, g, D, w_sn, w_sc, b_sn, b_sc, d0,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr):
    if HAS_W:
        xhat = xhat * _channel_param(W, n, g, D, w_sn, w_sc, d0, 0.0, BLOCK_D)[:, None]
    if HAS_B:
        xhat = xhat + _channel_param(B, n, g, D, b_sn, b_sc, d0, 0.0, BLOCK_D)[:, None]
    return xhat


# ---- forward ---------------------------------------------------------------------------


@_kernel
def forward_fused(
    X, Y, W, B, MEAN, RSTD, G, D, L,
    x_sn, x_sc, x_sl, y_sn, y_sc, y_sl, w_sn, w_sc, b_sn, b_sc, count, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, g): statistics and output of the whole tile (``count`` =
    D * L as a float, which a size specialised to 1 could not be cast to)."""
    pid = tl.program_id(0)
    n, g = (pid // G).to(tl.int64), pid % G
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, 0, 0, BLOCK_D, BLOCK_L)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    mean, m2, xc = _mean_m2(x, mask, count)
    rstd = tl.rsqrt(m2 / count + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    y = _affine(xc * rstd, W, B, n, g, D, w_sn, w_sc, b_sn, b_sc, 0, HAS_W, HAS_B, BLOCK_D)
    y_offsets, _ = _tile(n, g, D, L, y_sn, y_sc, y_sl, 0, 0, BLOCK_D, BLOCK_L)
    tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_shift(X, n, g, D, x_sn, x_sc):
    """The group's first element, which the split kernels subtract before they sum."""
    return tl.load(X + n * x_sn + g * D * x_sc).to(tl.float32)


@_kernel
def forward_partial(
    X, P_COUNT, P_MEAN, P_M2, G, D, L, x_sn, x_sc, x_sl, SL,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Split phase 1, grid (N*G, chunks): each chunk's count, mean and M2. The mean is
    of ``x - shift`` (``_group_shift``): small numbers, so that the chunk means keep
    the bits that a mean of |mean| >> std would round away."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g = (pid // G).to(tl.int64), pid % G
    d0, l0 = (s // SL) * BLOCK_D, (s % SL) * BLOCK_L
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, d0, l0, BLOCK_D, BLOCK_L)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(mask, x - _group_shift(X, n, g, D, x_sn, x_sc), 0.0)
    count = (tl.minimum(D - d0, BLOCK_D) * tl.minimum(L - l0, BLOCK_L)).to(tl.float32)
    mean, m2, _ = _mean_m2(x, mask, count)
    out = pid * tl.num_programs(1) + s
    tl.store(P_COUNT + out, count)
    tl.store(P_MEAN + out, mean)
    tl.store(P_M2 + out, m2)


@_kernel
def forward_merge(
    X, P_COUNT, P_MEAN, P_M2, MEAN, RSTD, G, D, x_sn, x_sc, S, eps, BLOCK_S: tl.constexpr,
):
    """Split phase 2, one program per (n, g): merges the chunks' statistics by Chan's
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
        chunk_mean = tl.load(P_MEAN + base + s, mask=valid, other=0.0)
        block = tl.sum(cnt, 0)
        block_mean = tl.sum(cnt * chunk_mean, 0) / block
        spread = tl.where(valid, chunk_mean - block_mean, 0.0)
        block_m2 = tl.sum(tl.load(P_M2 + base + s, mask=valid, other=0.0), 0)
        block_m2 += tl.sum(cnt * spread * spread, 0)
        merged = total + block
        delta = block_mean - mean
        mean += delta * (block / merged)
        m2 += block_m2 + delta * delta * (total * block / merged)
        total = merged
    tl.store(MEAN + pid, _group_shift(X, n, g, D, x_sn, x_sc) + mean)
    tl.store(RSTD + pid, tl.rsqrt(m2 / total + eps))


@_kernel
def forward_normalize(
    X, Y, W, B, MEAN, RSTD, G, D, L,
    x_sn, x_sc, x_sl, y_sn, y_sc, y_sl, w_sn, w_sc, b_sn, b_sc, SL,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Split phase 3, grid (N*G, chunks): the output from the merged statistics."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g = (pid // G).to(tl.int64), pid % G
    d0, l0 = (s // SL) * BLOCK_D, (s % SL) * BLOCK_L
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, d0, l0, BLOCK_D, BLOCK_L)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - tl.load(MEAN + pid)) * tl.load(RSTD + pid)
    y = _affine(xhat, W, B, n, g, D, w_sn, w_sc, b_sn, b_sc, d0, HAS_W, HAS_B, BLOCK_D)
    y_offsets, _ = _tile(n, g, D, L, y_sn, y_sc, y_sl, d0, l0, BLOCK_D, BLOCK_L)
    tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


# ---- backward --------------------------------------------------------------------------
#
# With per-channel sums sdy[c] = sum_l dy and sdyx[c] = sum_l dy * (x - mean) over one
# (n, g) group of count = D * L elements, and gamma the weight (ones when absent):
#   per-sample dgamma[n, c] = rstd * sdyx[c]        dbeta[n, c] = sdy[c]
#   dx = rstd * gamma[c] * dy - a - (x - mean) * b, with
#   a = rstd * sum_c gamma * sdy / count,  b = rstd^3 * sum_c gamma * sdyx / count.


@triton.jit
def _grad_input(dy, xc, W, n, g, D, w_sn, w_sc, d0, rstd, a, b,
                HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    scale = rstd
    if HAS_W:
        scale = rstd * _channel_param(W, n, g, D, w_sn, w_sc, d0, 0.0, BLOCK_D)[:, None]
    return scale * dy - a - xc * b


@_kernel
def backward_fused(
    DY, X, MEAN, RSTD, W, DX, DW, DB, G, D, L, C,
    dy_sn, dy_sc, dy_sl, x_sn, x_sc, x_sl, dx_sn, dx_sc, dx_sl, w_sn, w_sc, count,
    HAS_W: tl.constexpr, WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, g): sums, per-sample grads and grad_input of the whole tile."""
    pid = tl.program_id(0)
    n, g = (pid // G).to(tl.int64), pid % G
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, 0, 0, BLOCK_D, BLOCK_L)
    mean, rstd = tl.load(MEAN + pid), tl.load(RSTD + pid)
    xc = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
    dy_offsets, _ = _tile(n, g, D, L, dy_sn, dy_sc, dy_sl, 0, 0, BLOCK_D, BLOCK_L)
    dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    sdy, sdyx = tl.sum(dy, 1), tl.sum(dy * xc, 1)
    d = tl.arange(0, BLOCK_D)
    out = n * C + g * D + d  # per-sample grads: fresh contiguous [N, C]
    if WANT_DW:
        tl.store(DW + out, (sdyx * rstd).to(DW.dtype.element_ty), mask=d < D)
    if WANT_DB:
        tl.store(DB + out, sdy.to(DB.dtype.element_ty), mask=d < D)
    if WANT_DX:
        gamma_sdy, gamma_sdyx = sdy, sdyx
        if HAS_W:
            gamma = _channel_param(W, n, g, D, w_sn, w_sc, 0, 0.0, BLOCK_D)
            gamma_sdy, gamma_sdyx = gamma * sdy, gamma * sdyx
        a = rstd * tl.sum(gamma_sdy, 0) / count
        b = rstd * rstd * rstd * tl.sum(gamma_sdyx, 0) / count
        dx = _grad_input(dy, xc, W, n, g, D, w_sn, w_sc, 0, rstd, a, b, HAS_W, BLOCK_D)
        dx_offsets, _ = _tile(n, g, D, L, dx_sn, dx_sc, dx_sl, 0, 0, BLOCK_D, BLOCK_L)
        tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)


@_kernel
def backward_partial(
    DY, X, MEAN, P_DY, P_DYX, G, D, L, dy_sn, dy_sc, dy_sl, x_sn, x_sc, x_sl, SL,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Split phase 1, grid (N*G, chunks): per-channel sums over the chunk's positions,
    into ``[N*G, SL, D]`` buffers."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g = (pid // G).to(tl.int64), pid % G
    d0, sl = (s // SL) * BLOCK_D, s % SL
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, d0, sl * BLOCK_L, BLOCK_D, BLOCK_L)
    xc = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - tl.load(MEAN + pid), 0.0)
    dy_offsets, _ = _tile(n, g, D, L, dy_sn, dy_sc, dy_sl, d0, sl * BLOCK_L, BLOCK_D, BLOCK_L)
    dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    d = d0 + tl.arange(0, BLOCK_D)
    out = (pid.to(tl.int64) * SL + sl) * D + d
    tl.store(P_DY + out, tl.sum(dy, 1), mask=d < D)
    tl.store(P_DYX + out, tl.sum(dy * xc, 1), mask=d < D)


@_kernel
def backward_merge(
    P_DY, P_DYX, RSTD, W, DW, DB, COEF, G, D, C, SL, w_sn, w_sc, count,
    HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split phase 2, one program per (n, g): the chunks' sums per channel give the
    per-sample grads, and their gamma-weighted totals grad_input's ``a`` and ``b``."""
    pid = tl.program_id(0)
    n, g = (pid // G).to(tl.int64), pid % G
    rstd = tl.load(RSTD + pid)
    gamma_sdy = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)
    gamma_sdyx = gamma_sdy
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        sdy = tl.zeros([BLOCK_D], tl.float32)
        sdyx = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, SL, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[:, None]
            mask = (s < SL) & (d[None, :] < D)
            offsets = (pid.to(tl.int64) * SL + s) * D + d[None, :]
            sdy += tl.sum(tl.load(P_DY + offsets, mask=mask, other=0.0), 0)
            sdyx += tl.sum(tl.load(P_DYX + offsets, mask=mask, other=0.0), 0)
        out = n * C + g * D + d
        if WANT_DW:
            tl.store(DW + out, (sdyx * rstd).to(DW.dtype.element_ty), mask=d < D)
        if WANT_DB:
            tl.store(DB + out, sdy.to(DB.dtype.element_ty), mask=d < D)
        if HAS_W:
            gamma = _channel_param(W, n, g, D, w_sn, w_sc, d0, 0.0, BLOCK_D)
            sdy, sdyx = gamma * sdy, gamma * sdyx
        gamma_sdy += tl.sum(sdy, 0)
        gamma_sdyx += tl.sum(sdyx, 0)
    tl.store(COEF + 2 * pid, rstd * gamma_sdy / count)
    tl.store(COEF + 2 * pid + 1, rstd * rstd * rstd * gamma_sdyx / count)


@_kernel
def backward_grad_input(
    DY, X, MEAN, RSTD, W, COEF, DX, G, D, L,
    dy_sn, dy_sc, dy_sl, x_sn, x_sc, x_sl, dx_sn, dx_sc, dx_sl, w_sn, w_sc, SL,
    HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Split phase 3, grid (N*G, chunks): grad_input from the merged coefficients."""
    pid, s = tl.program_id(0), tl.program_id(1)
    n, g = (pid // G).to(tl.int64), pid % G
    d0, l0 = (s // SL) * BLOCK_D, (s % SL) * BLOCK_L
    offsets, mask = _tile(n, g, D, L, x_sn, x_sc, x_sl, d0, l0, BLOCK_D, BLOCK_L)
    xc = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - tl.load(MEAN + pid)
    dy_offsets, _ = _tile(n, g, D, L, dy_sn, dy_sc, dy_sl, d0, l0, BLOCK_D, BLOCK_L)
    dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    a, b = tl.load(COEF + 2 * pid), tl.load(COEF + 2 * pid + 1)
    dx = _grad_input(dy, xc, W, n, g, D, w_sn, w_sc, d0, tl.load(RSTD + pid), a, b, HAS_W, BLOCK_D)
    dx_offsets, _ = _tile(n, g, D, L, dx_sn, dx_sc, dx_sl, d0, l0, BLOCK_D, BLOCK_L)
    tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)
