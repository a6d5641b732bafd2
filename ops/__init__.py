"""The persample operators. Importing this package registers them with the dispatcher.

The family: ``group_norm`` (ops/group_norm/) and the row norms ``layer_norm`` and
``rms_norm`` (ops/row_norm/), each with its backward op. Every op goes through the same
machinery: the schemas (library), what the machinery knows of each op (family),
autograd, vmap rules and the public functions (functional: ``persample.group_norm``
and its siblings); what the ops' kernels share
is in ops/shared/, their C++ kernels in ops/csrc/.
"""

from . import autograd, group_norm, library, row_norm, vmap  # noqa: F401  (registration side effects)
