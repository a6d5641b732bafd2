"""Launch wrappers of the Triton kernels (ops/triton_kernels.py): layouts, tile
geometry, grids. ops/cuda.py imports this module lazily, when triton is installed.

Layouts follow ops/layout.py: each tensor is made dense in its own format with that
format's canonical strides (a free view; a copy only for strides dense in no format),
and the kernels get the strides of dims N and C and of the flattened spatial dims. The
output and grad_input are allocated as the fake implementations say
(``output_memory_format``: contiguous on CUDA), so the kernels read channels_last input
as it lies and write the output in its own layout, with no copy.
"""

import math

import torch
import triton

from . import triton_kernels as k
from .checks import grad_param_dtype
from .layout import dense, output_memory_format

ON_CHIP_ELEMENTS = 16384
"""Largest (sample, group) tile, in elements of the padded power-of-two tile, that one
program keeps on chip (in registers); larger groups take the split kernels. Provisional:
a fp32 tile of 8 x 32 x 32 (the BRIEF's example) and the benchmark's 16 x 32 x 32 fit
with 16 warps; the GPU benchmark (persample/bench_kernels.py) is where to tune it.
Tests lower it to force the split kernels."""

INTERPRETED = type(k.forward_fused).__name__ == "InterpretedFunction"
"""True when triton runs the kernels in its interpreter (``TRITON_INTERPRET=1`` when
ops/triton_kernels.py was imported): then they take CPU tensors, which tests use."""

_MERGE_BLOCK = 1024  # chunk statistics a merge program reads at a time


