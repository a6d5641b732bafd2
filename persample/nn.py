"""Drop-ins for ``nn.GroupNorm``, ``nn.LayerNorm`` and ``nn.RMSNorm`` whose forward runs
through the persample operators."""

import torch

from . import leaves
from .ops.group_norm import eager
from .ops.functional import aten_group_norm, aten_row_norm, group_norm, use_aten
from .ops.library import group_norm_op, layer_norm_op, rms_norm_op

__all__ = [
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "PerSampleNorm",
    "RMSNorm",
    "convert_group_norm",
    "revert_group_norm",
]


class PerSampleNorm:
    """What the persample norm layers share: the per-sample leaves of
    ``persample.call_for_per_sample_grads`` and the statistics kept for Opacus."""

    # Zero [N, *param.shape] leaves that persample.call_for_per_sample_grads attaches
    # for one call: adding them to the shared parameters leaves the output unchanged, and
    # their gradients are the per-sample gradients (the parameters still get the batch sum).
    _weight_sample = None
    _bias_sample = None

    def _params(self):
        """The parameters this forward uses: the layer's, plus the leaves if attached."""
        weight, bias = self.weight, getattr(self, "bias", None)
        samples = self._weight_sample, self._bias_sample
        if samples[0] is None and samples[1] is None:  # checkpointing: see persample/leaves.py
            samples = leaves.current(None, self) or samples
        if samples[0] is not None:
            weight = weight + samples[0]
        if samples[1] is not None:
            bias = bias + samples[1]
        return weight, bias

    def _stashing(self):
        """Whether to keep this forward's statistics for a hook-based sampler."""
        return bool(self._forward_hooks) and self.training and not torch.compiler.is_compiling()


class GroupNorm(PerSampleNorm, torch.nn.GroupNorm):
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

    def forward(self, input):
        weight, bias = self._params()
        stash = self._stashing()
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


class LayerNorm(PerSampleNorm, torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` backed by ``persample::layer_norm``.

    Same constructor, ``state_dict`` keys and ``extra_repr``; it loads an
    ``nn.LayerNorm`` state dict as is. Batch-first: dim 0 of the input is the sample
    dim, which may not be normalised (see :func:`persample.layer_norm`).
    ``weight`` and ``bias`` may be swapped for ``[N, *normalized_shape]`` per-sample
    tensors with ``torch.func.functional_call``, whose gradients are then the
    per-sample gradients.

    Shape:
        - Input: ``(N, *, *normalized_shape)``
        - Output: same shape as the input.

    Example:
        >>> ln = persample.nn.LayerNorm(32)
        >>> x = torch.randn(4, 16, 32)
        >>> w = ln.weight.detach().expand(4, -1).requires_grad_()
        >>> torch.func.functional_call(ln, {"weight": w, "bias": ln.bias}, (x,)).sum().backward()
        >>> w.grad.shape
        torch.Size([4, 32])
    """

    def forward(self, input):
        weight, bias = self._params()
        if use_aten(input):
            return aten_row_norm(input, list(self.normalized_shape), weight, bias, self.eps, rms=False)
        out, mean, rstd = layer_norm_op(input, list(self.normalized_shape), weight, bias, self.eps)
        if self._stashing():
            _stash_stats(self, input, mean, rstd)
        return out


class RMSNorm(PerSampleNorm, torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` backed by ``persample::rms_norm``.

    Same constructor, ``state_dict`` keys and ``extra_repr``. Batch-first, like
    :class:`LayerNorm`; ``weight`` may be swapped for an ``[N, *normalized_shape]``
    per-sample tensor.

    Shape:
        - Input: ``(N, *, *normalized_shape)``
        - Output: same shape as the input.
    """

    def forward(self, input):
        weight, _ = self._params()
        if use_aten(input):
            return aten_row_norm(input, list(self.normalized_shape), weight, None, self.eps, rms=True)
        out, rstd = rms_norm_op(input, list(self.normalized_shape), weight, self.eps)
        if self._stashing():
            _stash_stats(self, input, rstd)
        return out


class _InstanceNorm(PerSampleNorm):
    """InstanceNorm without running statistics is GroupNorm with one channel per group,
    so it runs ``persample::group_norm`` with ``num_groups = C``. Running statistics are
    a batch average, which has no per-sample form: they are refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.track_running_stats:
            raise ValueError(
                f"persample.nn.{type(self).__name__}: track_running_stats=True is not supported "
                "(running statistics are a batch average, with no per-sample gradient); "
                f"use torch.nn.{type(self).__name__}"
            )

    # Stock forward's checks (a ValueError for a channel count that differs from an
    # affine layer's, a warning otherwise) and unbatched input, then this, batched.
    def _apply_instance_norm(self, input):
        weight, bias = self._params() if self.affine else (None, None)
        return group_norm(input, input.shape[1], weight, bias, self.eps)


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """Drop-in for :class:`torch.nn.InstanceNorm1d` (``track_running_stats=False``)
    backed by ``persample::group_norm`` with one channel per group."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """Drop-in for :class:`torch.nn.InstanceNorm2d` (``track_running_stats=False``)
    backed by ``persample::group_norm`` with one channel per group."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """Drop-in for :class:`torch.nn.InstanceNorm3d` (``track_running_stats=False``)
    backed by ``persample::group_norm`` with one channel per group."""


def _stash_stats(layer, input, *stats):
    """Keep this call's statistics (mean and rstd, or rstd alone) for a hook-based per-sample sampler
    (``persample.opacus``), so that it needs no recomputation. Keyed by the input's
    storage and strides, bounded, so that unclaimed entries cannot pile up. The strides
    tell apart a permuted view of the same storage and shape (Opacus's
    ``batch_first=False`` moves the batch dim to the front), whose rows differ."""
    stash = layer.__dict__.setdefault("_saved_stats", [])
    stash.append((input.data_ptr(), input.shape, input.stride(), *(t.detach() for t in stats)))
    del stash[:-4]


def pop_stats(layer, input):
    """The statistics that ``layer``'s forward computed for ``input``, or None."""
    stash = layer.__dict__.get("_saved_stats", [])
    for i in range(len(stash) - 1, -1, -1):
        ptr, shape, stride, *stats = stash[i]
        if ptr == input.data_ptr() and shape == input.shape and stride == input.stride():
            del stash[i]
            return tuple(stats)
    return None


def convert_group_norm(module):
    """Route every group norm of ``module`` through persample. See
    :func:`persample.convert.convert_group_norm`."""
    from . import convert

    return convert.convert_group_norm(module)


def revert_group_norm(module):
    """The inverse of :func:`convert_group_norm`. See
    :func:`persample.convert.revert_norms`."""
    from . import convert

    return convert.revert_norms(module)
