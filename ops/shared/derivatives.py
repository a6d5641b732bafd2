"""What the norms' double backward shares (ops/autograd.py): the vjp of an explicit
backward formula, each norm's own in its composite module."""

import torch


def vjp_of(explicit, grad_out, input, weight, weight_shape, cotangents):
    """The double backward of any norm: gradients w.r.t. (grad_out, input, weight) of
    ``explicit(grad_out, input, weight)``'s outputs, given their cotangents (None
    entries count as zeros). A None ``weight`` is ones of ``weight_shape`` there, and
    gets no gradient."""
    if not cotangents:  # every output masked out: the empty placeholders depend on nothing
        return None, None, None
    w = weight if weight is not None else input.new_ones(weight_shape)
    outs, pullback = torch.func.vjp(explicit, grad_out, input, w)
    cot = tuple(torch.zeros_like(o) if t is None else t.to(o.dtype) for o, t in zip(outs, cotangents))
    d_grad_out, d_input, d_weight = pullback(cot)
    return d_grad_out, d_input, (d_weight if weight is not None else None)
