"""The row norms, ``persample::layer_norm`` and ``persample::rms_norm``, with their
backward ops: one row of ``prod(normalized_shape)`` elements normalised at a time.
Validation (checks), the kernels' glue and ATen formulas (kernels), the C++ CPU kernels
(cpu), the CUDA kernels (triton_launch, triton_kernels), and the derivatives the
kernels do not give (composite). Importing it registers the kernels."""

from . import kernels  # noqa: F401  (registration side effects)
