"""Triton kernels of the row norms, ``persample::layer_norm`` and ``persample::rms_norm``
(fp32, bf16, fp16), launched by ops/row_norm/triton_launch.py.

The problem is a contiguous ``[N, M, D]`` tensor: N samples of M rows, each row of D
elements normalised on its own. Element (n, r, d) lies at ``n*M*D + r*D + d``; the
sample's base is int64, offsets within a sample int32 (the launcher routes samples of
2**31 elements or more to ATen). D is specialised (Triton's ``% 16`` classes), which is
what proves the alignment of a row's masked accesses, so that they vectorise; M and the
program counts are not (``shared.triton_helpers.jit``).

A program works inside one sample, on *ranges* of its rows: then a per-sample weight is
read once a program, and the backward's per-sample parameter sums over the rows stop at
the sample boundary without atomics.

- ``*_rows``: rows of up to ``BLOCK_D`` (a power of two) elements held in registers,
  ``BLOCK_R`` rows to a tile. The forward reads x once and writes y once; the backward
  reads x and dy once and writes dx once, and loops over the tiles of a range of
  ``M_PER`` rows, summing ``dy * xhat`` and ``dy`` per column into a ``[N, S, D]`` fp32
  buffer (a range's partial sums; ``S`` ranges a sample).
- ``*_swept``: rows wider than a register tile, in chunks of ``BLOCK_D``: the forward
  sweeps a row twice (statistics, then the output, last chunk first, while in L2), the
  backward too (grad_input's row sums, then grad_input); the range's partial sums then
  live in its own slice of the buffer, which only that program reads and writes.
- ``param_merge``: sums the S ranges' partial sums of each sample, when S > 1.

Numerics: fp32 statistics and sums. A register-held row's mean is refined once (the
exact mean's rounding error recovered from ``sum(x - mean)``) and its variance is the
centred ``sum((x - mean)**2)``; a swept row's statistics are of ``x - shift`` (shift: its
first element), per chunk by two passes, merged by Chan's formula. dgamma sums
``dy * (x - mean) * rstd``, never ``dy * x`` minus a mean term. Nothing cancels when
|mean| >> std.
"""

import triton.language as tl

from ..shared.triton_helpers import jit

_kernel = jit(("M", "S", "M_PER"))


