"""GroupNorm derivatives that the kernels do not provide, as ATen ops: forward-mode AD
(jvp, jacfwd) of the forward op, and the derivative of the backward op (double backward,
taken with ``torch.func.vjp`` so that it also works inside torch.func transforms).

They recompute the statistics from ``input`` rather than use the saved ones, so that
the statistics' dependence on ``input`` is differentiated too. Only those derivatives
pay for this; the ops themselves run the fast kernels.
"""

import torch

from ..shared.checks import acc_dtype


def stats(input, num_groups, eps):
    """``(x as [N, G, D*L] in the accumulation dtype, mean, rstd)``, both ``[N, G, 1]``."""
    x = input.to(acc_dtype(input.dtype)).reshape(input.shape[0], num_groups, -1)
    var, mean = torch.var_mean(x, dim=2, correction=0, keepdim=True)
    return x, mean, torch.rsqrt(var + eps)


def forward_jvp(input, weight, bias, num_groups, eps, tangents):
    """The output's tangent given the inputs' tangents (None entries count as zeros), in
    closed form: with x_hat = (x - mean) * rstd and means over each group,
    d x_hat = rstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)),
    d y = d x_hat * w + x_hat * dw + db."""
    n, c = input.shape[0], input.shape[1]
    dx, dw, db = tangents
    x, mean, rstd = stats(input, num_groups, eps)
    x_hat = (x - mean) * rstd
    out = torch.zeros_like(x_hat)
    if dx is not None:
        dx = dx.to(x.dtype).reshape(x.shape)
        out = rstd * (dx - dx.mean(2, keepdim=True) - x_hat * (x_hat * dx).mean(2, keepdim=True))
        if weight is not None:
            out = (out.reshape(n, c, -1) * weight.expand(n, c).unsqueeze(-1)).reshape(x.shape)
    out = out.reshape(n, c, -1)
    if dw is not None:
        out = out + x_hat.reshape(n, c, -1) * dw.expand(n, c).unsqueeze(-1)
    if db is not None:
        out = out + db.expand(n, c).unsqueeze(-1)
    return out.reshape(input.shape).to(input.dtype)


def explicit_backward(grad_out, input, weight, num_groups, eps, output_mask):
    """(grad_input, per-sample grad_weight, per-sample grad_bias) as ATen ops.

    ``weight`` is a ``[C]`` or ``[N, C]`` tensor (ones when the op had none).
    """
    n, c = input.shape[0], input.shape[1]
    x, mean, rstd = stats(input, num_groups, eps)
    dy = grad_out.to(x.dtype).reshape(n, num_groups, -1)
    x_hat = (x - mean) * rstd
    spatial = (n, c, -1)
    outs = []
    if output_mask[0]:
        g = (dy.reshape(spatial) * weight.expand(n, c).to(x.dtype).unsqueeze(-1)).reshape(dy.shape)
        gi = rstd * (g - g.mean(2, keepdim=True) - x_hat * (g * x_hat).mean(2, keepdim=True))
        outs.append(gi.reshape(input.shape).to(input.dtype))
    if output_mask[1]:
        outs.append((dy * x_hat).reshape(spatial).sum(2))
    if output_mask[2]:
        outs.append(dy.reshape(spatial).sum(2))
    return tuple(outs)
