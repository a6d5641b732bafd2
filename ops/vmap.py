"""vmap rules: the vmapped dimension folds into N, so a vmapped call is one kernel call.

Per-sample parameters are the key: a vmapped ``[C]`` weight becomes an ``[B*N, C]``
per-sample weight, which the kernels already handle without a loop.

The rules have ``torch.library.register_vmap``'s signature, and are registered the way it
registers them, minus its pytree handling (see ``_batched_kernel``).
"""

import torch
from torch._C import _functorch

from .library import group_norm_backward_op, group_norm_op, lib


def _fold(t, bdim, batch_size):
    """``[B, N, ...]`` (batched or broadcast) -> ``[B*N, ...]``."""
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)
    return t.flatten(0, 1)


def _fold_param(p, bdim, batch_size, n):
    """A ``[C]`` or ``[N, C]`` parameter, maybe batched, as one the folded input accepts."""
    if p is None or (bdim is None and p.dim() == 1):
        return p
    if bdim is None:
        return _fold(p, None, batch_size)
    p = p.movedim(bdim, 0)
    if p.dim() == 2:  # one [C] per vmapped item: repeat it over that item's N samples
        p = p.unsqueeze(1).expand(batch_size, n, p.shape[1])
    return p.flatten(0, 1)


def _group_norm_vmap(info, in_dims, input, num_groups, weight=None, bias=None, eps=1e-5):
    # The dispatcher drops trailing arguments that equal their defaults.
    x_dim, _, w_dim, b_dim, _ = tuple(in_dims) + (None,) * (5 - len(in_dims))
    b = info.batch_size
    x = _fold(input, x_dim, b)
    n = x.shape[0] // b
    out, mean, rstd = group_norm_op(
        x, num_groups, _fold_param(weight, w_dim, b, n), _fold_param(bias, b_dim, b, n), eps
    )
    split = (b, n)
    return (out.unflatten(0, split), mean.unflatten(0, split), rstd.unflatten(0, split)), (0, 0, 0)


def _group_norm_backward_vmap(
    info, in_dims, grad_out, input, mean, rstd, weight, num_groups, output_mask, eps=1e-5
):
    go_dim, x_dim, m_dim, r_dim, w_dim = in_dims[:5]
    b = info.batch_size
    x = _fold(input, x_dim, b)
    n = x.shape[0] // b
    grads = group_norm_backward_op(
        _fold(grad_out, go_dim, b),
        x,
        _fold(mean, m_dim, b),
        _fold(rstd, r_dim, b),
        _fold_param(weight, w_dim, b, n),
        num_groups,
        output_mask,
        eps,
    )
    # A masked gradient is an empty, unbatched placeholder.
    outs = tuple(g.unflatten(0, (b, n)) if m else g for g, m in zip(grads, output_mask))
    dims = tuple(0 if m else None for m in output_mask)
    return outs, dims


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


for _name, _rule, _op in (
    ("group_norm", _group_norm_vmap, group_norm_op),
    ("group_norm_backward", _group_norm_backward_vmap, group_norm_backward_op),
):
    lib.impl(_name, _batched_kernel(_rule, _op), "FuncTorchBatched", with_keyset=True)
