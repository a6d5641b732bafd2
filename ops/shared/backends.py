"""The family's optional backends, each loaded once with one clear fallback: the C++
library that ``setup.py`` builds (ops/csrc/, the CPU kernels and the eager fast path),
and the Triton launch modules (CUDA). Without the library the Python kernels serve
every call; without triton, CUDA calls run ATen's kernels.
"""

import contextlib
import importlib
import os
import re
import sys
import warnings

import torch

def library_name(torch_version=torch.__version__):
    """The library's module name: one per torch release, because C++ extensions have
    no stable ABI across releases (``setup.py`` uses the same rule)."""
    return "_C_torch" + re.sub(r"\W", "_", torch_version)


def load(package_dir):
    """Loads the library built for the running torch from ``package_dir``; returns its
    path, or None (disabled, not built, or unloadable, which warns)."""
    if os.environ.get("PERSAMPLE_DISABLE_CPP") == "1":
        return None
    path = os.path.join(package_dir, library_name() + ".so")
    if not os.path.exists(path):
        return None
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"persample: cannot load {path} ({e}); using the Python kernels", stacklevel=2)
        return None
    # A library built from an older checkout lacks newer ops: use none of it.
    missing = [name for name in _LIBRARY_OPS if not torch._C._dispatch_has_kernel(f"persample::{name}")]
    if missing:
        warnings.warn(
            f"persample: {path} is stale (no {', '.join(missing)}); using the Python kernels. "
            "Rebuild it: pip install --no-build-isolation -e .",
            stacklevel=2,
        )
        return None
    return path


_LIBRARY_OPS = (
    "_eager_group_norm",
    "_eager_group_norm_stats",
    "_cpu_group_norm_backward",
    "_cpu_group_norm_forward",
    "_cpu_row_norm_forward",
    "_cpu_row_norm_backward",
)
"""The library's ops (ops/csrc/group_norm.cpp, ops/csrc/row_norm.cpp)."""


LIBRARY = load(os.path.dirname(sys.modules["persample"].__file__))
"""Path of the loaded C++ library, or None when the Python kernels serve every call."""


GROUP_NORM_TRITON = "persample.ops.group_norm.triton_launch"
ROW_NORM_TRITON = "persample.ops.row_norm.triton_launch"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_modules = {}  # name -> the imported launch module, or False when it cannot be


def triton_module(name):
    """The Triton launch module ``name`` (``GROUP_NORM_TRITON``, ``ROW_NORM_TRITON``),
    imported on first use, or None when triton is not installed or
    ``PERSAMPLE_DISABLE_TRITON=1``."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = False
        if os.environ.get("PERSAMPLE_DISABLE_TRITON") != "1":
            try:
                module = _modules[name] = importlib.import_module(name)
            except ImportError as e:
                warnings.warn(
                    f"persample: triton is not available ({e}); CUDA norms run ATen's "
                    "kernels, which make more passes over memory (pip install triton)",
                    stacklevel=3,
                )
    return module or None


def triton_for(input, name):
    """The launch module ``name`` when its Triton kernels serve this input, else None:
    CUDA tensors, and CPU tensors when triton interprets the kernels (tests)."""
    if input.dtype not in TRITON_DTYPES:
        return None
    if input.is_cuda:
        launch = triton_module(name)
        return launch if launch is not None and launch.fits(input) else None
    if name not in _modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None  # no interpreter: not worth importing triton to learn that
    launch = triton_module(name)
    return launch if launch is not None and launch.INTERPRETED and launch.fits(input) else None


def on_device(t):
    """Triton launches on the current device; make it ``t``'s (asked only where there
    are several: ``current_device()`` costs a step's host time)."""
    if t.is_cuda and torch.cuda.device_count() > 1 and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


