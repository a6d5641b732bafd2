"""``nn.GroupNorm`` drop-in whose forward runs through ``persample::group_norm``."""

import torch

from .ops import eager
from .ops.functional import aten_group_norm, use_aten
from .ops.library import group_norm_op

__all__ = ["GroupNorm", "convert_group_norm", "revert_group_norm"]


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` backed by the persample operator.

    Same constructor, ``state_dict`` keys and ``extra_repr``; it loads an
    ``nn.GroupNorm`` state dict as is. ``weight`` and ``bias`` are ``[C]`` parameters,
    and may be swapped for ``[N, C]`` per-sample tensors with
    ``torch.func.functional_call``, whose gradients are then the per-sample gradients.

    Args:
        num_groups (int): number of groups to separate the channels into.
        num_channels (int): C, the number of channels expected in the input.
        eps (float): added to the variance for numerical stability. Default: 1e-5.
        affine (bool): learnable per-channel weight (ones) and bias (zeros). Default: True.

    Shape:
        - Input: ``(N, C, *)``
        - Output: ``(N, C, *)``, same shape as the input.

    Example:
        >>> gn = persample.nn.GroupNorm(2, 6)
        >>> x = torch.randn(4, 6, 5, 5)
        >>> w = gn.weight.detach().expand(4, -1).requires_grad_()
        >>> y = torch.func.functional_call(gn, {"weight": w, "bias": gn.bias}, (x,))
        >>> y.sum().backward()
        >>> w.grad.shape  # one gradient row per sample
        torch.Size([4, 6])
    """

    # Zero [N, C] leaves that persample.call_for_per_sample_grads attaches for one call:
    # adding them to the shared parameters leaves the output unchanged, and their
    # gradients are the per-sample gradients (the parameters still get the batch sum).
    _weight_sample = None
    _bias_sample = None

    def forward(self, input):
        weight, bias = self.weight, self.bias
        if self._weight_sample is not None:
            weight = weight + self._weight_sample
        if self._bias_sample is not None:
            bias = bias + self._bias_sample
        stash = bool(self._forward_hooks) and self.training and not torch.compiler.is_compiling()
        fast = eager.fast_op(input, stats=stash)
        if fast is not None and not stash:
            return fast(input, self.num_groups, weight, bias, self.eps)
        if use_aten(input):
            return aten_group_norm(input, self.num_groups, weight, bias, self.eps)
        op = group_norm_op if fast is None else fast
        out, mean, rstd = op(input, self.num_groups, weight, bias, self.eps)
        if stash:
            _stash_stats(self, input, mean, rstd)
        return out


def _stash_stats(layer, input, mean, rstd):
    """Keep this call's statistics for a hook-based per-sample sampler
    (``persample.opacus``), so that it needs no recomputation. Keyed by the input's
    storage, bounded, so that unclaimed entries cannot pile up."""
    stash = layer.__dict__.setdefault("_saved_stats", [])
    stash.append((input.data_ptr(), input.shape, mean.detach(), rstd.detach()))
    del stash[:-4]


def pop_stats(layer, input):
    """The statistics that ``layer``'s forward computed for ``input``, or None."""
    stash = layer.__dict__.get("_saved_stats", [])
    for i in range(len(stash) - 1, -1, -1):
        ptr, shape, mean, rstd = stash[i]
        if ptr == input.data_ptr() and shape == input.shape:
            del stash[i]
            return mean, rstd
    return None


def convert_group_norm(module):
    """Replace every ``nn.GroupNorm`` in ``module`` with :class:`persample.nn.GroupNorm`.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the replacements share the original
    ``Parameter`` objects (so an optimizer built before the call keeps working), and the
    converted module is returned (``module`` itself is converted in place unless it is
    a GroupNorm).

    Args:
        module (nn.Module): a model, or a single ``nn.GroupNorm``.

    Returns:
        nn.Module: the converted module.
    """
    if type(module) is torch.nn.GroupNorm:
        new = GroupNorm(
            module.num_groups, module.num_channels, module.eps, affine=False
        )
        new.affine = module.affine
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_group_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def revert_group_norm(module):
    """Replace every :class:`persample.nn.GroupNorm` in ``module`` with a stock
    ``nn.GroupNorm``: the inverse of :func:`convert_group_norm`.

    For a model that must not depend on persample, e.g. one trained with per-sample
    gradients and then deployed. The replacements share the original ``Parameter``
    objects (an optimizer built before the call keeps working) and keep ``eps``,
    ``affine``, the training flag and the ``state_dict`` keys; the converted module is
    returned (``module`` itself is converted in place unless it is a GroupNorm).

    Args:
        module (nn.Module): a model, or a single ``persample.nn.GroupNorm``.

    Returns:
        nn.Module: the converted module.
    """
    if type(module) is GroupNorm:
        new = torch.nn.GroupNorm(module.num_groups, module.num_channels, module.eps, affine=False)
        new.affine = module.affine
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = revert_group_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
