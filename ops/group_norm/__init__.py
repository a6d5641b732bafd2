"""``persample::group_norm`` and its backward: validation (checks), memory layouts
(layout), the CPU (cpu, aten_kernels, eager: the C++ fast path) and CUDA (cuda,
triton_launch, triton_kernels) kernels, and the derivatives the kernels do not give
(composite). Importing it registers the kernels."""

from . import cpu, cuda  # noqa: F401  (registration side effects)
