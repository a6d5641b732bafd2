"""The row norms, ``persample.layer_norm`` / ``rms_norm`` and their ops, against the
float64 per-example loop over stock ``F.layer_norm`` / ``F.rms_norm``
(tests/row_samples.py) by the error model (tests/error_model.py), on both kernel paths:
outputs, statistics, grad_input, per-sample gradients of ``[N, *ns]`` parameters and
batch sums of shared ones, in fp64/fp32/bf16/fp16; then gradcheck and gradgradcheck,
forward-mode AD, vmap of both ops, eager ``vmap(grad)`` per-sample gradients, and the
large-mean numerics of the per-sample weight gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import persample
from error_model import ULPS, check_close, max_error
from persample.ops.shared import backends
from row_samples import (
    BF16, F16, F32, F64, LAYER_NORM_MASKS, RMS_NORM_MASKS, check_backward_masks, check_results,
    check_statistics,
    kernel_path, layer_norm_backward_op, layer_norm_op, layer_norm_samples, reference,
    reference_stats, resolved_eps, rms_norm_backward_op, rms_norm_op, rms_norm_samples, stock_loop,
)

PATHS = [
    pytest.param("cpp", marks=pytest.mark.skipif(backends.LIBRARY is None, reason="C++ library not loaded")),
    "python",
]
DTYPES = [
    pytest.param(F64, None, id="float64"),
    pytest.param(F32, None, id="float32"),
    pytest.param(BF16, None, id="bfloat16"),
    pytest.param(F16, None, id="float16"),
    pytest.param(BF16, F32, id="bfloat16-fp32-params"),
]
OPS = pytest.mark.parametrize("rms", (False, True), ids=("layer_norm", "rms_norm"))


def samples(rms, **kw):
    """``(input, normalized_shape, weight, bias, eps)``, bias None for rms_norm."""
    if rms:
        return ((x, ns, w, None, eps) for x, ns, w, eps in rms_norm_samples(**kw))
    return layer_norm_samples(**kw)


def public(rms, x, ns, w, b, eps):
    return persample.rms_norm(x, ns, w, eps) if rms else persample.layer_norm(x, ns, w, b, eps)


def grad_out_for(x, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=F64).to(x.dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPES)
@OPS
def test_autograd_matches_reference(path, dtype, param_dtype, rms):
    for i, (x, ns, w, b, eps) in enumerate(samples(rms, requires_grad=False, dtype=dtype, param_dtype=param_dtype)):
        # Which leaves require grad, cycled: all; the input alone; the parameters alone.
        leaves = [None if t is None else t.detach().requires_grad_(i % 3 == 0 or (j == 0) == (i % 3 == 1))
                  for j, t in enumerate((x, w, b))]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        go = grad_out_for(x, i)
        with kernel_path(path):
            y = public(rms, leaves[0], ns, leaves[1], leaves[2], eps)
            grads = iter(torch.autograd.grad(y, wanted, go) if wanted else ())
        grads = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
        ref, stock = reference(x, ns, w, b, eps, go, rms), stock_loop(x, ns, w, b, eps, go, rms)
        rstd = reference_stats(x, ns, eps, rms)[-1]
        check_results((y, *grads), (w, b), ns, ref, stock, f"sample {i}: ", rstd, go)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPES)
@OPS
def test_ops_match_reference(path, dtype, param_dtype, rms):
    """The forward op's output and statistics; the backward op under every output mask,
    its parameter gradients per-sample ``[N, *ns]`` in the accumulation dtype."""
    masks = RMS_NORM_MASKS if rms else LAYER_NORM_MASKS
    for i, (x, ns, w, b, eps) in enumerate(samples(rms, requires_grad=False, dtype=dtype, param_dtype=param_dtype)):
        go = grad_out_for(x, i)
        with kernel_path(path):
            out, *stats = rms_norm_op(x, ns, w, eps) if rms else layer_norm_op(x, ns, w, b, eps)
            if rms:
                bwd = [rms_norm_backward_op(go, x, ns, *stats, w, m, eps) for m in masks]
            else:
                bwd = [layer_norm_backward_op(go, x, ns, *stats, w, m, eps) for m in masks]
        ref, stock = reference(x, ns, w, b, eps, go, rms), stock_loop(x, ns, w, b, eps, go, rms)
        check_results((out, None), (w, b), ns, ref, stock, f"sample {i}: ")
        check_statistics(x, ns, eps, stats, rms)
        check_backward_masks(x, ns, masks, bwd, ref, stock, f"sample {i}, ", stats[-1], go)


# float64 problems for gradcheck: normalised dims of rank 1 and 2, a middle dim.
GRADCHECK = (((2, 2, 3), [3]), ((2, 1, 2, 3), [2, 3]))


def gradcheck_inputs(shape, ns, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pshape = tuple(ns) if kind == "shared" else (shape[0], *ns)
    x = torch.randn(shape, generator=gen, dtype=F64)
    w = torch.rand(pshape, generator=gen, dtype=F64) + 0.5
    b = torch.randn(pshape, generator=gen, dtype=F64)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ("shared", "per_sample"))
@OPS
def test_gradcheck_and_gradgradcheck(path, kind, rms):
    for shape, ns in GRADCHECK:
        x, w, b = gradcheck_inputs(shape, ns, kind)
        args = (x, w) if rms else (x, w, b)

        def fn(x, w, b=None):
            return public(rms, x, ns, w, b, 1e-5)

        with kernel_path(path):
            assert gradcheck(fn, args, check_forward_ad=True)
            # Double backward: through the backward op's own derivative.
            assert gradgradcheck(fn, args)


@OPS
def test_backward_op_gradcheck(rms):
    for kind in ("shared", "per_sample"):
        for shape, ns in GRADCHECK:
            x, w, _ = (t.detach() for t in gradcheck_inputs(shape, ns, kind))
            stats = rms_norm_op(x, ns, w)[1:] if rms else layer_norm_op(x, ns, w)[1:]
            go = torch.randn_like(x).requires_grad_()
            op, mask = (rms_norm_backward_op, [True, True]) if rms else (layer_norm_backward_op, [True] * 3)
            # The derivative recomputes the statistics from the input: the input stays fixed.
            assert gradcheck(lambda go, w: op(go, x, ns, *stats, w, mask, 1e-5), (go, w.requires_grad_()))


def stock_function(rms, ns):
    """Stock's layer with per-sample ``[N, *ns]`` parameters broadcast over the middle dims."""
    def fn(x, w, b=None):
        def rows(p):
            return p if p.dim() == len(ns) else p.view(p.shape[0], *(1,) * (x.dim() - len(ns) - 1), *ns)

        y = F.rms_norm(x, ns, None, 1e-5) if rms else F.layer_norm(x, ns, None, None, 1e-5)
        y = y * rows(w)
        return y if b is None else y + rows(b)

    return fn