class Plan:
    """How one (sample, group) tile of ``d`` channels by ``length`` positions is cut.

    ``fused``: one program holds the tile. Otherwise ``chunks = sd * sl`` chunks of
    ``block_d`` channels by ``block_l`` positions, all the channels when they fit.
    """

    def __init__(self, d, length):
        limit = 1 << max(0, int(ON_CHIP_ELEMENTS).bit_length() - 1)  # a power of two
        full_d, full_l = triton.next_power_of_2(d), triton.next_power_of_2(length)
        self.fused = full_d * full_l <= limit
        self.block_d = min(full_d, limit)
        self.block_l = full_l if self.fused else min(full_l, limit // self.block_d)
        self.sd, self.sl = triton.cdiv(d, self.block_d), triton.cdiv(length, self.block_l)
        self.chunks = self.sd * self.sl
        # Liger-Kernel's rule of thumb: more warps for bigger tiles (to tune on a GPU).
        tile = self.block_d * self.block_l
        self.num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4


def _sizes(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    return n, c, c // num_groups, math.prod(x.shape[2:])


def _strides(t):
    """(s_n, s_c, s_l) of a tensor that ``layout.dense`` returned: canonical strides,
    whose last dim's stride steps through the flattened spatial dims (1 when
    contiguous, C when channels_last); 0 for a rank-2 tensor, which has one position."""
    s = t.stride()
    return s[0], s[1], s[-1] if t.dim() > 2 else 0


def _param(p, input):
    """(tensor, s_n, s_c): a shared [C] row reads with s_n = 0; absent, any pointer."""
    if p is None:
        return input, 0, 0
    if p.dim() == 1:
        return p, 0, p.stride(0)
    return p, p.stride(0), p.stride(1)


def _output(input, dtype=None):
    """(output, its dense view) in the layout the fake implementation states."""
    fmt = output_memory_format(input)
    out = torch.empty_like(input, dtype=dtype, memory_format=fmt)
    return out, dense(out, fmt)[0]


def forward(input, num_groups, weight, bias, eps):
    """``persample::group_norm`` of a non-empty fp32/bf16/fp16 input (validated).

    Returns:
        (Tensor[N, C, *], Tensor[N, G], Tensor[N, G]): output in the input dtype, fp32
        mean and rstd.
    """
    x, _ = dense(input)
    n, c, d, length = _sizes(x, num_groups)
    out, y = _output(input)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    plan = Plan(d, length)
    (w, w_sn, w_sc), (b, b_sn, b_sc) = _param(weight, x), _param(bias, x)
    groups = n * num_groups
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                 BLOCK_D=plan.block_d, BLOCK_L=plan.block_l, num_warps=plan.num_warps)
    if plan.fused:
        k.forward_fused[(groups,)](
            x, y, w, b, mean, rstd, num_groups, d, length, *_strides(x), *_strides(y),
            w_sn, w_sc, b_sn, b_sc, float(d * length), eps, **flags,
        )
        return out, mean, rstd
    parts = torch.empty((3, groups, plan.chunks), device=x.device, dtype=torch.float32)
    k.forward_partial[(groups, plan.chunks)](
        x, parts[0], parts[1], parts[2], num_groups, d, length, *_strides(x), plan.sl,
        BLOCK_D=plan.block_d, BLOCK_L=plan.block_l, num_warps=plan.num_warps,
    )
    k.forward_merge[(groups,)](
        x, parts[0], parts[1], parts[2], mean, rstd, num_groups, d, *_strides(x)[:2],
        plan.chunks, eps,
        BLOCK_S=min(triton.next_power_of_2(plan.chunks), _MERGE_BLOCK),
    )
    k.forward_normalize[(groups, plan.chunks)](
        x, y, w, b, mean, rstd, num_groups, d, length, *_strides(x), *_strides(y),
        w_sn, w_sc, b_sn, b_sc, plan.sl, **flags,
    )
    return out, mean, rstd


def backward(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """``persample::group_norm_backward`` of a non-empty fp32/bf16/fp16 input, without
    validation or placeholders (see ops/cpu.py's ``backward_cpu``).

    Returns:
        (Tensor[N, C, *] or None, Tensor[N, C] or None, Tensor[N, C] or None):
        grad_input in the input dtype and the per-sample weight and bias gradients in
        ``checks.grad_param_dtype``, each None where ``output_mask`` says so.
    """
    x, _ = dense(input)
    # grad_out in its own layout: on CUDA it is contiguous (as the output) while the
    # input may be channels_last, and the kernels read both as they lie.
    dy, _ = dense(grad_out)
    n, c, d, length = _sizes(x, num_groups)
    want_dx, want_dw, want_db = output_mask
    gi, dx = _output(input) if want_dx else (None, x)
    p_dtype = grad_param_dtype(input, weight)
    gw = torch.empty((n, c), device=x.device, dtype=p_dtype) if want_dw else None
    gb = torch.empty((n, c), device=x.device, dtype=p_dtype) if want_db else None
    mean, rstd = mean.contiguous(), rstd.contiguous()
    w, w_sn, w_sc = _param(weight, x)
    plan = Plan(d, length)
    groups, count = n * num_groups, float(d * length)
    strides = (*_strides(dy), *_strides(x))
    if plan.fused:
        k.backward_fused[(groups,)](
            dy, x, mean, rstd, w, dx, x if gw is None else gw, x if gb is None else gb,
            num_groups, d, length, c, *strides, *_strides(dx), w_sn, w_sc, count,
            HAS_W=weight is not None, WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db,
            BLOCK_D=plan.block_d, BLOCK_L=plan.block_l, num_warps=plan.num_warps,
        )
        return gi, gw, gb
    sums = torch.empty((2, groups, plan.sl, d), device=x.device, dtype=torch.float32)
    tile = dict(BLOCK_D=plan.block_d, BLOCK_L=plan.block_l, num_warps=plan.num_warps)
    k.backward_partial[(groups, plan.chunks)](
        dy, x, mean, sums[0], sums[1], num_groups, d, length, *strides, plan.sl, **tile,
    )
    coef = torch.empty((groups, 2), device=x.device, dtype=torch.float32)
    merge_d = min(triton.next_power_of_2(d), _MERGE_BLOCK)
    k.backward_merge[(groups,)](
        sums[0], sums[1], rstd, w, x if gw is None else gw, x if gb is None else gb, coef,
        num_groups, d, c, plan.sl, w_sn, w_sc, count,
        HAS_W=weight is not None, WANT_DW=want_dw, WANT_DB=want_db,
        BLOCK_S=max(1, min(triton.next_power_of_2(plan.sl), _MERGE_BLOCK * 4 // merge_d)),
        BLOCK_D=merge_d,
    )
    if want_dx:
        k.backward_grad_input[(groups, plan.chunks)](
            dy, x, mean, rstd, w, coef, dx, num_groups, d, length, *strides, *_strides(dx),
            w_sn, w_sc, plan.sl, HAS_W=weight is not None, **tile,
        )
    return gi, gw, gb
