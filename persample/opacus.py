"""Opacus grad samplers backed by ``persample::group_norm_backward``.

``import persample.opacus`` registers the sampler for :class:`persample.nn.GroupNorm`,
so that Opacus's ``GradSampleModule`` (hooks mode) and ``PrivacyEngine`` accept models
that hold it. The per-sample gradients come from one call of the backward op, on the
statistics that the layer's own forward computed: no recomputation of the
normalisation, where Opacus's stock ``nn.GroupNorm`` sampler recomputes
``F.group_norm``, multiplies and reduces.

``register_for_torch_group_norm()`` opts in to the same sampler for stock
``nn.GroupNorm``. Its forward keeps no statistics, so the sampler recomputes only the
mean and variance (one reduction over the input) before the backward op.
"""

import torch
from opacus.grad_sample import register_grad_sampler

from . import nn as _nn
from .ops.composite import stats
from .ops.library import group_norm_backward_op

__all__ = ["compute_group_norm_grad_sample", "register_for_torch_group_norm"]


def _statistics(layer, x):
    saved = _nn.pop_stats(layer, x) if isinstance(layer, _nn.GroupNorm) else None
    if saved is not None:
        return saved
    _, mean, rstd = stats(x, layer.num_groups, layer.eps)
    return mean.squeeze(-1), rstd.squeeze(-1)


@register_grad_sampler(_nn.GroupNorm)
def compute_group_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler: ``{param: Tensor[N, C]}`` for a GroupNorm layer.

    Args:
        layer (nn.GroupNorm): the layer (persample's, or stock after the opt-in).
        activations (list[Tensor[N, C, *]]): the layer's input, as Opacus captured it.
        backprops (Tensor[N, C, *]): gradient of the loss w.r.t. the layer's output,
            already scaled by Opacus for its ``loss_reduction``.
    """
    x = activations[0]
    want_w = layer.weight is not None and layer.weight.requires_grad
    want_b = layer.bias is not None and layer.bias.requires_grad
    mean, rstd = _statistics(layer, x)
    _, gw, gb = group_norm_backward_op(
        backprops.to(x.dtype), x, mean, rstd, layer.weight.detach() if layer.weight is not None else None,
        layer.num_groups, [False, want_w, want_b],
    )
    out = {}
    if want_w:
        out[layer.weight] = gw.to(layer.weight.dtype)
    if want_b:
        out[layer.bias] = gb.to(layer.bias.dtype)
    return out


def register_for_torch_group_norm():
    """Use the persample sampler for stock ``nn.GroupNorm`` too (replacing Opacus's)."""
    register_grad_sampler(torch.nn.GroupNorm)(compute_group_norm_grad_sample)