@pytest.mark.parametrize("kind", ("shared", "per_sample"))
@OPS
def test_jvp_matches_stock(kind, rms):
    for shape, ns in GRADCHECK:
        x, w, b = (t.detach() for t in gradcheck_inputs(shape, ns, kind))
        args = (x, w) if rms else (x, w, b)
        tangents = tuple(torch.randn_like(t) for t in args)
        ours = torch.func.jvp(lambda *a: public(rms, a[0], ns, a[1], a[2] if len(a) > 2 else None, 1e-5),
                              args, tangents)
        stock = torch.func.jvp(stock_function(rms, ns), args, tangents)
        torch.testing.assert_close(ours, stock)


B, N, M, D = 3, 2, 4, 5


def t(*shape):
    return torch.randn(shape, dtype=F64)


# (input, weight, bias, in_dims) with B vmapped items, each an [N, M, D] call with
# normalized_shape [D]; the last has normalized_shape [2, D].
VMAP_CASES = {
    "input_only": (t(B, N, M, D), None, None, (0, None, None)),
    "shared_params": (t(B, N, M, D), t(D), t(D), (0, None, None)),
    "batched_shared_weight": (t(B, N, M, D), t(B, D), t(D), (0, 0, None)),
    "batched_per_sample_params": (t(B, N, M, D), t(B, N, D), t(B, D), (0, 0, 0)),
    "unbatched_input": (t(N, M, D), t(B, D), t(N, D), (None, 0, None)),
    "nonzero_in_dims": (t(N, M, B, D), t(D, B), t(N, B, D), (2, 1, 1)),
    "two_normalised_dims": (t(B, N, 3, 2, D), t(B, N, 2, D), t(2, D), (0, 0, None)),
}


def loop(fn, args, in_dims):
    """``fn`` applied to each vmapped item in turn, outputs stacked along dim 0."""
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(size)]
    return tuple(torch.stack(o) for o in zip(*outs))


@OPS
def test_vmap_forward_and_backward_ops_match_loop(rms):
    masks = RMS_NORM_MASKS if rms else LAYER_NORM_MASKS
    for i, (name, (x, w, b, in_dims)) in enumerate(VMAP_CASES.items()):
        ns = [2, D] if name == "two_normalised_dims" else [D]
        forward_dims = in_dims[:2] if rms else in_dims

        def forward(x, w, b=None):
            return rms_norm_op(x, ns, w, None) if rms else layer_norm_op(x, ns, w, b, 1e-5)

        args = (x, w) if rms else (x, w, b)
        got = torch.vmap(forward, forward_dims)(*args)
        torch.testing.assert_close(got, loop(forward, args, forward_dims), msg=name)
        # The backward op on the forward's (batched) statistics, with a batched grad_out.
        mask = masks[i % len(masks)]
        op = rms_norm_backward_op if rms else layer_norm_backward_op
        x0 = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(B, *x.shape)
        go, stats = torch.randn_like(x0), got[1:]

        def backward(go, x, w, *stats):
            return op(go, x, ns, *stats, w, mask, None if rms else 1e-5)

        bargs, bdims = (go, x0, w, *stats), (0, 0, in_dims[1], *(0,) * len(stats))
        torch.testing.assert_close(torch.vmap(backward, bdims)(*bargs), loop(backward, bargs, bdims), msg=name)


