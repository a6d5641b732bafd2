"""Autograd for ``persample::group_norm``: the backward is ``persample::group_norm_backward``.

Why not ``torch.library.register_autograd``: it wraps the formula in an
``autograd.Function`` whose ``apply`` refuses to run under torch.func transforms
("must override the setup_context staticmethod", pytorch/pytorch#168393, #170834,
#179652), so ``torch.func.grad`` over the op fails on torch <= 2.14.1. The easy
workaround, a Python-level Function that drops below autograd, works in eager but
dynamo cannot trace ``_AutoDispatchBelowAutograd`` (#129845).

What this module does instead is what the upstream fix (#184974) does inside
``register_autograd``: the formula lives in a ``_SingleLevelFunction`` (the base of
``autograd.Function``, which functorch itself uses for transform-local autograd nodes),
registered as the op's dispatcher-level Autograd kernel and applied under
``enable_single_level_autograd_function()`` while a transform is active. So:

- dynamo and export only ever see the op, never the Function;
- torch.func's grad/vjp reach the Autograd kernel at their level like any ATen op's
  derivative, and vmap folds into the kernels through the ops' vmap rules;
- AOTAutograd traces ``persample::group_norm_backward`` into every backward graph.

It also skips ``Function.apply``'s per-call ``inspect.signature`` binding (~40 us,
a fifth of a small GroupNorm).
"""

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

from . import composite
from .cpu import backward_cpu, group_norm_cpu
from .cuda import backward_cuda, group_norm_cuda
from .library import group_norm_backward_op, group_norm_op, lib

_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_KEY = torch._C.DispatchKey
# (forward kernel, backward kernel's unchecked body)
_BACKEND_KERNELS = {
    _KEY.CPU: (group_norm_cpu, backward_cpu),
    _KEY.CUDA: (group_norm_cuda, backward_cuda),
}


def _backend_kernels(keyset):
    """The (forward, backward) kernels that redispatching ``keyset`` below autograd
    would reach, when nothing (a mode, a subclass, functionalization, a transform) sits
    in between; else None.

    Calling them directly is that same dispatch without two Python-to-C++ round trips,
    which cost ~20 us each on a cold cache at large shapes (measured).
    """
    raw = keyset.raw_repr()
    try:
        return _KERNELS_BY_KEYSET[raw]
    except KeyError:
        # Both are fallthroughs for these ops (BackendSelect only serves factory functions).
        below = (keyset & _BELOW_AUTOGRAD).remove(_KEY.ADInplaceOrView).remove(_KEY.BackendSelect)
        kernels = _KERNELS_BY_KEYSET[raw] = _BACKEND_KERNELS.get(below.highestPriorityTypeId())
        return kernels


# Keyset arithmetic from Python costs ~3 us a call; the answers are few, so keep them.
_KERNELS_BY_KEYSET = {}
_KERNELS_BY_TLS_AND_KEYS = {}


def _plain_backend(grad_out, input, weight):
    """The backend kernels for a backward call on these tensors, as the dispatcher would
    pick them (thread-local modes included), or None."""
    tls = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    keys = [torch._C._dispatch_keys(t) for t in (grad_out, input, weight) if t is not None]
    raw = tuple(k.raw_repr() for k in (*tls, *keys))
    try:
        return _KERNELS_BY_TLS_AND_KEYS[raw]
    except KeyError:
        keyset = tls[0]
        for k in keys:
            keyset = keyset | k
        kernels = _KERNELS_BY_TLS_AND_KEYS[raw] = _backend_kernels(keyset - tls[1])
        return kernels


def _outer_levels_differentiate():
    """A Function's forward runs with grad modes off. Under a torch.func transform the
    redispatch below autograd moves on to the next (outer) transform level, which must
    record too, for nested grad(grad(...)) and jacrev(jacrev(...)): turn them back on,
    as functorch's own single-level Functions do. Outside transforms there is no outer
    level, and nothing below may record."""
    if torch._C._are_functorch_transforms_active():
        return _grad_modes_on()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _grad_modes_on():
    with torch.enable_grad(), fwAD._set_fwd_grad_enabled(True):
        yield


def _apply(function, *args):
    """``function.apply``; torch.func admits a single-level Function only when told to."""
    if torch._C._are_functorch_transforms_active():
        with enable_single_level_autograd_function():
            return function.apply(*args)
    return function.apply(*args)


