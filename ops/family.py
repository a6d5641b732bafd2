"""The norm family: what the shared autograd (ops/autograd.py) and vmap (ops/vmap.py)
machinery needs to know about each operator, so that group_norm, layer_norm and rms_norm
share that machinery instead of copying it.

Every forward op is ``(input, config, weight[, bias], eps) -> (out, *stats)``, where
``config`` is ``num_groups`` or ``normalized_shape``; every backward op takes
``grad_out``, ``input``, the config, the statistics, ``weight``, an output mask and
``eps``, in the order of the ATen op it mirrors, and returns grad_input and the
per-sample parameter gradients ``[N, *param_shape]``.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .group_norm import composite
from .group_norm.cpu import backward_cpu, group_norm_cpu
from .group_norm.cuda import backward_cuda, group_norm_cuda
from .library import (
    group_norm_backward_op,
    group_norm_op,
    layer_norm_backward_op,
    layer_norm_op,
    rms_norm_backward_op,
    rms_norm_op,
)
from .row_norm import composite as row_norm_composite
from .row_norm import kernels as row_norm
from .row_norm.checks import rms_eps

_KEY = torch._C.DispatchKey


@dataclass(frozen=True, eq=False)
class Norm:
    name: str
    op: object
    backward_op: object
    has_bias: bool
    # {dispatch key: (forward kernel, unchecked backward body)}, called with the ops'
    # own arguments (the body without eps), for autograd's direct calls.
    kernels: dict
    # The arguments' roles, for vmap: "x" a [N, ...] tensor (input, grad_out, stats),
    # "p" a parameter, "mask" the output mask, None anything else.
    forward_roles: tuple
    backward_roles: tuple
    # (config) -> the rank of a shared parameter (a per-sample one has one dim more).
    param_rank: Callable
    # (input, config, weight, bias, eps, tangents) -> the output's tangent.
    jvp: Callable
    # (grad_out, input, weight, config, eps, output_mask) -> differentiable grads.
    explicit_backward: Callable
    # (input, config) -> the shape of a shared parameter (ones stand in for None).
    param_shape: Callable

    def forward_args(self, input, config, weight, bias, eps):
        return (input, config, weight, bias, eps) if self.has_bias else (input, config, weight, eps)

    @property
    def grads(self):
        """How many gradients the backward op returns (grad_input first)."""
        return 3 if self.has_bias else 2

    def backward_args(self, grad_out, input, config, stats, weight, mask):
        """The backward op's arguments, but eps."""
        mask = list(mask[: self.grads])
        if self is GROUP_NORM:
            return (grad_out, input, *stats, weight, config, mask)
        return (grad_out, input, config, *stats, weight, mask)

    def unpack_backward(self, args):
        """``(grad_out, input, weight, config, mask, eps)`` of the backward op's arguments."""
        if self is GROUP_NORM:
            grad_out, input, _mean, _rstd, weight, config, mask, eps = args
        else:
            grad_out, input, config, *_stats, weight, mask, eps = args
        return grad_out, input, weight, config, mask, eps

    def backward_positions(self):
        """Positions of (grad_out, input, weight) among the backward op's arguments."""
        return (0, 1, self.backward_roles.index("p"))


def _shape(config):
    return tuple(config)


GROUP_NORM = Norm(
    name="group_norm",
    op=group_norm_op,
    backward_op=group_norm_backward_op,
    has_bias=True,
    kernels={_KEY.CPU: (group_norm_cpu, backward_cpu), _KEY.CUDA: (group_norm_cuda, backward_cuda)},
    forward_roles=("x", None, "p", "p", None),
    backward_roles=("x", "x", "x", "x", "p", None, "mask", None),
    param_rank=lambda config: 1,
    jvp=lambda input, g, w, b, eps, t: composite.forward_jvp(input, w, b, g, eps, t),
    explicit_backward=lambda go, x, w, g, eps, mask: composite.explicit_backward(go, x, w, g, eps, mask),
    param_shape=lambda input, config: (input.shape[1],),
)

_ROW_KERNELS = {
    "layer_norm": (row_norm.layer_norm_kernel, row_norm.layer_norm_backward_body),
    "rms_norm": (row_norm.rms_norm_kernel, row_norm.rms_norm_backward_body),
}

LAYER_NORM = Norm(
    name="layer_norm",
    op=layer_norm_op,
    backward_op=layer_norm_backward_op,
    has_bias=True,
    kernels={key: _ROW_KERNELS["layer_norm"] for key in (_KEY.CPU, _KEY.CUDA)},
    forward_roles=("x", None, "p", "p", None),
    backward_roles=("x", "x", None, "x", "x", "p", "mask", None),
    param_rank=len,
    jvp=lambda input, ns, w, b, eps, t: row_norm_composite.forward_jvp(input, ns, w, b, eps, False, t),
    explicit_backward=lambda go, x, w, ns, eps, mask: row_norm_composite.explicit_backward(
        go, x, ns, w, eps, False, mask
    ),
    param_shape=lambda input, config: _shape(config),
)

RMS_NORM = Norm(
    name="rms_norm",
    op=rms_norm_op,
    backward_op=rms_norm_backward_op,
    has_bias=False,
    kernels={key: _ROW_KERNELS["rms_norm"] for key in (_KEY.CPU, _KEY.CUDA)},
    forward_roles=("x", None, "p", None),
    backward_roles=("x", "x", None, "x", "p", "mask", None),
    param_rank=len,
    jvp=lambda input, ns, w, _b, eps, t: row_norm_composite.forward_jvp(
        input, ns, w, None, rms_eps(eps, input.dtype), True, t
    ),
    explicit_backward=lambda go, x, w, ns, eps, mask: row_norm_composite.explicit_backward(
        go, x, ns, w, rms_eps(eps, x.dtype), True, mask
    ),
    param_shape=lambda input, config: _shape(config),
)

NORMS = (GROUP_NORM, LAYER_NORM, RMS_NORM)
