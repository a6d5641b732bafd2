"""The public functional API."""

import torch
import torch.nn.functional as F

from .group_norm import eager
from .library import group_norm_op, layer_norm_op, rms_norm_op
from .row_norm.checks import check_row_norm, rms_eps


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
        format that ``F.group_norm`` gives on CPU (``suggest_memory_format``), on CUDA
        too, where stock GroupNorm returns contiguous output.

    Example:
        >>> x = torch.randn(8, 6, 4, 4)
        >>> w = torch.ones(8, 6, requires_grad=True)  # one weight row per sample
        >>> persample.group_norm(x, 3, w).square().sum().backward()
        >>> w.grad.shape
        torch.Size([8, 6])
    """
    fast = eager.fast_op(input)
    # An int the schema cannot hold fails in argument parsing, whose message would name
    # the private op: let the public op's parsing refuse it.
    if fast is not None and type(num_groups) is int and abs(num_groups) < 1 << 63:
        return fast(input, num_groups, weight, bias, eps)
    if use_aten(input):
        return aten_group_norm(input, num_groups, weight, bias, eps)
    return group_norm_op(input, num_groups, weight, bias, eps)[0]


def use_aten(input):
    """True under a torch.func transform (e.g. vmap(grad(...))) while torch.compile
    traces it, or in eager mode on CUDA; :func:`group_norm` and
    ``persample.nn.GroupNorm`` then use :func:`aten_group_norm`, the row norms
    :func:`aten_row_norm`.

    Compiled, inductor fuses ATen's GroupNorm on the per-sample view into the
    surrounding per-sample computation, which an opaque op cannot match (measured: the
    op costs up to ~1.7x stock GroupNorm's compiled vmap(grad) on contiguous inputs; on
    channels_last it wins at some shapes and loses at others).

    In eager mode on CUDA, a vmap(grad) step is host time: the op's Python autograd
    Function and vmap rules cost more of it than functorch's C++ rules for ATen's
    GroupNorm, whose kernels, on the per-sample view, are the op's own CUDA kernels
    (measured on an H200: the op ran at 0.7-0.8x stock's speed). On CPU the op's
    kernels win (1.2x stock at large shapes, 2.9x on channels_last), so the op runs.
    """
    return torch._C._are_functorch_transforms_active() and (
        input.is_cuda or torch.compiler.is_compiling()
    )


def aten_group_norm(input, num_groups, weight, bias, eps):
    """The same function as ATen ops, through the per-sample view (see aten_kernels)."""
    # Contiguous first: torch 2.14.1 fails to trace GroupNorm's decomposition under
    # vmap(grad) for channels_last input ("view size is not compatible", stock
    # F.group_norm included); inductor makes the copy free (measured).
    input = input.contiguous()
    if all(p is None or p.dim() == 1 for p in (weight, bias)):
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    n, c = input.shape[0], input.shape[1]
    flat = [None if p is None else p.expand(n, c).reshape(n * c) for p in (weight, bias)]
    out = torch.nn.functional.group_norm(
        input.reshape(1, n * c, -1), n * num_groups, flat[0], flat[1], eps
    )
    return out.view(input.shape)


def _normalized_shape(normalized_shape):
    """An int or a sequence of ints, as the stock layers take it, as a list."""
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer Normalization whose weight and bias may be per-sample.

    Same signature and result as ``torch.nn.functional.layer_norm``; in addition,
    ``weight`` and ``bias`` may hold one ``[*normalized_shape]`` slice per sample. A
    parameter's gradient has the parameter's shape: a shared one gets the batch sum,
    a per-sample ``[N, *normalized_shape]`` one the per-sample gradients, each summed
    over that sample's rows (e.g. its sequence positions).

    The contract is batch-first: dim 0 of ``input`` is the sample dim, and it may not
    be a normalised dim, so ``input`` has at least one dim more than
    ``normalized_shape`` (else a ``RuntimeError`` says so).

    Args:
        input (Tensor[N, *, *normalized_shape]): floating-point input.
        normalized_shape (int or sequence of int): the trailing dims to normalise over.
        weight (Tensor[*normalized_shape] or Tensor[N, *normalized_shape], optional):
            scale, shared or per-sample.
        bias (same shapes as weight, optional): shift, shared or per-sample.
        eps (float): added to the variance, >= 0.

    Returns:
        Tensor: the normalised input, its shape and dtype, contiguous (as stock).

    Example:
        >>> x = torch.randn(8, 16, 32)  # 8 samples of 16 tokens
        >>> w = torch.ones(8, 32, requires_grad=True)  # one weight row per sample
        >>> persample.layer_norm(x, 32, w).square().sum().backward()
        >>> w.grad.shape
        torch.Size([8, 32])
    """
    normalized_shape = _normalized_shape(normalized_shape)
    if use_aten(input):
        return aten_row_norm(input, normalized_shape, weight, bias, eps, rms=False)
    return layer_norm_op(input, normalized_shape, weight, bias, eps)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """Root Mean Square Normalization whose weight may be per-sample.

    Same signature and result as ``torch.nn.functional.rms_norm`` (eps None: the
    machine epsilon of the accumulation dtype, fp32 for fp16/bf16 input); ``weight``
    may be shared ``[*normalized_shape]`` or per-sample ``[N, *normalized_shape]``, as
    in :func:`layer_norm`, with the same batch-first contract.

    Args:
        input (Tensor[N, *, *normalized_shape]): floating-point input.
        normalized_shape (int or sequence of int): the trailing dims to normalise over.
        weight (Tensor[*normalized_shape] or Tensor[N, *normalized_shape], optional):
            scale, shared or per-sample.
        eps (float, optional): added to the mean square, >= 0.

    Returns:
        Tensor: the normalised input, its shape and dtype, contiguous.

    Example:
        >>> x = torch.randn(8, 16, 32)
        >>> w = torch.ones(8, 32, requires_grad=True)
        >>> persample.rms_norm(x, 32, w).sum().backward()
        >>> w.grad.shape
        torch.Size([8, 32])
    """
    normalized_shape = _normalized_shape(normalized_shape)
    if use_aten(input):
        return aten_row_norm(input, normalized_shape, weight, None, eps, rms=True)
    return rms_norm_op(input, normalized_shape, weight, eps)[0]


def aten_row_norm(input, normalized_shape, weight, bias, eps, rms):
    """:func:`layer_norm` (``rms``: :func:`rms_norm`) as ATen ops, for
    :func:`use_aten`: stock ``F.layer_norm`` / ``F.rms_norm``, and per-sample
    parameters applied to its output (inductor fuses both into the surrounding
    per-sample computation). The ops' own checks run first, so errors read the same.

    Measured (CPU, 2 cores, torch 2.13, a ViT's DP-SGD step under compiled
    ``vmap(grad)``): through the ops the step took 1.11x (0.98-1.22) stock's, whose
    LayerNorm inductor fuses; lowered it is stock's graph."""
    check_row_norm("rms_norm" if rms else "layer_norm", input, normalized_shape, weight, bias, eps)
    k = len(normalized_shape)
    shared = [p if p is None or p.dim() == k else None for p in (weight, bias)]
    if rms:
        out = F.rms_norm(input, normalized_shape, shared[0], rms_eps(eps, input.dtype))
    else:
        out = F.layer_norm(input, normalized_shape, shared[0], shared[1], eps)
    for p, scale in ((weight, True), (bias, False)):
        if p is not None and p.dim() == k + 1:  # [N, *ns], over every row of a sample
            row = p.view(p.shape[0], *(1,) * (input.dim() - k - 1), *p.shape[1:])
            out = out * row if scale else out + row
    return out.to(input.dtype)
