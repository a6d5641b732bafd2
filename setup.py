"""Builds the optional C++ eager fast path (ops/csrc) against the torch of the build
environment. The metadata lives in pyproject.toml.

Only a build that sees the torch it will run with makes a usable library, so build with
``pip install --no-build-isolation``. An isolated build (plain ``pip install``) has no
torch and installs the pure-Python package, which works the same, slower in eager mode.
"""

import os
import re

from setuptools import setup


def extension_setup():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    # ops/shared/backends.py's library_name(): one library per torch release.
    tag = "_C_torch" + re.sub(r"\W", "_", torch.__version__)

    class BuildExt(BuildExtension):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, no_python_abi_suffix=True, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            # Object files per torch release too: one built against another release's
            # headers must never be linked in.
            self.build_temp = os.path.join(self.build_temp, tag)

    return {
        "ext_modules": [
            # OpenMP: at::parallel_for is inline and runs serially without it; the
            # library then links the libgomp.so.1 that torch has already loaded.
            CppExtension(f"persample.{tag}",
                         ["ops/csrc/group_norm.cpp", "ops/csrc/row_norm.cpp"],
                         depends=["ops/csrc/group_norm_kernels.h", "ops/csrc/moments.h",
                                  "ops/csrc/row_norm_kernels.h"],
                         extra_compile_args=["-O3", "-fopenmp"],
                         extra_link_args=["-fopenmp"], optional=True)
        ],
        "cmdclass": {"build_ext": BuildExt},
    }


setup(**extension_setup())
