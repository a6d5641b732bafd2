"""The public functional API."""

from .library import group_norm_op


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group Normalization whose weight and bias may be per-sample.

    Same signature and result as ``torch.nn.functional.group_norm``; in addition,
    ``weight`` and ``bias`` may hold one row per sample. The gradient of a parameter
    has the parameter's shape: a shared ``[C]`` weight gets the batch sum (as with
    ``F.group_norm``), an ``[N, C]`` weight gets the per-sample gradients.

    Args:
        input (Tensor[N, C, *]): floating-point input of any rank >= 2.
        num_groups (int): number of groups; must divide C.
        weight (Tensor[C] or Tensor[N, C], optional): scale, shared or per-sample.
        bias (Tensor[C] or Tensor[N, C], optional): shift, shared or per-sample.
        eps (float): added to the variance, >= 0.

    Returns:
        Tensor[N, C, *]: the normalised input, in the input's dtype, and in the memory
        format that ``F.group_norm`` gives on the same device.

    Example:
        >>> x = torch.randn(8, 6, 4, 4)
        >>> w = torch.ones(8, 6, requires_grad=True)  # one weight row per sample
        >>> persample.group_norm(x, 3, w).square().sum().backward()
        >>> w.grad.shape
        torch.Size([8, 6])
    """
    return group_norm_op(input, num_groups, weight, bias, eps)[0]
