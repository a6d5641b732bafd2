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
