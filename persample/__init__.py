"""Per-sample gradients for GroupNorm, LayerNorm and RMSNorm as real PyTorch operators.

Importing ``persample`` registers ``torch.ops.persample.group_norm``,
``layer_norm`` and ``rms_norm`` and their backward ops (CPU and CUDA kernels, fake
implementations, autograd and vmap rules).
"""

from . import ops  # noqa: F401  (defines the ops)
from . import meta  # noqa: F401  (registers their fake impls)
from . import nn
from . import export  # noqa: F401  (lowers the ops to ATen under ONNX export)
from .grad_sample import call_for_per_sample_grads
from .convert import (
    convert_group_norm,
    convert_norms,
    revert_group_norm,
    revert_norms,
    unrouted_group_norms,
    unrouted_norms,
)
from .ops.functional import group_norm, layer_norm, rms_norm

__all__ = [
    "group_norm",
    "layer_norm",
    "rms_norm",
    "nn",
    "export",
    "convert_group_norm",
    "convert_norms",
    "revert_group_norm",
    "revert_norms",
    "unrouted_group_norms",
    "unrouted_norms",
    "call_for_per_sample_grads",
]
__version__ = "0.1.0"
