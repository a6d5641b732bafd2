"""The persample operators. Importing this package registers them with the dispatcher."""

from . import autograd, cpu, cuda, eager, library, vmap  # noqa: F401  (registration side effects)
from .functional import group_norm

__all__ = ["group_norm"]
