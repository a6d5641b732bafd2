"""Per-sample GroupNorm built from ATen's fused GroupNorm kernels.

GroupNorm of ``[N, C, *]`` with G groups equals GroupNorm of ``[1, N*C, L]`` with N*G
groups and an ``[N*C]`` weight, because groups never cross samples. On that view ATen's
"dgamma" *is* the per-sample weight gradient, for the cost of one plain backward. The
view needs the contiguous layout; channels_last gets its own backward below. Every
function here first makes its tensors dense with canonical strides (``layout.dense``),
so that ATen's kernels read them in the layout decided here.

Reduced-precision (fp16/bf16) inputs take fp32 params: that is ATen's mixed-dtype path,
which keeps the saved statistics in fp32 instead of rounding them to the input dtype.
"""

import torch

from .checks import acc_dtype, check_group_norm_backward, grad_param_dtype
from .layout import CONTIGUOUS, dense

_aten_backward = torch.ops.aten.native_group_norm_backward.default


def sizes(input):
    n, c = input.shape[0], input.shape[1]
    return n, c, input.numel() // (n * c)


def shared_row(p):
    """The ``[C]`` row of a parameter whose rows are one row (``param.expand(N, C)``,
    stride 0 over N, or N = 1), else None: ATen's own kernels serve those."""
    if p is None or p.dim() == 1:
        return p
    if p.shape[0] == 1 or p.stride(0) == 0:
        return p[0]
    return None


def _as(p, dtype):
    """``p`` in ``dtype``, contiguous: ATen's kernels read params and statistics as
    dense arrays without checking their strides."""
    if p is None:
        return p
    return (p if p.dtype == dtype else p.to(dtype)).contiguous()


def _flat(p, n, c, dtype):
    """``[N*C]`` form of a ``[C]`` or ``[N, C]`` parameter, dense."""
    if p is None:
        return None
    if p.dtype != dtype:
        p = p.to(dtype)
    # reshape() may return a strided view, which ATen would misread.
    return p.repeat(n) if p.dim() == 1 else p.reshape(n * c).contiguous()


def _bcast(t, input):
    """``[N, C]`` -> ``[N, C, 1, ...]``, to broadcast against ``input``."""
    return t.view(t.shape + (1,) * (input.dim() - 2))


# ATen's GroupNorm kernels take N, C and HxW as arguments and check only numel() against
# them, so the per-sample view is passed as (N, C, HxW) = (1, N*C, L) on the tensors as
# they are: no reshaping, which costs ~1 us a view at small shapes.


def forward(input, num_groups, weight, bias, eps):
    """Output (dense, in the layout ``layout.dense`` picks for ``input``), mean, rstd."""
    input, fmt = dense(input)
    dtype = acc_dtype(input.dtype)
    if fmt != CONTIGUOUS or dtype != input.dtype:
        return forward_centred(input, num_groups, weight, bias, eps)
    n, c, length = sizes(input)
    w_row, b_row = shared_row(weight), shared_row(bias)
    if (w_row is not None or weight is None) and (b_row is not None or bias is None):
        w, b = _as(w_row, dtype), _as(b_row, dtype)
        if w is None and b is None and dtype != input.dtype:
            w = input.new_ones((c,), dtype=dtype)
        return torch.native_group_norm(input, w, b, n, c, length, num_groups, eps)
    w, b = _flat(weight, n, c, dtype), _flat(bias, n, c, dtype)
    out, mean, rstd = torch.native_group_norm(input, w, b, 1, n * c, length, n * num_groups, eps)
    return out, mean.view(n, num_groups), rstd.view(n, num_groups)


def forward_centred(input, num_groups, weight, bias, eps):
    """channels_last, and fp16/bf16 in any layout, from ATen ops: ATen's channels_last
    GroupNorm kernel takes the variance as E[x^2] - mean^2, which cancels when
    |mean| >> std (measured in fp32 at mean/std = 1e3: output error 0.29, against 8e-5
    from its contiguous kernel), and its mixed-dtype fp16/bf16 kernel loses ~6e-6 of
    rstd at mean/std ~ 1e3, which the centred backward's per-sample dgamma carries
    (measured: 3x stock's dgamma error, though stock's rstd is as far off). So the
    statistics come from ``var_mean`` (Welford) over the rows as they lie in memory,
    and elementwise ops normalise, centred on a float64 mean for fp32 input (one
    rounded to fp32 would cost its rounding error times rstd when |mean| >> std). The
    C++ library has a faster kernel for it."""
    n, c, length = sizes(input)
    d, dtype = c // num_groups, acc_dtype(input.dtype)
    work = torch.float64 if dtype == torch.float32 and input.dtype == dtype else dtype
    rows = input.movedim(1, -1).reshape(n, length, num_groups, d)
    var, mean = torch.var_mean(rows.to(work), dim=(1, 3), correction=0)
    rstd = torch.rsqrt(var + eps)
    scale = rstd.repeat_interleave(d, 1)
    if weight is not None:
        scale = scale * _as(weight, work)
    out = (input.to(work) - _bcast(mean.repeat_interleave(d, 1), input)) * _bcast(scale, input)
    if bias is not None:
        out = out + _bcast(_as(bias, work).expand(n, c), input)
    return out.to(input.dtype), mean.to(dtype), rstd.to(dtype)


