"""Autograd of the norm ops (group_norm, layer_norm, rms_norm; ops/family.py): each
forward's backward is its backward op, e.g. ``persample::group_norm_backward``; one
machinery serves all three.

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

from .family import NORMS
from .library import lib
from .shared.derivatives import vjp_of

_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_KEY = torch._C.DispatchKey


def _backend_kernels(norm, keyset):
    """The (forward, backward body) kernels of ``norm`` that redispatching ``keyset``
    below autograd would reach, when nothing (a mode, a subclass, functionalization, a
    transform) sits in between; else None.

    Calling them directly is that same dispatch without two Python-to-C++ round trips,
    which cost ~20 us each on a cold cache at large shapes (measured).
    """
    raw = (norm.name, keyset.raw_repr())
    try:
        return _KERNELS_BY_KEYSET[raw]
    except KeyError:
        # Both are fallthroughs for these ops (BackendSelect only serves factory functions).
        below = (keyset & _BELOW_AUTOGRAD).remove(_KEY.ADInplaceOrView).remove(_KEY.BackendSelect)
        kernels = _KERNELS_BY_KEYSET[raw] = norm.kernels.get(below.highestPriorityTypeId())
        return kernels


# Keyset arithmetic from Python costs ~3 us a call; the answers are few, so keep them.
_KERNELS_BY_KEYSET = {}
_KERNELS_BY_TLS_AND_KEYS = {}


def _plain_backend(norm, grad_out, input, weight):
    """The backend kernels for a backward call on these tensors, as the dispatcher would
    pick them (thread-local modes included), or None."""
    tls = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    keys = [torch._C._dispatch_keys(t) for t in (grad_out, input, weight) if t is not None]
    raw = (norm.name, *(k.raw_repr() for k in (*tls, *keys)))
    try:
        return _KERNELS_BY_TLS_AND_KEYS[raw]
    except KeyError:
        keyset = tls[0]
        for k in keys:
            keyset = keyset | k
        kernels = _KERNELS_BY_TLS_AND_KEYS[raw] = _backend_kernels(norm, keyset - tls[1])
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


def _to_param(g, summed, dtype):
    """A per-sample ``[N, *shape]`` gradient as the parameter's: a shared parameter's
    is the batch sum, as the stock layers give it; then the parameter's dtype (the
    backward ops' per-sample grads are fp32 for fp16/bf16 input: sum, then round)."""
    if g is None:
        return None
    if summed:
        g = g.sum(0)
    return g if g.dtype == dtype else g.to(dtype)


class NormAutograd(_SingleLevelFunction):
    @staticmethod
    def forward(ctx, norm, keyset, input, config, weight, bias, eps):
        args = norm.forward_args(input, config, weight, bias, eps)
        kernels = _backend_kernels(norm, keyset)
        ctx.backend_kernels = kernels
        if kernels is not None:
            outs = kernels[0](*args)
        else:
            with _outer_levels_differentiate():
                outs = norm.op.redispatch(keyset, *args)
        stats = outs[1:]
        ctx.mark_non_differentiable(*stats)
        # The statistics get no gradient; not materialising zeros for them saves
        # allocations per backward.
        ctx.set_materialize_grads(False)
        ctx.norm, ctx.config, ctx.eps, ctx.n_stats = norm, config, eps, len(stats)
        rank = norm.param_rank(config)
        ctx.sum_weight = weight is not None and weight.dim() == rank
        ctx.sum_bias = bias is not None and bias.dim() == rank
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, *stats)
        ctx.save_for_forward(input, weight, bias)
        return outs

    @staticmethod
    def jvp(ctx, _norm, _keyset, input_t, _config, weight_t, bias_t, _eps):
        input, weight, bias = ctx.saved_tensors
        out_t = ctx.norm.jvp(input, ctx.config, weight, bias, ctx.eps, (input_t, weight_t, bias_t))
        return (out_t, *(None,) * ctx.n_stats)

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        if grad_out is None:  # only the statistics were used
            return (None,) * 7
        norm = ctx.norm
        input, weight, *stats = ctx.saved_tensors
        _, _, need_input, _, need_weight, need_bias, _ = ctx.needs_input_grad
        mask = [need_input, need_weight, need_bias]
        args = norm.backward_args(grad_out, input, ctx.config, stats, weight, mask)
        # Without create_graph the op's Autograd kernel would only redispatch: go straight
        # to the backend kernel when the dispatcher would pick it too. Autograd has
        # already matched grad_out to the output, so the op's validation is moot there.
        kernels = ctx.backend_kernels
        if (kernels is not None and not torch.is_grad_enabled()
                and _plain_backend(norm, grad_out, input, weight) is kernels):
            grads = kernels[1](*args)
        else:
            grads = norm.backward_op(*args, ctx.eps)
            grads = tuple(g if need else None for g, need in zip(grads, mask))
        gi, gw, gb = (*grads, None)[:3]
        gw = _to_param(gw, ctx.sum_weight, ctx.weight_dtype)
        gb = _to_param(gb, ctx.sum_bias, ctx.bias_dtype)
        return None, None, gi, None, gw, gb, None


