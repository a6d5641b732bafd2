"""Opacus grad samplers backed by the persample backward ops.

``import persample.opacus`` registers samplers for :class:`persample.nn.GroupNorm`,
:class:`~persample.nn.LayerNorm` and :class:`~persample.nn.RMSNorm`, so that Opacus's ``GradSampleModule`` (hooks mode) and ``PrivacyEngine`` accept models
that hold it. The per-sample gradients come from one call of the backward op, on the
statistics that the layer's own forward computed: no recomputation of the
normalisation, where Opacus's stock ``nn.GroupNorm`` sampler recomputes
``F.group_norm``, multiplies and reduces.

``register_for_torch_group_norm()`` opts in to the same sampler for stock
``nn.GroupNorm``, ``register_for_torch_norms()`` for stock ``nn.GroupNorm``,
``nn.LayerNorm`` and ``nn.RMSNorm``. Their forward keeps no statistics, so the sampler
recomputes only those (one reduction over the input) before the backward op.
"""

import torch
from opacus.grad_sample import register_grad_sampler

from . import nn as _nn
from .ops.group_norm.composite import stats
from .ops.library import group_norm_backward_op, layer_norm_backward_op, rms_norm_backward_op
from .ops.row_norm.composite import stats as row_stats

__all__ = [
    "compute_group_norm_grad_sample",
    "compute_layer_norm_grad_sample",
    "compute_rms_norm_grad_sample",
    "register_for_torch_group_norm",
    "register_for_torch_norms",
]


def _statistics(layer, x):
    saved = _nn.pop_stats(layer, x) if isinstance(layer, _nn.GroupNorm) else None
    if saved is not None:
        return saved
    _, mean, rstd = stats(x, _groups(layer), layer.eps)
    return mean.squeeze(-1), rstd.squeeze(-1)


def _groups(layer):
    """GroupNorm's groups; an InstanceNorm is a GroupNorm with one channel per group."""
    return getattr(layer, "num_groups", None) or layer.num_features


@register_grad_sampler([_nn.GroupNorm, _nn.InstanceNorm1d, _nn.InstanceNorm2d, _nn.InstanceNorm3d])
def compute_group_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler: ``{param: Tensor[N, C]}`` for a GroupNorm layer, or a
    persample InstanceNorm (batched input: Opacus is batch-first).

    Args:
        layer (nn.GroupNorm): the layer (persample's, or stock after the opt-in).
        activations (list[Tensor[N, C, *]]): the layer's input, as Opacus captured it.
        backprops (Tensor[N, C, *]): gradient of the loss w.r.t. the layer's output,
            already scaled by Opacus for its ``loss_reduction``.
    """
    x = activations[0]
    wanted = _wanted(layer)
    mean, rstd = _statistics(layer, x)
    weight = layer.weight.detach() if layer.weight is not None else None
    _, gw, gb = group_norm_backward_op(
        backprops.to(x.dtype), x, mean, rstd, weight, _groups(layer), [False, *wanted]
    )
    return _param_grads(layer, (gw, gb), wanted)


def register_for_torch_group_norm():
    """Use the persample sampler for stock ``nn.GroupNorm`` too (replacing Opacus's)."""
    register_grad_sampler(torch.nn.GroupNorm)(compute_group_norm_grad_sample)


def _wanted(layer):
    return [getattr(layer, name, None) is not None and getattr(layer, name).requires_grad for name in ("weight", "bias")]


def _param_grads(layer, grads, wanted):
    return {
        getattr(layer, name): g.to(getattr(layer, name).dtype)
        for name, g, want in zip(("weight", "bias"), grads, wanted)
        if want
    }


def _row_statistics(layer, x, rms):
    saved = _nn.pop_stats(layer, x) if isinstance(layer, _nn.PerSampleNorm) else None
    if saved is not None:
        return saved
    return row_stats(x, list(layer.normalized_shape), layer.eps, rms)


@register_grad_sampler(_nn.LayerNorm)
def compute_layer_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler: ``{param: Tensor[N, *normalized_shape]}`` for a LayerNorm
    (persample's, or stock after the opt-in); arguments as
    :func:`compute_group_norm_grad_sample`'s. Batch-first, as Opacus's own."""
    x = activations[0]
    wanted = _wanted(layer)
    mean, rstd = _row_statistics(layer, x, rms=False)
    weight = layer.weight.detach() if layer.weight is not None else None
    _, gw, gb = layer_norm_backward_op(
        backprops.to(x.dtype), x, list(layer.normalized_shape), mean, rstd, weight, [False, *wanted], layer.eps
    )
    return _param_grads(layer, (gw, gb), wanted)


@register_grad_sampler(_nn.RMSNorm)
def compute_rms_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler: ``{weight: Tensor[N, *normalized_shape]}`` for an RMSNorm."""
    x = activations[0]
    wanted = _wanted(layer)[:1]
    (rstd,) = _row_statistics(layer, x, rms=True)
    _, gw = rms_norm_backward_op(
        backprops.to(x.dtype), x, list(layer.normalized_shape), rstd, layer.weight.detach(), [False, *wanted], layer.eps
    )
    return _param_grads(layer, (gw,), wanted)


def register_for_torch_norms():
    """Use the persample samplers for stock ``nn.GroupNorm``, ``nn.LayerNorm`` and
    ``nn.RMSNorm`` too (replacing Opacus's)."""
    register_for_torch_group_norm()
    register_grad_sampler(torch.nn.LayerNorm)(compute_layer_norm_grad_sample)
    register_grad_sampler(torch.nn.RMSNorm)(compute_rms_norm_grad_sample)
