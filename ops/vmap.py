"""vmap rules of the norm ops (ops/family.py): the vmapped dimension folds into N, so a
vmapped call is one kernel call.

Per-sample parameters are the key: a vmapped ``[C]`` weight becomes a ``[B*N, C]``
per-sample weight, which the kernels already handle without a loop.

The rules have ``torch.library.register_vmap``'s signature, and are registered the way it
registers them, minus its pytree handling (see ``_batched_kernel``).
"""

import torch
from torch._C import _functorch

from .family import NORMS
from .library import lib


def _fold(t, bdim, batch_size):
    """``[B, N, ...]`` (batched or broadcast) -> ``[B*N, ...]``."""
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)
    return t.flatten(0, 1)


def _fold_param(p, bdim, batch_size, n, rank):
    """A shared (``rank`` dims) or per-sample parameter, maybe batched, as one the folded
    input accepts."""
    if p is None or (bdim is None and p.dim() == rank):
        return p
    if bdim is None:
        return _fold(p, None, batch_size)
    p = p.movedim(bdim, 0)
    if p.dim() == rank + 1:  # one shared parameter per vmapped item: repeat it over its N samples
        p = p.unsqueeze(1).expand(batch_size, n, *p.shape[1:])
    return p.flatten(0, 1)


def _fold_args(norm, roles, info, in_dims, args):
    """The op's arguments with the vmapped dim folded into N; and N."""
    b = info.batch_size
    # The dispatcher drops trailing arguments that equal their defaults.
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    folded = [_fold(a, d, b) if role == "x" else a for a, role, d in zip(args, roles, in_dims)]
    n = folded[roles.index("x")].shape[0] // b
    rank = norm.param_rank(args[roles.index(None)])  # the config is the first other argument
    for i, (role, d) in enumerate(zip(roles, in_dims)):
        if role == "p":
            folded[i] = _fold_param(folded[i], d, b, n, rank)
    return folded, n


def _forward_rule(norm):
    def rule(info, in_dims, *args):
        folded, n = _fold_args(norm, norm.forward_roles, info, in_dims, args)
        outs = norm.op(*folded)
        split = (info.batch_size, n)
        return tuple(o.unflatten(0, split) for o in outs), (0,) * len(outs)

    return rule


def _backward_rule(norm):
    def rule(info, in_dims, *args):
        folded, n = _fold_args(norm, norm.backward_roles, info, in_dims, args)
        grads = norm.backward_op(*folded)
        mask = folded[norm.backward_roles.index("mask")]
        # A masked gradient is an empty, unbatched placeholder.
        outs = tuple(g.unflatten(0, (info.batch_size, n)) if m else g for g, m in zip(grads, mask))
        return outs, tuple(0 if m else None for m in mask)

    return rule


class _Info:
    """The part of torch.library's ``VmapInfo`` that the rules read."""

    __slots__ = ("batch_size",)

    def __init__(self, batch_size):
        self.batch_size = batch_size


_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def _batched_kernel(rule, op):
    """The FuncTorchBatched kernel that ``torch.library.register_vmap(op, rule)`` would
    register, for these ops' flat signatures: register_vmap walks every argument and
    output with pytrees, which cost ~0.1 ms per call (measured), as much as the kernel
    at small shapes, under eager torch.func."""

    def kernel(_keyset, *args):
        level = _functorch.current_level()
        unwrapped, in_dims, batch_size = [], [], None
        for a in args:
            bdim = None
            if isinstance(a, torch.Tensor):
                a, bdim = _functorch._unwrap_batched(a, level)
                if bdim is not None:
                    batch_size = a.shape[bdim]
            unwrapped.append(a)
            in_dims.append(bdim)
        with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
            if batch_size is None:  # nothing is batched at this level
                return op(*args)
            outs, out_dims = rule(_Info(batch_size), in_dims, *unwrapped)
        return tuple(
            o if d is None else _functorch._add_batch_dim(o, d, level)
            for o, d in zip(outs, out_dims)
        )

    return kernel


for _norm in NORMS:
    lib.impl(_norm.name, _batched_kernel(_forward_rule(_norm), _norm.op), "FuncTorchBatched", with_keyset=True)
    lib.impl(
        f"{_norm.name}_backward",
        _batched_kernel(_backward_rule(_norm), _norm.backward_op),
        "FuncTorchBatched",
        with_keyset=True,
    )