@_kernel
def forward_rows(
    X, Y, W, B, MEAN, RSTD, M, D, S, w_sn, b_sn, count, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RMS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """Grid ``N * S``, S = cdiv(M, BLOCK_R): one tile of rows each (``count`` = D as a
    float: a size specialised to 1 could not be cast)."""
    pid = tl.program_id(0)
    n, s = (pid // S).to(tl.int64), pid % S
    r = s * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask, dmask = r < M, d < D
    mask = rmask[:, None] & dmask[None, :]
    offsets = n * M * D + r[:, None] * D + d[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, 1) / count + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, 1) / count
        # x - mean is exact where |x - mean| << |mean|: this step recovers what the
        # rounding of the first sum lost, which grows with |mean| * log2(D).
        xc = tl.where(mask, x - mean[:, None], 0.0)
        mean += tl.sum(xc, 1) / count
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / count + eps)
        tl.store(MEAN + n * M + r, mean, mask=rmask)
        xhat = xc * rstd[:, None]
    tl.store(RSTD + n * M + r, rstd, mask=rmask)
    y = xhat
    if HAS_W:
        y = y * tl.load(W + n * w_sn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + n * b_sn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@_kernel
def backward_rows(
    DY, X, MEAN, RSTD, W, DX, P_DW, P_DB, M, D, S, M_PER, w_sn, count,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
):
    """Grid ``N * S``: rows ``[s * M_PER, (s + 1) * M_PER)`` of sample n, by tiles. With
    g = dy * w and xhat = (x - mean) * rstd:
    ``dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))`` (rms: no ``mean_D(g)``), and
    the range's ``sum dy * xhat``, ``sum dy`` per column into ``P_*[n, s]``."""
    pid = tl.program_id(0)
    n, s = (pid // S).to(tl.int64), pid % S
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    if HAS_W:
        w = tl.load(W + n * w_sn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sdyx = tl.zeros([BLOCK_D], tl.float32)
    sdy = tl.zeros([BLOCK_D], tl.float32)
    r_begin = s * M_PER
    for i in range(tl.cdiv(tl.minimum(M - r_begin, M_PER), BLOCK_R)):
        r = r_begin + i * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < M
        mask = rmask[:, None] & dmask[None, :]
        offsets = n * M * D + r[:, None] * D + d[None, :]
        rstd = tl.load(RSTD + n * M + r, mask=rmask, other=0.0)[:, None]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            xhat = x * rstd
        else:
            mean = tl.load(MEAN + n * M + r, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if WANT_DW:
            sdyx += tl.sum(dy * xhat, 0)
        if WANT_DB:
            sdy += tl.sum(dy, 0)
        if WANT_DX:
            g = dy
            if HAS_W:
                g = g * w
            dx = g - xhat * (tl.sum(g * xhat, 1) / count)[:, None]
            if not RMS:
                dx -= (tl.sum(g, 1) / count)[:, None]
            tl.store(DX + offsets, (rstd * dx).to(DX.dtype.element_ty), mask=mask)
    out = (n * S + s) * D + d
    if WANT_DW:
        tl.store(P_DW + out, sdyx, mask=dmask)
    if WANT_DB:
        tl.store(P_DB + out, sdy, mask=dmask)


@_kernel
def forward_swept(
    X, Y, W, B, MEAN, RSTD, M, D, w_sn, b_sn, count, eps,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """Grid ``N * M``: one row each, in chunks of BLOCK_D."""
    pid = tl.program_id(0)
    n, r = (pid // M).to(tl.int64), pid % M
    row = n * M * D + r * D
    n_chunks = tl.cdiv(D, BLOCK_D)
    if RMS:
        sq = tl.zeros([BLOCK_D], tl.float32)
        for i in range(n_chunks):
            d = i * BLOCK_D + tl.arange(0, BLOCK_D)
            x = tl.load(X + row + d, mask=d < D, other=0.0).to(tl.float32)
            sq += x * x
        rstd = tl.rsqrt(tl.sum(sq, 0) / count + eps)
        mean = 0.0
    else:
        shift = tl.load(X + row).to(tl.float32)
        total = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)  # fp32 scalars for the loop
        mean, m2 = total, total
        for i in range(n_chunks):
            d = i * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = d < D
            xs = tl.where(dmask, tl.load(X + row + d, mask=dmask, other=0.0).to(tl.float32) - shift, 0.0)
            cnt = tl.minimum(D - i * BLOCK_D, BLOCK_D).to(tl.float32)
            chunk_mean = tl.sum(xs, 0) / cnt
            dev = tl.where(dmask, xs - chunk_mean, 0.0)
            merged = total + cnt
            delta = chunk_mean - mean
            mean += delta * (cnt / merged)
            m2 += tl.sum(dev * dev, 0) + delta * delta * (total * cnt / merged)
            total = merged
        mean += shift
        rstd = tl.rsqrt(m2 / count + eps)
        tl.store(MEAN + n * M + r, mean)
    tl.store(RSTD + n * M + r, rstd)
    for i in range(n_chunks):  # last chunk first: what was read last is in L2
        d = (n_chunks - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        x = tl.load(X + row + d, mask=dmask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + n * w_sn + d, mask=dmask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + n * b_sn + d, mask=dmask, other=0.0).to(tl.float32)
        tl.store(Y + row + d, y.to(Y.dtype.element_ty), mask=dmask)


@_kernel
def backward_swept(
    DY, X, MEAN, RSTD, W, DX, P_DW, P_DB, M, D, S, M_PER, w_sn, count,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
):
    """Grid ``N * S``: the rows of a range one by one, each in chunks of BLOCK_D: the
    row sums of grad_input, then grad_input and the partial sums, last chunk first.
    The range's partial sums are read, added to and written back in ``P_*[n, s]``,
    which no other program touches (its first row writes without reading)."""
    pid = tl.program_id(0)
    n, s = (pid // S).to(tl.int64), pid % S
    n_chunks = tl.cdiv(D, BLOCK_D)
    r_begin = s * M_PER
    out = (n * S + s) * D
    for j in range(tl.minimum(M - r_begin, M_PER)):
        r = r_begin + j
        row = n * M * D + r * D
        rstd = tl.load(RSTD + n * M + r)
        mean = 0.0
        if not RMS:
            mean = tl.load(MEAN + n * M + r)
        if WANT_DX:
            sg = tl.zeros([BLOCK_D], tl.float32)
            sgx = tl.zeros([BLOCK_D], tl.float32)
            for i in range(n_chunks):
                d = i * BLOCK_D + tl.arange(0, BLOCK_D)
                dmask = d < D
                x = tl.load(X + row + d, mask=dmask, other=0.0).to(tl.float32)
                xhat = tl.where(dmask, (x - mean) * rstd, 0.0)
                g = tl.load(DY + row + d, mask=dmask, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + n * w_sn + d, mask=dmask, other=0.0).to(tl.float32)
                sg += g
                sgx += g * xhat
            c1 = tl.sum(sg, 0) / count
            c2 = tl.sum(sgx, 0) / count
        for i in range(n_chunks):
            d = (n_chunks - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = d < D
            x = tl.load(X + row + d, mask=dmask, other=0.0).to(tl.float32)
            xhat = tl.where(dmask, (x - mean) * rstd, 0.0)
            dy = tl.load(DY + row + d, mask=dmask, other=0.0).to(tl.float32)
            if WANT_DX:
                g = dy
                if HAS_W:
                    g = g * tl.load(W + n * w_sn + d, mask=dmask, other=0.0).to(tl.float32)
                dx = g - xhat * c2
                if not RMS:
                    dx -= c1
                tl.store(DX + row + d, (rstd * dx).to(DX.dtype.element_ty), mask=dmask)
            if WANT_DW:
                p = tl.load(P_DW + out + d, mask=dmask & (j > 0), other=0.0)
                tl.store(P_DW + out + d, p + dy * xhat, mask=dmask)
            if WANT_DB:
                p = tl.load(P_DB + out + d, mask=dmask & (j > 0), other=0.0)
                tl.store(P_DB + out + d, p + dy, mask=dmask)


@_kernel
def param_merge(
    P_DW, P_DB, DW, DB, D, S,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
):
    """Grid ``N * cdiv(D, BLOCK_D)``: ``DW[n] = sum_s P_DW[n, s]`` (and DB), in a fixed
    order (deterministic)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(D, BLOCK_D)
    n = (pid // blocks).to(tl.int64)
    d = (pid % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    sdw = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    sdb = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & dmask[None, :]
        offsets = (n * S + s[:, None]) * D + d[None, :]
        if WANT_DW:
            sdw += tl.load(P_DW + offsets, mask=mask, other=0.0)
        if WANT_DB:
            sdb += tl.load(P_DB + offsets, mask=mask, other=0.0)
    if WANT_DW:
        tl.store(DW + n * D + d, tl.sum(sdw, 0), mask=dmask)
    if WANT_DB:
        tl.store(DB + n * D + d, tl.sum(sdb, 0), mask=dmask)
