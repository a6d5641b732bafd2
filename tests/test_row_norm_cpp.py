"""The fused C++ CPU kernels of the row norms (ops/csrc/row_norm_kernels.h), through the
selectors of ops/row_norm/cpu.py, ``forward_kernel`` and ``backward_kernel``: on
``[N, M, D]`` inputs, against float64 references of the same rounded inputs, within
twice stock PyTorch's own error (tests/error_model.py), stock being ``F.layer_norm`` and
``aten._fused_rms_norm`` called on one sample at a time, in the same dtype."""

import os
import unittest

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import persample  # noqa: F401  (loads the library)
from persample.ops.row_norm import cpu as row_cpu
from persample.ops.shared import backends
from error_model import check_close, grad_input_scale, max_error
from strategies import examples
from testcase import TestCase, run_tests

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
BUILT = backends.LIBRARY is not None
# scripts/test.sh sets this where it builds the library: a failed build must fail here.
REQUIRED = os.environ.get("PERSAMPLE_REQUIRE_CPP") == "1"
needs_library = unittest.skipUnless(BUILT or REQUIRED, "the C++ library is not built (see setup.py)")

# How a [D] or [N, D] parameter is given.
PARAM_KINDS = (None, "shared", "per_sample", "expanded", "row_strided", "inner_strided")
ALL = (True, True, True)


def make_param(kind, n, d, dtype, gen):
    if kind is None:
        return None
    if kind == "shared":
        return torch.randn(d, generator=gen).to(dtype)
    if kind == "per_sample":
        return torch.randn(n, d, generator=gen).to(dtype)
    if kind == "expanded":  # [N, D] of stride (0, 1)
        return torch.randn(d, generator=gen).to(dtype).expand(n, d)
    if kind == "row_strided":  # rows further apart than D
        return torch.randn(n, d + 3, generator=gen).to(dtype)[:, :d]
    return torch.randn(n, 2 * d, generator=gen).to(dtype)[:, ::2]  # inner stride 2


def make_call(n, m, d, dtype, rms, wkind, bkind, offset=0.0, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, m, d, generator=gen, dtype=F64) + offset).to(dtype)
    dy = torch.randn(n, m, d, generator=gen).to(dtype)
    w = make_param(wkind, n, d, param_dtype or dtype, gen)
    b = None if rms else make_param(bkind, n, d, param_dtype or dtype, gen)
    return x, dy, w, b


def per_sample_leaf(p, n):
    return None if p is None else p.detach().to(F64).expand(n, -1).clone().requires_grad_()


def grads(y, inputs, dy):
    """The gradients of ``y`` for the inputs that are not None (None for the others)."""
    given = [t for t in inputs if t is not None]
    it = iter(torch.autograd.grad(y, given, dy))
    return [None if t is None else next(it) for t in inputs]