def backward(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """Contiguous layout, on the per-sample view (fp16/bf16: :func:`backward_centred`).
    Returns grad_input and per-sample ``[N, C]`` grads, each None where ``output_mask``
    says so."""
    dtype = acc_dtype(input.dtype)
    if dtype != input.dtype:
        return backward_centred(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    input, _ = dense(input, CONTIGUOUS)
    grad_out, _ = dense(grad_out, CONTIGUOUS)
    n, c, length = sizes(input)
    w = _flat(weight, n, c, dtype)
    if w is None:
        w = input.new_ones((n * c,), dtype=dtype)
    # contiguous() throughout: ATen's backward reads every argument as a dense array
    # without checking strides, and autograd hands in expanded (stride-0) grad_outs.
    gi, gw, gb = _aten_backward(
        grad_out, input, mean.contiguous(), rstd.contiguous(), w,
        1, n * c, length, n * num_groups, output_mask,
    )
    return gi, _param_grad(gw, input, weight), _param_grad(gb, input, weight)


def _param_grad(g, input, weight):
    """ATen's ``[N*C]`` gradient of the view's weight as the ``[N, C]`` per-sample one,
    in the dtype the backward op declares."""
    if g is None:
        return None
    g = g.view(input.shape[0], input.shape[1])
    dtype = grad_param_dtype(input, weight)
    return g if g.dtype == dtype else g.to(dtype)


def backward_centred(grad_out, input, mean, rstd, weight, num_groups, output_mask):
    """channels_last, and fp16/bf16 in any layout, from ATen ops. channels_last does not
    admit the per-sample view, and ATen's kernels take differences
    (``sum dy*x - mean*sum dy``) that cancel when |mean| >> std, which its mixed-dtype
    fp16/bf16 kernel makes worse than stock's own fp16 error. So per-(sample, channel)
    sums of ``dy`` and ``dy * (x - mean)`` over the rows as they lie in memory give the
    per-sample grads and, in closed form, grad_input (the C++ library's fused kernel
    does the same in one pass)."""
    input, fmt = dense(input)
    grad_out, _ = dense(grad_out, fmt)
    n, c, length = sizes(input)
    d, dtype = c // num_groups, acc_dtype(input.dtype)
    x = input.movedim(1, -1).reshape(n, length, c).to(dtype)  # [N, L, C]: memory order
    dy = grad_out.movedim(1, -1).reshape(n, length, c).to(dtype)
    centred = x - mean.to(dtype).repeat_interleave(d, 1)[:, None]
    # Measured from the group's exact mean: the saved one is rounded to fp32.
    lo = centred.view(n, length, num_groups, d).mean((1, 3))
    centred = centred - lo.repeat_interleave(d, 1)[:, None]
    rstd_c = rstd.to(dtype).repeat_interleave(d, 1)
    dy_centred, dy_sum = (dy * centred).sum(1), dy.sum(1)
    gi = None
    if output_mask[0]:
        gamma = rstd_c.new_ones(()) if weight is None else _as(weight, dtype).expand(n, c)
        a = (gamma * dy_centred).view(n, num_groups, d).sum(2)
        b = (gamma * dy_sum).view(n, num_groups, d).sum(2)
        count = d * length
        c2 = (-a * rstd**3 / count).repeat_interleave(d, 1)[:, None]
        c3 = (-b * rstd / count).repeat_interleave(d, 1)[:, None]
        rows = (rstd_c * gamma)[:, None] * dy + c2 * centred + c3
        gi = rows.view(n, *input.shape[2:], c).movedim(-1, 1).to(input.dtype)
    gw = dy_centred * rstd_c if output_mask[1] else None
    gb = dy_sum if output_mask[2] else None
    return gi, _param_grad(gw, input, weight), _param_grad(gb, input, weight)


def backward_op_kernel(body):
    """The backward op's kernel around a device's unchecked backward ``body``: the op
    validates its arguments, which autograd's direct call (ops/autograd.py) skips."""

    def kernel(grad_out, input, mean, rstd, weight, num_groups, output_mask, eps=1e-5):
        check_group_norm_backward(grad_out, input, mean, rstd, weight, num_groups, eps)
        grads = body(grad_out, input, mean, rstd, weight, num_groups, output_mask)
        return _with_placeholders(input, weight, output_mask, grads)

    return kernel


def _with_placeholders(input, weight, output_mask, grads):
    """A masked-out gradient becomes an empty tensor (the schema returns Tensor, not
    Tensor?)."""
    gi, gw, gb = grads
    if gi is not None and gw is not None and gb is not None:
        return grads
    dtype = grad_param_dtype(input, weight)
    return (
        gi if output_mask[0] else input.new_empty((0,)),
        gw if output_mask[1] else input.new_empty((0,), dtype=dtype),
        gb if output_mask[2] else input.new_empty((0,), dtype=dtype),
    )


def empty_forward(input, num_groups, fmt):
    # The statistics of an empty group are zeros here, not ATen's NaN rstd.
    stats = input.new_zeros((input.shape[0], num_groups), dtype=acc_dtype(input.dtype))
    return torch.empty_like(input, memory_format=fmt), stats, stats.clone()


def empty_backward(input, weight, output_mask, fmt):
    dtype = grad_param_dtype(input, weight)
    per_sample = (input.shape[0], input.shape[1])
    return (
        torch.empty_like(input, memory_format=fmt) if output_mask[0] else None,
        input.new_zeros(per_sample, dtype=dtype) if output_mask[1] else None,
        input.new_zeros(per_sample, dtype=dtype) if output_mask[2] else None,
    )
