"""Row-norm derivatives that the kernels do not provide, as ATen ops: forward-mode AD of
the forward ops, and the explicit backward that double backward differentiates (read
ops/group_norm/composite.py, the group_norm counterpart, for why the statistics are recomputed)."""

import torch

from ..shared.checks import acc_dtype
from .checks import rms_eps, rows, stats_shape


def _rows(input, normalized_shape):
    """``(x as [N, M, D] in the accumulation dtype, mean or None, rstd)``, stats
    ``[N, M, 1]``."""
    n, m, d = rows(input, normalized_shape)
    return input.to(acc_dtype(input.dtype)).reshape(n, m, d)


def _var_mean(x, keepdim=False):
    # Not torch.var_mean: it warns ("degrees of freedom is <= 0") on rows of an empty
    # [N, 0, D] input, which have no elements to warn about.
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=keepdim)
    return var, mean if keepdim else mean.squeeze(-1)


def _normalise(x, eps, rms):
    if rms:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return x * rstd, rstd
    var, mean = _var_mean(x, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mean) * rstd, rstd


def stats(input, normalized_shape, eps, rms):
    """The forward op's statistics, ``(mean, rstd)`` or ``(rstd,)``, in its shapes and
    dtypes, for callers that did not keep them (Opacus samplers of stock layers)."""
    x = _rows(input, normalized_shape)
    shape = stats_shape(input, normalized_shape)
    if rms:
        rstd = torch.rsqrt(x.square().mean(-1) + rms_eps(eps, input.dtype))
        return (rstd.reshape(shape),)
    var, mean = _var_mean(x)
    return mean.reshape(shape), torch.rsqrt(var + eps).reshape(shape)


def _param(p, normalized_shape, n, dtype):
    """A ``[*ns]`` or ``[N, *ns]`` parameter as ``[D]`` or ``[N, 1, D]``."""
    p = p.to(dtype)
    return p.reshape(-1) if p.dim() == len(normalized_shape) else p.reshape(n, 1, -1)


def _centre(g, x_hat, rms):
    """rstd * (the part of g orthogonal to what the normalisation removes)."""
    out = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
    return out if rms else out - g.mean(-1, keepdim=True)


def forward_jvp(input, normalized_shape, weight, bias, eps, rms, tangents):
    """The output's tangent given (input, weight, bias) tangents, None counting as zeros:
    d y = d x_hat * w + x_hat * dw + db, with d x_hat = rstd * centre(dx)."""
    dx, dw, db = tangents
    x = _rows(input, normalized_shape)
    n, dtype = x.shape[0], x.dtype
    x_hat, rstd = _normalise(x, eps, rms)
    out = torch.zeros_like(x_hat)
    if dx is not None:
        out = rstd * _centre(dx.to(dtype).reshape(x.shape), x_hat, rms)
        if weight is not None:
            out = out * _param(weight, normalized_shape, n, dtype)
    if dw is not None:
        out = out + x_hat * _param(dw, normalized_shape, n, dtype)
    if db is not None:
        out = out + _param(db, normalized_shape, n, dtype)
    return out.reshape(input.shape).to(input.dtype)


def explicit_backward(grad_out, input, normalized_shape, weight, eps, rms, output_mask):
    """(grad_input, per-sample grad_weight, per-sample grad_bias), the unmasked ones, as
    differentiable ATen ops; ``weight`` is a tensor (ones when the op had none)."""
    x = _rows(input, normalized_shape)
    n, dtype = x.shape[0], x.dtype
    dy = grad_out.to(dtype).reshape(x.shape)
    x_hat, rstd = _normalise(x, eps, rms)
    per_sample = (n, *normalized_shape)
    outs = []
    if output_mask[0]:
        g = dy * _param(weight, normalized_shape, n, dtype)
        outs.append((rstd * _centre(g, x_hat, rms)).reshape(input.shape).to(input.dtype))
    if output_mask[1]:
        outs.append((dy * x_hat).sum(1).reshape(per_sample))
    if len(output_mask) > 2 and output_mask[2]:
        outs.append(dy.sum(1).reshape(per_sample))
    return tuple(outs)