def reference(x, dy, w, b, rms, eps):
    """float64 (y, mean, rstd, grad_input, grad_weight [N, D], grad_bias [N, D])."""
    n = x.shape[0]
    x64 = x.detach().to(F64).requires_grad_()
    w64, b64 = per_sample_leaf(w, n), per_sample_leaf(b, n)
    if rms:
        mean, rstd = None, (x64.square().mean(-1, keepdim=True) + eps).rsqrt()
        y = x64 * rstd
    else:
        mean = x64.mean(-1, keepdim=True)
        rstd = (x64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
        y = (x64 - mean) * rstd
    if w64 is not None:
        y = y * w64[:, None]
    if b64 is not None:
        y = y + b64[:, None]
    gi, gw, gb = grads(y, (x64, w64, b64), dy.to(F64))
    stats = [None if s is None else s.detach().squeeze(-1) for s in (mean, rstd)]
    return (y.detach(), *stats, gi, gw, gb)


def stock(x, dy, w, b, rms, eps):
    """The same from stock PyTorch in the input's dtype, one sample at a time (its own
    gradients are batch sums); statistics from ATen's whole-batch kernels."""
    n, _, d = x.shape
    ys, gis, gws, gbs = [], [], [], []
    for i in range(n):
        xi = x[i].detach().clone().requires_grad_()
        wi, bi = [None if p is None else (p[i] if p.dim() == 2 else p).detach().clone().requires_grad_()
                  for p in (w, b)]
        if rms:
            y = torch.ops.aten._fused_rms_norm(xi, [d], wi, eps)[0]
        else:
            y = F.layer_norm(xi, (d,), wi, bi, eps)
        gi, gw, gb = grads(y, (xi, wi, bi), dy[i])
        ys.append(y.detach())
        gis.append(gi)
        gws.append(gw)
        gbs.append(gb)
    stack = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
    if rms:
        mean, rstd = None, torch.ops.aten._fused_rms_norm(x, [d], None, eps)[1].squeeze(-1)
    else:
        _, mean, rstd = torch.native_layer_norm(x, (d,), None, None, eps)
        mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
    return torch.stack(ys), mean, rstd, stack(gis), stack(gws), stack(gbs)


def fused(x, dy, w, b, rms, eps, mask=ALL):
    forward = row_cpu.forward_kernel(x, w, b)
    backward = row_cpu.backward_kernel(x, w)
    assert forward is not None and backward is not None, "the library's row-norm kernels are not loaded"
    y, mean, rstd = forward(x, w, b, rms, eps)
    return (y, mean, rstd, *backward(dy, x, mean, rstd, w, rms, mask))


def check_call(x, dy, w, b, rms, eps=1e-5, what=""):
    got = fused(x, dy, w, b, rms, eps, (True, w is not None, b is not None))
    want, base = reference(x, dy, w, b, rms, eps), stock(x, dy, w, b, rms, eps)
    acc = F32 if x.dtype == BF16 else x.dtype
    y, mean, rstd, gi, gw, gb = got
    assert y.dtype == gi.dtype == x.dtype and rstd.dtype == acc, what
    assert (mean is None) == rms and (mean is None or mean.dtype == acc), what
    scales = (0.0, 0.0, 0.0, grad_input_scale(dy, want[2], w), 0.0, 0.0)
    names = ("output", "mean", "rstd", "grad_input", "grad_weight", "grad_bias")
    for name, g, r, s, scale in zip(names, got, want, base, scales):
        assert (g is None) == (r is None), f"{what}{name}"
        if g is not None:
            assert g.shape == r.shape and g.is_contiguous(), f"{what}{name}"
            assert name in ("output", "grad_input") or g.dtype == acc, f"{what}{name}"
            check_close(g, r, s, f"{what}{name}", scale=scale)


@needs_library
class TestRowNormKernels(TestCase):
    def test_built_where_required(self):
        if not REQUIRED:
            self.skipTest("PERSAMPLE_REQUIRE_CPP is not set")
        self.assertTrue(BUILT, f"no {backends.library_name()}.so next to persample/__init__.py")

    def test_cases(self):
        # Size-1 dims; M = 1 (sums straight into the output); rows summed in blocks of
        # 16 by one task; samples split over tasks (about 32K elements each: D = 300
        # takes 110 rows a task, D = 2000 takes 17) with rows past 1024 elements.
        shapes = ((1, 1, 1), (4, 5, 1), (3, 1, 7), (8, 1, 33), (1, 17, 5), (3, 120, 300), (2, 40, 2000))
        for dtype in (F64, F32, BF16):
            for shape in shapes:
                for rms in (False, True):
                    for wkind, bkind in ((None, None), ("shared", "per_sample"), ("expanded", "shared"),
                                         ("per_sample", None)):
                        with self.subTest(dtype=dtype, shape=shape, rms=rms, w=wkind, b=bkind):
                            check_call(*make_call(*shape, dtype, rms, wkind, bkind, offset=2.0), rms)

    def test_large_mean_fp32(self):
        # mean/std = 1e3: the statistics and the per-sample dgamma must not cancel.
        for rms in (False, True):
            for shape in ((4, 64, 256), (2, 3, 1500)):
                x, dy, w, b = make_call(*shape, F32, rms, "per_sample", "per_sample", offset=1e3)
                check_call(x, dy, w, b, rms, what=f"rms={rms} {shape}: ")
                if not rms:
                    gw, want = fused(x, dy, w, b, rms, 1e-5)[4], reference(x, dy, w, b, rms, 1e-5)[4]
                    # What fp32 statistics imply: rstd's rounding, a few ulps (1.3e-7
                    # measured), not the 4e-5 that stock's cancelling form costs here.
                    self.assertLess(max_error(gw, want) / want.abs().max().item(), 1e-6)

    def test_param_layouts(self):
        for kind in PARAM_KINDS[1:]:
            for rms in (False, True):
                with self.subTest(kind=kind, rms=rms):
                    check_call(*make_call(3, 4, 9, F32, rms, kind, kind), rms)

    def test_fp32_params_with_bf16_input(self):
        for rms in (False, True):
            x, dy, w, b = make_call(2, 5, 24, BF16, rms, "per_sample", "shared", param_dtype=F32)
            check_call(x, dy, w, b, rms)

    def test_output_mask(self):
        x, dy, w, b = make_call(3, 40, 900, F32, False, "per_sample", "shared")
        full = fused(x, dy, w, b, False, 1e-5)[3:]
        for mask in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
            got = fused(x, dy, w, b, False, 1e-5, mask)[3:]
            for wanted, g, f in zip(mask, got, full):
                if wanted:
                    self.assertTrue(torch.equal(g, f), mask)
                else:
                    self.assertIsNone(g, mask)
        # RMSNorm has no bias gradient, whatever the mask says.
        self.assertIsNone(fused(x, dy, w, None, True, 1e-5)[5])

    def test_strided_grad_out(self):
        x, dy, w, b = make_call(2, 3, 8, F32, False, "shared", "shared")
        ones = torch.ones(1, 1, 1).expand(2, 3, 8)  # y.sum().backward()'s grad_out
        self.assertEqual(fused(x, ones, w, b, False, 1e-5)[3:], fused(x, ones.contiguous(), w, b, False, 1e-5)[3:])

    def test_same_results_on_any_thread_count(self):
        # Tasks depend on the shape only, never on the thread count.
        x, dy, w, b = make_call(3, 130, 600, F32, False, "per_sample", "shared")
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = fused(x, dy, w, b, False, 1e-5)
        finally:
            torch.set_num_threads(threads)
        for a, c in zip(one, fused(x, dy, w, b, False, 1e-5)):
            self.assertTrue(torch.equal(a, c))

    def test_selectors_decline(self):
        x = torch.randn(2, 3, 4)
        w64 = torch.randn(4, dtype=F64)
        self.assertIsNone(row_cpu.forward_kernel(x, w64, None))
        self.assertIsNone(row_cpu.backward_kernel(x, w64))
        xb = x.to(BF16)
        self.assertIsNone(row_cpu.forward_kernel(xb, None, torch.randn(4, dtype=torch.float16)))
        self.assertIsNotNone(row_cpu.forward_kernel(xb, torch.randn(4), xb[0, 0]))
        self.assertIsNone(row_cpu.forward_kernel(x.to(torch.int32), None, None))


@needs_library
class TestRowNormProperties(TestCase):
    @examples(30)
    @given(
        n=st.integers(1, 3),
        m=st.integers(1, 4),
        d=st.sampled_from((1, 2, 3, 7, 16, 33, 130)),
        dtype=st.sampled_from((F32, F64, BF16)),
        rms=st.booleans(),
        wkind=st.sampled_from(PARAM_KINDS),
        bkind=st.sampled_from(PARAM_KINDS),
        fp32_params=st.booleans(),
        offset=st.sampled_from((0.0, 3.0, 100.0)),
        eps=st.sampled_from((1e-5, 1e-2)),
        seed=st.integers(0, 2**16),
    )
    def test_matches_reference(self, n, m, d, dtype, rms, wkind, bkind, fp32_params, offset, eps, seed):
        param_dtype = F32 if fp32_params and dtype == BF16 else dtype
        x, dy, w, b = make_call(n, m, d, dtype, rms, wkind, bkind, offset, param_dtype, seed)
        check_call(x, dy, w, b, rms, eps)


if __name__ == "__main__":
    run_tests()
