"""The persample operators. Importing this package registers them with the dispatcher."""

from . import autograd, cpu, cuda, eager, library, row_norm, vmap  # noqa: F401  (registration side effects)
from .functional import group_norm, layer_norm, rms_norm

__all__ = ["group_norm", "layer_norm", "rms_norm"]
