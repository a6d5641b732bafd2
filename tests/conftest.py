"""Test-session setup.

Without a CUDA device, tests/test_triton.py runs the Triton kernels in triton's
interpreter, which must be switched on before triton is first imported: triton
decorates its own standard library (``tl.sum``, ...) for the interpreter only then, and
other test modules import it during collection (torch's test utilities, inductor).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _index_scalars_in_old_interpreters():
    """Triton 3.6's interpreter (torch 2.11's; the GPU image's) holds scalars as 1-d
    numpy arrays and takes ``range(n)`` bounds by ``int(array)``, which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
    loop with a run-time bound fails there, in the interpreter only (compiled kernels
    are unaffected: tests/test_triton_compile.py). Triton 3.8's interpreter squeezes
    the array first; this gives the older one the same ``__index__``."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_persample_squeezes", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._persample_squeezes = True
    interpreter._patch_lang_tensor = patched


_index_scalars_in_old_interpreters()