@OPS
def test_vmap_backward_op_any_batched_subset(rms):
    """Every subset of (grad_out, input, statistics, weight) batched, shared and
    per-sample weights, against a loop."""
    op, masks = (rms_norm_backward_op, RMS_NORM_MASKS) if rms else (layer_norm_backward_op, LAYER_NORM_MASKS)
    n_stats = 1 if rms else 2
    for i, bits in enumerate(range(1, 2 ** (3 + n_stats))):
        batched = [bool(bits >> j & 1) for j in range(3 + n_stats)]
        mask = masks[i % len(masks)]
        shapes = [(N, M, D), (N, M, D), *((N, M, 1),) * n_stats, (N, D) if i % 2 else (D,)]
        args = [t(*((B,) + s if bat else s)).abs() + 0.1 for s, bat in zip(shapes, batched)]
        dims = tuple(0 if bat else None for bat in batched)

        def fn(go, x, *rest):
            return op(go, x, [D], *rest[:n_stats], rest[n_stats], mask, None if rms else 1e-5)

        got = torch.vmap(fn, dims)(*args)
        torch.testing.assert_close(got, loop(fn, args, dims), msg=f"batched {batched}, mask {mask}")


@OPS
def test_vmap_grad_per_sample_gradients(rms):
    """The torch.func recipe over ``functional_call`` of persample.nn.LayerNorm /
    RMSNorm in fp32, one [T, *ns] example at a time: the per-sample gradients of shared
    parameters, against the float64 loop, bounded by stock's nn layer under the same
    recipe in fp32."""
    ns, n, seq = [3, 4], 4, 5
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(n, seq, *ns, generator=gen, dtype=F64).float() for _ in "xr")
    ours = (persample.nn.RMSNorm if rms else persample.nn.LayerNorm)(ns)
    stock = (torch.nn.RMSNorm if rms else torch.nn.LayerNorm)(ns)
    params = {k: torch.randn(p.shape, generator=gen) + 1 for k, p in ours.named_parameters()}

    def per_sample(module):
        def loss(params, x, r):
            return (torch.func.functional_call(module, params, (x.unsqueeze(0),)) * r).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, r)

    got, stock_grads = per_sample(ours), per_sample(stock)
    eps = ours.eps if not rms else resolved_eps(ours.eps, F32)
    ref = reference(x, ns, params["weight"], params.get("bias"), eps, r, rms)
    for name, want in zip(("weight", "bias"), ref[2:]):
        if name in params:
            assert got[name].shape == (n, *ns)
            check_close(got[name], want, stock_grads[name], f"per-sample grad_{name}")


@pytest.mark.parametrize("path", PATHS)
def test_large_mean_per_sample_weight_grad(path):
    """mean/std = 1e3 in fp32: stock's dgamma, sum(dy * x) * rstd - mean * rstd * sum(dy),
    cancels. The op's may be no worse than its saved fp32 statistics imply (the float64
    dgamma from the exact statistics rounded to fp32), within twice that plus 4 ulps;
    the C++ kernel centres on the exact mean (ops/csrc/row_norm_kernels.h), so only
    rounding is left there: 4 ulps of the result. Measured (AVX2, torch 2.14.1): cpp
    1.5e-7, python 1.9e-5 (= implied), implied 1.9e-5, stock 4.5e-5."""
    n, m, d = 4, 64, 256
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, m, d, generator=gen, dtype=F64) + 1e3).float()
    dy = torch.randn(n, m, d, generator=gen, dtype=F64).float()
    w = (torch.rand(n, d, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(n, d, generator=gen).requires_grad_()
    with kernel_path(path):
        (gw,) = torch.autograd.grad(persample.layer_norm(x, d, w, b), (w,), dy)
    want = reference(x, [d], w, b, 1e-5, dy)[2]
    stock = stock_loop(x, [d], w, b, 1e-5, dy)[2]
    mean, rstd = (s.float().double() for s in reference_stats(x, [d], 1e-5))
    implied = (dy.double() * (x.double() - mean) * rstd).sum(1)
    scale = want.abs().max().item()
    errors = {k: max_error(v, want) / scale for k, v in (("ours", gw), ("stock", stock), ("implied", implied))}
    print(f"\n{path}: per-sample dgamma relative error at mean/std = 1e3 (fp32): "
          + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    floor = ULPS * torch.finfo(F32).eps
    assert errors["ours"] <= 2 * errors["implied"] + floor, errors
    assert errors["stock"] > errors["ours"], errors
    if path == "cpp":
        assert errors["ours"] <= floor, errors
