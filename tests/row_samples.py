"""Sample inputs of the row norms (``persample::layer_norm``, ``persample::rms_norm`` and
their backward ops) and an independent float64 reference, shared by the row-norm tests
(tests/test_row_norm_*.py), as tests/samples.py is for group_norm.

The reference is a per-example loop over stock ``F.layer_norm`` / ``F.rms_norm`` in
float64, each sample with parameter leaves of its own, so that stock autograd gives the
per-sample gradients. ``stock_loop`` is the same loop in the call's own dtypes: the
scale of the error model's tolerances (tests/error_model.py).
"""

import contextlib
import itertools
import warnings
from unittest import mock

import torch
import torch.nn.functional as F

import persample  # noqa: F401  (registers the ops)
from error_model import check_close, grad_input_scale
from persample.ops.row_norm import cpu as row_cpu
from persample.ops.shared import backends

layer_norm_op = torch.ops.persample.layer_norm.default
layer_norm_backward_op = torch.ops.persample.layer_norm_backward.default
rms_norm_op = torch.ops.persample.rms_norm.default
rms_norm_backward_op = torch.ops.persample.rms_norm_backward.default

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
REDUCED = (BF16, F16)

# (input shape, normalized_shape, input layout, weight kind, bias kind, eps, rms_norm's
# eps). Layouts: see make_input; kinds: see make_param. normalized_shape of rank 1-3,
# inputs of rank k+1 to k+3, size-1 dims, an empty middle dim, D = 1.
CASES = (
    ((3, 5), [5], "contiguous", "shared", "shared", 1e-5, None),
    ((2, 4, 6), [6], "contiguous", "per_sample", "per_sample", 1e-5, 1e-5),
    ((2, 3, 2, 5), [5], "batch_inner", "per_sample", "shared", 1e-5, None),
    ((2, 3, 4, 5), [4, 5], "transposed", "expanded", "per_sample", 1e-5, None),
    ((3, 1, 4, 5), [4, 5], "sliced", None, "shared", 0.0, 0.0),
    ((2, 2, 3, 2, 2), [3, 2, 2], "contiguous", "shared", None, 1e-3, 1e-3),
    ((2, 3, 2, 2), [3, 2, 2], "transposed", "per_sample", "per_sample", 1e-5, None),
    ((1, 1, 1), [1], "contiguous", "per_sample", "per_sample", 1e-5, None),
    ((2, 0, 4), [4], "contiguous", "per_sample", "shared", 1e-5, None),
    ((2, 3, 4), [4], "expanded", "expanded", "expanded", 1e-5, 1e-5),
    ((4, 2, 1, 3), [1, 3], "batch_inner", None, None, 1e-5, None),
    ((2, 1, 3, 1, 4), [1, 4], "sliced", "shared", "per_sample", 1e-5, None),
)

# Every output mask, cycled over the backward samples (there are more cases than masks).
LAYER_NORM_MASKS = [list(m) for m in itertools.product((True, False), repeat=3)]
RMS_NORM_MASKS = [list(m) for m in itertools.product((True, False), repeat=2)]


