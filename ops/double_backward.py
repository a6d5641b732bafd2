"""The derivative of ``persample::group_norm_backward`` (double backward).

Written as differentiable ATen ops, in float64-safe closed form, and taken with
``torch.func.vjp``, so it also works inside torch.func transforms. It recomputes the
statistics from ``input`` rather than using the saved ones, so that their dependence on
``input`` is differentiated too. Only a second differentiation pays for this: the backward
op's autograd kernel records it and runs the fast kernel.
"""

import torch


def explicit_backward(grad_out, input, weight, num_groups, eps, output_mask):
    """(grad_input, per-sample grad_weight, per-sample grad_bias) as ATen ops.

    ``weight`` is a ``[C]`` or ``[N, C]`` tensor (ones when the op had none).
    """
    n, c = input.shape[0], input.shape[1]
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(acc).reshape(n, num_groups, -1)
    dy = grad_out.to(acc).reshape(n, num_groups, -1)
    var, mean = torch.var_mean(x, dim=2, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    x_hat = (x - mean) * rstd
    spatial = (n, c, -1)
    outs = []
    if output_mask[0]:
        g = (dy.reshape(spatial) * weight.expand(n, c).to(acc).unsqueeze(-1)).reshape(dy.shape)
        gi = rstd * (g - g.mean(2, keepdim=True) - x_hat * (g * x_hat).mean(2, keepdim=True))
        outs.append(gi.reshape(input.shape).to(input.dtype))
    if output_mask[1]:
        outs.append((dy * x_hat).reshape(spatial).sum(2))
    if output_mask[2]:
        outs.append(dy.reshape(spatial).sum(2))
    return tuple(outs)


def vjp(grad_out, input, weight, num_groups, eps, output_mask, cotangents):
    """Gradients w.r.t. (grad_out, input, weight) of the unmasked outputs, given their
    cotangents (None entries count as zeros). ``weight`` may be None."""
    w = weight if weight is not None else input.new_ones(input.shape[1])

    def fn(go, x, w):
        return explicit_backward(go, x, w, num_groups, eps, output_mask)

    outs, pullback = torch.func.vjp(fn, grad_out, input, w)
    cot = tuple(torch.zeros_like(o) if t is None else t.to(o.dtype) for o, t in zip(outs, cotangents))
    d_grad_out, d_input, d_weight = pullback(cot)
    return d_grad_out, d_input, (d_weight if weight is not None else None)