class GroupNormAutograd(_SingleLevelFunction):
    @staticmethod
    def forward(ctx, keyset, input, num_groups, weight, bias, eps):
        kernels = _backend_kernels(keyset)
        ctx.backend_kernels = kernels
        if kernels is not None:
            out, mean, rstd = kernels[0](input, num_groups, weight, bias, eps)
        else:
            with _outer_levels_differentiate():
                out, mean, rstd = group_norm_op.redispatch(
                    keyset, input, num_groups, weight, bias, eps
                )
        ctx.mark_non_differentiable(mean, rstd)
        # mean and rstd get no gradient; not materialising zeros for them saves two
        # allocations per backward.
        ctx.set_materialize_grads(False)
        ctx.num_groups, ctx.eps = num_groups, eps
        # A shared [C] parameter's gradient is the batch sum, as nn.GroupNorm gives it;
        # an [N, C] one keeps the per-sample rows.
        ctx.sum_weight = weight is not None and weight.dim() == 1
        ctx.sum_bias = bias is not None and bias.dim() == 1
        # The backward op's per-sample grads are fp32 for fp16/bf16 input: sum, then round.
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, mean, rstd, weight)
        ctx.save_for_forward(input, weight, bias)
        return out, mean, rstd

    @staticmethod
    def jvp(ctx, _keyset, input_t, _groups, weight_t, bias_t, _eps):
        input, weight, bias = ctx.saved_tensors
        out_t = composite.forward_jvp(
            input, weight, bias, ctx.num_groups, ctx.eps, (input_t, weight_t, bias_t)
        )
        return out_t, None, None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        if grad_out is None:  # only mean/rstd were used
            return None, None, None, None, None, None
        input, mean, rstd, weight = ctx.saved_tensors
        _, need_input, _, need_weight, need_bias, _ = ctx.needs_input_grad
        mask = [need_input, need_weight, need_bias]
        # Without create_graph the op's Autograd kernel would only redispatch: go straight
        # to the backend kernel when the dispatcher would pick it too. Autograd has
        # already matched grad_out to the output, so the op's validation is moot there.
        kernels = ctx.backend_kernels
        if (kernels is not None and not torch.is_grad_enabled()
                and _plain_backend(grad_out, input, weight) is kernels):
            gi, gw, gb = kernels[1](grad_out, input, mean, rstd, weight, ctx.num_groups, mask)
        else:
            gi, gw, gb = group_norm_backward_op(
                grad_out, input, mean, rstd, weight, ctx.num_groups, mask, ctx.eps
            )
            gi, gw, gb = (g if need else None for g, need in zip((gi, gw, gb), mask))
        if gw is not None:
            if ctx.sum_weight:
                gw = gw.sum(0)
            if gw.dtype != ctx.weight_dtype:
                gw = gw.to(ctx.weight_dtype)
        if gb is not None:
            if ctx.sum_bias:
                gb = gb.sum(0)
            if gb.dtype != ctx.bias_dtype:
                gb = gb.to(ctx.bias_dtype)
        return None, gi, None, gw, gb, None


def _has_tangent(*tensors):
    """Whether forward-mode AD (jvp, jacfwd) tracks any of these tensors."""
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


def _group_norm_autograd(keyset, input, num_groups, weight=None, bias=None, eps=1e-5):
    below = keyset & _BELOW_AUTOGRAD
    if not (
        torch.is_grad_enabled()
        and (
            input.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
    ) and not _has_tangent(input, weight, bias):
        kernels = _backend_kernels(keyset)
        if kernels is not None:
            return kernels[0](input, num_groups, weight, bias, eps)
        return group_norm_op.redispatch(below, input, num_groups, weight, bias, eps)
    return _apply(GroupNormAutograd, below, input, num_groups, weight, bias, eps)


class GroupNormBackwardAutograd(_SingleLevelFunction):
    """Autograd of the backward op, for double backward: the forward runs the kernel;
    only a second differentiation runs the closed-form derivative."""

    @staticmethod
    def forward(ctx, keyset, grad_out, input, mean, rstd, weight, num_groups, output_mask, eps):
        with _outer_levels_differentiate():
            grads = group_norm_backward_op.redispatch(
                keyset, grad_out, input, mean, rstd, weight, num_groups, output_mask, eps
            )
        ctx.set_materialize_grads(False)
        ctx.num_groups, ctx.output_mask, ctx.eps = num_groups, list(output_mask), eps
        ctx.save_for_backward(grad_out, input, weight)
        return grads

    @staticmethod
    def backward(ctx, *cotangents):
        grad_out, input, weight = ctx.saved_tensors
        kept = [t for t, keep in zip(cotangents, ctx.output_mask) if keep]
        d_grad_out, d_input, d_weight = composite.vjp(
            grad_out, input, weight, ctx.num_groups, ctx.eps, ctx.output_mask, kept
        )
        return None, d_grad_out, d_input, None, None, d_weight, None, None, None


def _group_norm_backward_autograd(
    keyset, grad_out, input, mean, rstd, weight, num_groups, output_mask, eps=1e-5
):
    below = keyset & _BELOW_AUTOGRAD
    args = (grad_out, input, mean, rstd, weight, num_groups, output_mask, eps)
    # Without this check forward-mode AD would pass through and silently drop tangents.
    torch._check(
        not _has_tangent(grad_out, input, weight),
        lambda: "persample.group_norm_backward does not support forward-mode AD "
        "(jvp/jacfwd over a gradient); take second derivatives in reverse mode, "
        "e.g. torch.func.jacrev(torch.func.jacrev(f)) instead of torch.func.hessian(f)",
    )
    if not torch.is_grad_enabled() or not (
        grad_out.requires_grad
        or input.requires_grad
        or (weight is not None and weight.requires_grad)
    ):
        return group_norm_backward_op.redispatch(below, *args)
    return _apply(GroupNormBackwardAutograd, below, *args)


lib.impl("group_norm", _group_norm_autograd, "Autograd", with_keyset=True)
lib.impl("group_norm_backward", _group_norm_backward_autograd, "Autograd", with_keyset=True)