def make_input(shape, layout, *, gen, dtype=F32, device="cpu"):
    """A tensor of logical ``shape`` lying in memory as ``layout`` says: "contiguous";
    "batch_inner" (stored ``[M, N, ...]``, a sequence-first tensor seen batch-first);
    "transposed" (the last two dims swapped); "sliced" (step 2 along the last dim, at an
    offset); "expanded" (stride 0 along dim 1)."""
    def draw(s):
        return torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype)

    shape = tuple(shape)
    if layout == "contiguous":
        return draw(shape)
    if layout == "batch_inner":
        return draw((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    if layout == "transposed":
        return draw((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced":
        return draw((*shape[:-1], 2 * shape[-1] + 1))[..., 1::2]
    if layout == "expanded":
        return draw((shape[0], 1, *shape[2:])).expand(shape)
    raise ValueError(layout)


def make_param(kind, n, normalized_shape, *, gen, dtype=F32, device="cpu", weight=True):
    """None, "shared" ``[*ns]``, "per_sample" ``[N, *ns]`` or "expanded" (a shared one
    expanded to ``[N, *ns]``, stride 0). A weight lies away from zero, so that a wrong
    scale shows everywhere."""
    if kind is None:
        return None
    ns = tuple(normalized_shape)
    shape = (n, *ns) if kind == "per_sample" else ns
    p = torch.rand(shape, generator=gen, dtype=F64) + 0.5 if weight else torch.randn(shape, generator=gen, dtype=F64)
    p = p.to(device=device, dtype=dtype)
    return p.expand(n, *ns) if kind == "expanded" else p


def _case(i, device, dtype, param_dtype):
    shape, ns, layout, w_kind, b_kind, eps, rms_eps = CASES[i]
    gen = torch.Generator().manual_seed(i)
    x = make_input(shape, layout, gen=gen, dtype=dtype, device=device)
    kw = dict(gen=gen, dtype=param_dtype or dtype, device=device)
    w = make_param(w_kind, shape[0], ns, **kw)
    b = make_param(b_kind, shape[0], ns, weight=False, **kw)
    return x, list(ns), w, b, eps, rms_eps


def _grad(t, requires_grad):
    return None if t is None else t.requires_grad_(requires_grad)


def layer_norm_samples(device="cpu", *, requires_grad, dtype=F32, param_dtype=None):
    """Yields ``(input, normalized_shape, weight, bias, eps)`` for ``persample::layer_norm``."""
    for i in range(len(CASES)):
        x, ns, w, b, eps, _ = _case(i, device, dtype, param_dtype)
        yield _grad(x, requires_grad), ns, _grad(w, requires_grad), _grad(b, requires_grad), eps


def rms_norm_samples(device="cpu", *, requires_grad, dtype=F32, param_dtype=None):
    """Yields ``(input, normalized_shape, weight, eps)`` for ``persample::rms_norm``."""
    for i in range(len(CASES)):
        x, ns, w, _, _, eps = _case(i, device, dtype, param_dtype)
        yield _grad(x, requires_grad), ns, _grad(w, requires_grad), eps


def _grad_out(out, i, requires_grad):
    # Every third sample gets the stride-0 grad_out that ``y.sum().backward()`` makes.
    gen = torch.Generator().manual_seed(100 + i)
    g = torch.randn(out.shape, generator=gen, dtype=F64).to(out)
    if i % 3 == 0:
        g = torch.randn((), generator=gen, dtype=F64).to(out).expand_as(out)
    return g.requires_grad_(requires_grad)


def layer_norm_backward_samples(device="cpu", *, requires_grad, dtype=F32, param_dtype=None):
    """Yields ``(grad_out, input, normalized_shape, mean, rstd, weight, output_mask, eps)``."""
    for i in range(len(CASES)):
        x, ns, w, _, eps, _ = _case(i, device, dtype, param_dtype)
        out, mean, rstd = layer_norm_op(x, ns, None, None, eps)  # stats do not depend on w, b
        mask = LAYER_NORM_MASKS[i % len(LAYER_NORM_MASKS)]
        yield (_grad_out(out, i, requires_grad), _grad(x, requires_grad), ns, mean, rstd,
               _grad(w, requires_grad), mask, eps)


def rms_norm_backward_samples(device="cpu", *, requires_grad, dtype=F32, param_dtype=None):
    """Yields ``(grad_out, input, normalized_shape, rstd, weight, output_mask, eps)``."""
    for i in range(len(CASES)):
        x, ns, w, _, _, eps = _case(i, device, dtype, param_dtype)
        out, rstd = rms_norm_op(x, ns, None, eps)
        mask = RMS_NORM_MASKS[i % len(RMS_NORM_MASKS)]
        yield _grad_out(out, i, requires_grad), _grad(x, requires_grad), ns, rstd, _grad(w, requires_grad), mask, eps


def resolved_eps(eps, dtype):
    """rms_norm's eps: None stands for the machine epsilon of the accumulation dtype
    (fp32 for fp16/bf16 input), as ``aten::_fused_rms_norm`` takes it; stock
    ``F.rms_norm`` is given it explicitly here."""
    return torch.finfo(F32 if dtype in REDUCED else dtype).eps if eps is None else eps


def _canonical(t):
    # Canonical contiguous strides (clone, not contiguous(), which keeps the strides of
    # size-1 dims), in float64 on CPU.
    return t.detach().to("cpu", F64).clone(memory_format=torch.contiguous_format)


def _leaf(p, i, normalized_shape, fill, dtype=F64):
    """Sample ``i``'s ``[*ns]`` slice of a parameter as a fresh leaf; ``fill`` if absent."""
    ns = tuple(normalized_shape)
    if p is None:
        row = torch.full(ns, fill, dtype=dtype)
    else:
        row = p[i] if p.dim() == len(ns) + 1 else p
    return row.detach().to("cpu", dtype).clone().requires_grad_()


def _stock(x, ns, w, b, eps, rms):
    if rms:
        with warnings.catch_warnings():  # mixed dtypes: "Cannot dispatch to fused implementation"
            warnings.simplefilter("ignore", UserWarning)
            return F.rms_norm(x, ns, w, eps)
    return F.layer_norm(x, ns, w, b, eps)


def reference(x, normalized_shape, weight, bias, eps, grad_out, rms=False):
    """Per-example loop over stock ``F.layer_norm`` (``rms``: ``F.rms_norm``) in float64,
    on CPU: ``(out, grad_input, grad_weight, grad_bias)``, the parameter gradients
    per-sample ``[N, *normalized_shape]`` (an absent weight counts as ones, an absent
    bias as zeros; grad_bias None for rms_norm)."""
    ns = list(normalized_shape)
    eps = resolved_eps(eps, x.dtype) if rms else eps
    outs, grads = [], []
    for i in range(x.shape[0]):
        xi = _canonical(x[i : i + 1]).requires_grad_()
        leaves = [xi, _leaf(weight, i, ns, 1.0)] + ([] if rms else [_leaf(bias, i, ns, 0.0)])
        yi = _stock(xi, ns, leaves[1], None if rms else leaves[2], eps, rms)
        outs.append(yi.detach())
        grads.append(torch.autograd.grad(yi, leaves, _canonical(grad_out[i : i + 1])))
    gx, gw, *gb = zip(*grads)
    return torch.cat(outs), torch.cat(gx), torch.stack(gw), torch.stack(gb[0]) if gb else None


def stock_loop(x, normalized_shape, weight, bias, eps, grad_out, rms=False):
    """The same loop in the call's own dtypes and device, one example at a time with its
    own parameter slices: ``(out, grad_input, grad_weight rows, grad_bias rows)``. The
    output comes from the call's own parameters (an absent one takes another code
    path); the gradients from ones and zeros for absent ones, as the ops define them."""
    ns = list(normalized_shape)
    eps = resolved_eps(eps, x.dtype) if rms else eps
    p = weight if weight is not None else bias
    dtype = x.dtype if p is None else p.dtype
    params = (weight,) if rms else (weight, bias)
    outs = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().clone(memory_format=torch.contiguous_format).requires_grad_()
        own = [None if p is None else p[i] if p.dim() == len(ns) + 1 else p for p in params]
        leaves = [
            (torch.full(ns, fill, dtype=dtype, device=x.device) if q is None else q).detach().clone().requires_grad_()
            for q, fill in zip(own, (1.0, 0.0))
        ]
        yi = _stock(xi, ns, leaves[0], None if rms else leaves[1], eps, rms)
        gi = grad_out[i : i + 1].detach().clone(memory_format=torch.contiguous_format)
        grads = torch.autograd.grad(yi, [xi, *leaves], gi)
        if any(q is None for q in own):
            yi = _stock(xi, ns, own[0], None if rms else own[1], eps, rms)
        outs.append((yi.detach(), *grads))
    y, gx, gw, *gb = zip(*outs)
    return torch.cat(y), torch.cat(gx), torch.stack(gw), torch.stack(gb[0]) if gb else None


def reference_stats(x, normalized_shape, eps, rms=False):
    """float64 ``(mean, rstd)`` (``(rstd,)`` for rms_norm) of the same rounded input, in
    the statistics' shape (the input's, with the normalised dims 1)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    v = x.detach().to("cpu", F64)
    if rms:
        return ((v.square().mean(dims, keepdim=True) + resolved_eps(eps, x.dtype)).rsqrt(),)
    mean = v.mean(dims, keepdim=True)
    return mean, ((v - mean).square().mean(dims, keepdim=True) + eps).rsqrt()


def stock_stats(x, normalized_shape, eps, rms=False):
    """The statistics stock ATen computes for the same input, in the accumulation dtype
    (fp32 for fp16/bf16 input, whose statistics ``native_layer_norm`` would round to
    the input's dtype, where persample's stay fp32)."""
    acc = F32 if x.dtype in REDUCED else x.dtype
    v = x.detach().to(acc).clone(memory_format=torch.contiguous_format)
    if rms:
        return (torch.ops.aten._fused_rms_norm(v, list(normalized_shape), None, resolved_eps(eps, x.dtype))[1],)
    return torch.native_layer_norm(v, list(normalized_shape), None, None, eps)[1:]


def check_statistics(x, normalized_shape, eps, stats, rms=False):
    """The forward op's statistics: shape (the input's, with the normalised dims 1) and
    dtype (fp32 for fp16/bf16 input), and values by the error model."""
    acc = F32 if x.dtype in REDUCED else x.dtype
    want = reference_stats(x, normalized_shape, eps, rms)
    stock = stock_stats(x, normalized_shape, eps, rms)
    for name, got, w, s in zip(("rstd",) if rms else ("mean", "rstd"), stats, want, stock):
        assert got.shape == w.shape and got.dtype == acc, (name, got.shape, w.shape, got.dtype)
        if w.numel():
            check_close(got, w, s, name)


def check_results(got, params, normalized_shape, ref, stock, what="", rstd=None, grad_out=None):
    """persample's ``(out, grad_input, grad_weight, grad_bias)`` (None where not computed)
    against ``ref`` (:func:`reference`) by the error model, ``stock``
    (:func:`stock_loop`) its scale; ``params`` are (weight, bias): a ``[*ns]`` one's
    gradient is the batch sum, of stock's rows summed exactly and then rounded.
    grad_input's floor also covers 4 fp32 ulps of its terms before they cancel
    (``error_model.grad_input_scale``), from ``rstd`` and ``grad_out``."""
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    for i, (name, g, want, stock_g) in enumerate(zip(names, got, ref, stock)):
        if g is None:
            continue
        p = params[i - 2] if i >= 2 else None
        if p is not None:
            assert g.shape == p.shape and g.dtype == p.dtype, (what, name, g.shape, g.dtype)
        if p is not None and p.dim() == len(normalized_shape):
            want, stock_g = want.sum(0), stock_g.to(F64).sum(0).to(stock_g.dtype)
        if not want.numel():  # error_model.check_close reads the largest entry
            assert g.shape == want.shape, (what, name, g.shape)
            continue
        scale = 0.0
        if name == "grad_input" and rstd is not None:
            scale = grad_input_scale(grad_out, rstd, params[0])
        check_close(g, want, stock_g, f"{what}{name}", scale)


def check_backward_masks(x, normalized_shape, masks, results, ref, stock, what, rstd, grad_out):
    """The backward op's ``results`` under each of ``masks``: masked outputs empty,
    per-sample ``[N, *ns]`` parameter gradients in the accumulation dtype, and each
    result against ``ref`` by :func:`check_results`, compared as per-sample rows
    whatever the parameters' kinds."""
    ns = list(normalized_shape)
    acc = F32 if x.dtype in REDUCED else x.dtype
    for mask, grads in zip(masks, results):
        where = f"{what}output_mask {mask}: "
        for j, (keep, g) in enumerate(zip(mask, grads)):
            if not keep:
                assert g.shape == (0,), where
            elif j:
                assert g.shape == (x.shape[0], *ns) and g.dtype == acc, where
        got = (None, *(g if keep else None for keep, g in zip(mask, grads)))
        check_results(got, (None, None), ns, ref, stock, where, rstd, grad_out)


@contextlib.contextmanager
def kernel_path(path):
    """``cpp``: as installed (the C++ library serves the CPU calls it handles).
    ``python``: the ATen formulas of ops/row_norm/kernels.py alone, as without the
    library (and without triton's interpreter, which tests/conftest.py switches on and
    which would otherwise serve CPU calls: tests/test_triton_row_norm.py tests it)."""
    if path == "python":
        with mock.patch.multiple(row_cpu, _forward_op=None, _backward_op=None), \
                mock.patch.dict(backends._modules, {backends.ROW_NORM_TRITON: False}):
            yield
    else:
        yield