def _has_tangent(*tensors):
    """Whether forward-mode AD (jvp, jacfwd) tracks any of these tensors."""
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


def _forward_autograd(norm, keyset, input, config, weight, bias, eps):
    if not (
        torch.is_grad_enabled()
        and (
            input.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
    ) and not _has_tangent(input, weight, bias):
        args = norm.forward_args(input, config, weight, bias, eps)
        kernels = _backend_kernels(norm, keyset)
        if kernels is not None:
            return kernels[0](*args)
        return norm.op.redispatch(keyset & _BELOW_AUTOGRAD, *args)
    return _apply(FUNCTIONS[norm.name][0], norm, keyset & _BELOW_AUTOGRAD, input, config, weight, bias, eps)


class NormBackwardAutograd(_SingleLevelFunction):
    """Autograd of a backward op, for double backward: the forward runs the kernel;
    only a second differentiation runs the closed-form derivative."""

    @staticmethod
    def forward(ctx, norm, keyset, *args):
        with _outer_levels_differentiate():
            grads = norm.backward_op.redispatch(keyset, *args)
        grad_out, input, weight, config, mask, eps = norm.unpack_backward(args)
        ctx.set_materialize_grads(False)
        ctx.norm, ctx.config, ctx.output_mask, ctx.eps = norm, config, list(mask), eps
        ctx.nargs = len(args)
        ctx.save_for_backward(grad_out, input, weight)
        return grads

    @staticmethod
    def backward(ctx, *cotangents):
        norm = ctx.norm
        grad_out, input, weight = ctx.saved_tensors
        kept = [t for t, keep in zip(cotangents, ctx.output_mask) if keep]
        derivatives = vjp_of(
            lambda go, x, w: norm.explicit_backward(go, x, w, ctx.config, ctx.eps, ctx.output_mask),
            grad_out, input, weight, norm.param_shape(input, ctx.config), kept,
        )
        out = [None] * (2 + ctx.nargs)
        for position, d in zip(norm.backward_positions(), derivatives):
            out[2 + position] = d
        return tuple(out)


def _backward_autograd(norm, keyset, *args):
    below = keyset & _BELOW_AUTOGRAD
    grad_out, input, weight, *_ = norm.unpack_backward(args)
    # Without this check forward-mode AD would pass through and silently drop tangents.
    torch._check(
        not _has_tangent(grad_out, input, weight),
        lambda: f"persample.{norm.name}_backward does not support forward-mode AD "
        "(jvp/jacfwd over a gradient); take second derivatives in reverse mode, "
        "e.g. torch.func.jacrev(torch.func.jacrev(f)) instead of torch.func.hessian(f)",
    )
    if not torch.is_grad_enabled() or not (
        grad_out.requires_grad
        or input.requires_grad
        or (weight is not None and weight.requires_grad)
    ):
        return norm.backward_op.redispatch(below, *args)
    return _apply(FUNCTIONS[norm.name][1], norm, below, *args)


def _autograd_kernels(norm):
    """The Autograd kernels of ``norm``'s two ops, with the ops' own signatures (the
    dispatcher drops trailing arguments that equal their defaults)."""
    if norm.has_bias:

        def forward(keyset, input, config, weight=None, bias=None, eps=1e-5):
            return _forward_autograd(norm, keyset, input, config, weight, bias, eps)

    else:

        def forward(keyset, input, config, weight=None, eps=None):
            return _forward_autograd(norm, keyset, input, config, weight, None, eps)

    default_eps = 1e-5 if norm.has_bias else None

    def backward(keyset, *args):
        if len(args) < len(norm.backward_roles):
            args = (*args, default_eps)
        return _backward_autograd(norm, keyset, *args)

    return forward, backward


# One Function class per norm, so that autograd nodes read "GroupNormAutogradBackward".
FUNCTIONS = {
    norm.name: (
        type(f"{norm.name.title().replace('_', '')}Autograd", (NormAutograd,), {}),
        type(f"{norm.name.title().replace('_', '')}BackwardAutograd", (NormBackwardAutograd,), {}),
    )
    for norm in NORMS
}

for _norm in NORMS:
    _forward, _backward = _autograd_kernels(_norm)
    lib.impl(_norm.name, _forward, "Autograd", with_keyset=True)
    lib.impl(f"{_norm.name}_backward", _backward, "Autograd", with_keyset=True)
