"""``nn.GroupNorm`` drop-in whose forward runs through ``persample::group_norm``."""

import torch

from . import leaves
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
        samples = self._weight_sample, self._bias_sample
        if samples[0] is None and samples[1] is None:  # checkpointing: see persample/leaves.py
            samples = leaves.current(None, self) or samples
        if samples[0] is not None:
            weight = weight + samples[0]
        if samples[1] is not None:
            bias = bias + samples[1]
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
    """Route every group norm of ``module`` through persample: stock ``nn.GroupNorm``
    layers become :class:`GroupNorm`, subclasses and modules that call ``F.group_norm``
    keep their forward, which then calls persample. See
    :func:`persample.convert.convert_group_norm`."""
    from . import convert

    return convert.convert_group_norm(module)


def revert_group_norm(module):
    """The inverse of :func:`convert_group_norm`. See
    :func:`persample.convert.revert_group_norm`."""
    from . import convert

    return convert.revert_group_norm(module)
