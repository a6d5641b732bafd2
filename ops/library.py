"""The persample operator schemas: group_norm, layer_norm and rms_norm, each with its
backward.

The forward mirrors ``aten::native_group_norm``: it returns the output and the saved
statistics, so that the backward op never recomputes the normalisation.
The backward returns per-sample ``[N, C]`` weight and bias gradients; ``output_mask``
(grad_input, grad_weight, grad_bias) skips the ones autograd does not need, and a masked
output is an empty tensor. Its kernels use the saved statistics; ``eps`` is there for
its own derivative (double backward), which recomputes them.

``layer_norm`` and ``rms_norm`` mirror ``aten::native_layer_norm`` and
``aten::_fused_rms_norm`` the same way (their backward takes ``eps`` for the same reason);
their per-sample gradients are ``[N, *normalized_shape]``, summed over every dim between
the sample dim 0 and the normalised ones.
"""

import torch

# Defined with the low-level Library API (not ``custom_op``) because a Python
# ``custom_op`` call costs ~50 us, which dominates GroupNorm at small shapes.
lib = torch.library.Library("persample", "DEF")

_TAGS = (torch.Tag.pt2_compliant_tag,)

lib.define(
    "group_norm(Tensor input, int num_groups, Tensor? weight=None, Tensor? bias=None, "
    "float eps=1e-05) -> (Tensor, Tensor, Tensor)",
    tags=_TAGS,
)
lib.define(
    "group_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
    "Tensor? weight, int num_groups, bool[3] output_mask, float eps=1e-05) "
    "-> (Tensor, Tensor, Tensor)",
    tags=_TAGS,
)

lib.define(
    "layer_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
    "float eps=1e-05) -> (Tensor, Tensor, Tensor)",
    tags=_TAGS,
)
lib.define(
    "layer_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, "
    "Tensor rstd, Tensor? weight, bool[3] output_mask, float eps=1e-05) -> (Tensor, Tensor, Tensor)",
    tags=_TAGS,
)
lib.define(
    "rms_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, float? eps=None) "
    "-> (Tensor, Tensor)",
    tags=_TAGS,
)
lib.define(
    "rms_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, "
    "Tensor? weight, bool[2] output_mask, float? eps=None) -> (Tensor, Tensor)",
    tags=_TAGS,
)

group_norm_op = torch.ops.persample.group_norm.default
group_norm_backward_op = torch.ops.persample.group_norm_backward.default
layer_norm_op = torch.ops.persample.layer_norm.default
layer_norm_backward_op = torch.ops.persample.layer_norm_backward.default
rms_norm_op = torch.ops.persample.rms_norm.default
rms_norm_backward_op = torch.ops.persample.rms_norm_backward.default
