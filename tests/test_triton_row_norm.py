"""The row norms' Triton kernels (ops/row_norm/triton_launch.py, the launches of
ops/row_norm/triton_kernels.py) against float64 references computed here, bounded by
tests/error_model.py against stock ``layer_norm`` / ``_fused_rms_norm`` in the same dtype.

Without a CUDA device, triton's interpreter runs them on CPU tensors (tests/conftest.py
switches it on, as for tests/test_triton.py); on a GPU the same tests run the compiled
kernels. The interpreter costs ~10 ms a program: the shapes are tiny, and module knobs
(lowered here) reach the swept rows, multi-tile ranges and the merge of ranges.
tests/test_triton_compile.py compiles the real launches for sm_90.
"""

import contextlib
import itertools
import os
from unittest import mock

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from error_model import check_close, grad_input_scale  # noqa: E402
from persample.ops.row_norm import triton_kernels as triton_row_norm_kernels  # noqa: E402
from persample.ops.row_norm import triton_launch as triton_row_norm  # noqa: E402
from persample.ops.shared.triton_helpers import NOMINAL_SMS  # noqa: E402
from strategies import examples  # noqa: E402
from test_triton import _round_bf16_to_nearest, _Spy  # noqa: E402
from testcase import TestCase  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
EPS = 1e-5
KERNELS = ("forward_rows", "backward_rows", "forward_swept", "backward_swept", "param_merge")

# Knobs that force each path at tiny shapes; "sms" replaces the SM count (NOMINAL_SMS
# without a GPU), which with PROGRAMS_PER_SM sets the backward's ranges a sample.
PATHS = {
    "rows": {},  # the defaults: a row in registers, one range a sample at these shapes
    "ranges": dict(TILE_ELEMENTS=32, PROGRAMS_PER_SM=1, MERGE_ELEMENTS=16, sms=8),
    "swept": dict(REGISTER_ELEMENTS=8, CHUNK_ELEMENTS=16, PROGRAMS_PER_SM=1, sms=1),
    "swept_ranges": dict(REGISTER_ELEMENTS=8, CHUNK_ELEMENTS=16, PROGRAMS_PER_SM=1,
                         MERGE_ELEMENTS=16, sms=8),
}
# (weight kind, bias kind) pairs: None, "shared" [D], "per_sample" [N, D], "expanded"
# ([D].expand(N, D), stride 0).
PARAMS = (("per_sample", "shared"), ("shared", "per_sample"), ("expanded", None),
          (None, "expanded"), (None, None), ("per_sample", "per_sample"))


@contextlib.contextmanager
def path(name="rows"):
    """Logs the kernels launched (``[(name, args)]``) under the knobs of ``name``."""
    log = []
    knobs = dict(PATHS[name])
    sms = knobs.pop("sms", None)
    with contextlib.ExitStack() as stack:
        for kernel in KERNELS:
            spy = _Spy(kernel, getattr(triton_row_norm_kernels, kernel), log)
            stack.enter_context(mock.patch.object(triton_row_norm_kernels, kernel, spy))
        for knob, value in knobs.items():
            stack.enter_context(mock.patch.object(triton_row_norm, knob, value))
        if sms is not None:
            stack.enter_context(mock.patch.object(triton_row_norm, "sm_count", lambda device: sms))
        yield log


def make_param(kind, n, d, dtype, seed):
    if kind is None:
        return None
    torch.manual_seed(seed)
    p = torch.rand((n, d), dtype=dtype, device=DEVICE) + 0.5
    return {"shared": p[0], "per_sample": p, "expanded": p[0].expand(n, d)}[kind]


def make_case(n, m, d, rms, params, dtype=F32, param_dtype=None, seed=0, offset=0.0):
    """(x, weight, bias, grad_out), x ~ N(offset, 1)."""
    torch.manual_seed(seed)
    x = (torch.randn((n, m, d), device=DEVICE) + offset).to(dtype)
    dy = torch.randn((n, m, d), device=DEVICE).to(dtype)
    w_kind, b_kind = params
    w = make_param(w_kind, n, d, param_dtype or dtype, seed + 1)
    b = None if rms else make_param(b_kind, n, d, param_dtype or dtype, seed + 2)
    return x, w, b, dy


def _rows(p, default):
    """A [D] or [N, D] parameter as float64 broadcasting over [N, M, D]."""
    if p is None:
        return default
    p = p.detach().cpu().double()
    return p if p.dim() == 1 else p[:, None, :]


def reference(x, w, b, rms, eps, dy):
    """float64 ``(y, mean, rstd, grad_input, grad_weight [N, D], grad_bias [N, D])`` of
    the same (rounded) inputs; mean None for rms."""
    x64 = x.detach().cpu().double().requires_grad_()
    dy64 = dy.detach().cpu().double()
    if rms:
        mean, rstd = None, (x64.square().mean(-1, keepdim=True) + eps).rsqrt()
        xhat = x64 * rstd
    else:
        var, mean = torch.var_mean(x64, -1, correction=0, keepdim=True)
        rstd = (var + eps).rsqrt()
        xhat = (x64 - mean) * rstd
    y = xhat * _rows(w, 1.0) + _rows(b, 0.0)
    (gi,) = torch.autograd.grad(y, x64, dy64)
    return (y.detach(), None if mean is None else mean[..., 0].detach(), rstd[..., 0].detach(),
            gi, (dy64 * xhat).sum(1).detach(), dy64.sum(1))


def stock(x, w, b, rms, eps, dy):
    """Stock LayerNorm (``aten::_fused_rms_norm``) per sample in the input dtype, params
    too (ones and zeros when absent): ``(y, mean, rstd, grad_input, [N, D] grads)``."""
    n, m, d = x.shape
    rows = [[], [], [], []]
    for i in range(n):
        xi = x[i].detach().clone().requires_grad_()
        wi = torch.ones(d, device=x.device) if w is None else w if w.dim() == 1 else w[i]
        bi = torch.zeros(d, device=x.device) if b is None else b if b.dim() == 1 else b[i]
        wi, bi = (p.to(x.dtype).detach().clone().requires_grad_() for p in (wi, bi))
        if rms:
            yi, inputs = torch.ops.aten._fused_rms_norm(xi, [d], wi, eps)[0], (xi, wi)
        else:
            yi, inputs = torch.nn.functional.layer_norm(xi, (d,), wi, bi, eps), (xi, wi, bi)
        grads = torch.autograd.grad(yi, inputs, dy[i])
        for row, t in zip(rows, (yi, *grads)):
            row.append(t.detach())
    y, gi, gw = torch.stack(rows[0]), torch.stack(rows[1]), torch.stack(rows[2])
    gb = torch.stack(rows[3]) if not rms else None
    x2 = x.detach().reshape(n * m, d)
    if rms:
        mean, rstd = None, torch.ops.aten._fused_rms_norm(x2, [d], None, eps)[1].view(n, m)
    else:
        _, mean, rstd = torch.native_layer_norm(x2, [d], None, None, eps)
        mean, rstd = mean.view(n, m), rstd.view(n, m)
    return y, mean, rstd, gi, gw, gb


class RowNormTestCase(TestCase):
    def run_both(self, x, w, b, rms, dy, mask=None, eps=EPS):
        mask = mask or (True, True, not rms)
        y, mean, rstd = triton_row_norm.forward(x, w, b, rms, eps)
        return (y, mean, rstd), triton_row_norm.backward(dy, x, mean, rstd, w, rms, mask)

    def check(self, case, rms, kind="rows", mask=None):
        """Every output of both passes on ``case`` (x, weight, bias, grad_out) against the
        float64 reference, by the error model; returns the kernels launched and the plan."""
        x, w, b, dy = case
        with path(kind) as log:
            (y, mean, rstd), grads = self.run_both(x, w, b, rms, dy, mask)
            plan = triton_row_norm.plan_for(x)
        mask = mask or (True, True, not rms)
        swept = kind.startswith("swept")
        self.assertEqual(plan.swept, swept)
        launched = {name for name, _ in log}
        expected = {"forward_swept", "backward_swept"} if swept else {"forward_rows", "backward_rows"}
        if not any(mask):  # nothing to compute: no backward launch
            expected = {name for name in expected if name.startswith("forward")}
        self.assertEqual(launched - {"param_merge"}, expected)
        ref, theirs = reference(x, w, b, rms, EPS, dy), stock(x, w, b, rms, EPS, dy)
        acc = F32
        self.assertEqual((y.dtype, rstd.dtype, y.shape, rstd.shape), (x.dtype, acc, x.shape, x.shape[:2]))
        self.assertTrue(y.is_contiguous())
        check_close(y, ref[0], theirs[0], "output")
        if rms:
            self.assertIsNone(mean)
        else:
            self.assertEqual(mean.dtype, acc)
            check_close(mean, ref[1], theirs[1], "mean")
        check_close(rstd, ref[2], theirs[2], "rstd")
        scale = grad_input_scale(dy, ref[2], w)
        for name, got, wanted, want, st_g in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                                 mask, ref[3:], theirs[3:]):
            if not wanted:
                self.assertIsNone(got, name)
                continue
            self.assertEqual(got.dtype, x.dtype if name == "grad_input" else acc, name)
            check_close(got, want, st_g, name, scale=scale if name == "grad_input" else 0.0)
        return launched, plan


class TestRowKernels(RowNormTestCase):
    def test_shapes_params_and_paths(self):
        """D in {1, 3, 16, 40}, M in {1, 5}, N in {1, 3}, both norms, every kind of
        parameter, in registers and swept."""
        cases = itertools.product((1, 3, 16, 40), (1, 5), (1, 3), (False, True))
        for i, (d, m, n, rms) in enumerate(cases):
            params = PARAMS[i % len(PARAMS)]
            for kind in ("rows", "swept") if d > 8 else ("rows",):
                with self.subTest(n=n, m=m, d=d, rms=rms, params=params, kind=kind):
                    self.check(make_case(n, m, d, rms, params, seed=i), rms, kind=kind)

    def test_ranges_and_merge(self):
        """Several ranges a sample, of several tiles (rows) or rows (swept), the last one
        ragged, merged over several blocks of ranges; and one range of several rows."""
        for kind, rms in itertools.product(("ranges", "swept_ranges", "swept"), (False, True)):
            with self.subTest(kind=kind, rms=rms):
                case = make_case(3, 13, 40, rms, ("per_sample", "shared"))
                launched, plan = self.check(case, rms, kind=kind)
                if kind == "swept":
                    self.assertEqual((plan.ranges, plan.m_per), (1, 13))
                else:
                    self.assertEqual(plan.ranges, 3)
                    self.assertGreater(plan.m_per, plan.block_r)
                    self.assertIn("param_merge", launched)

    def test_every_output_mask(self):
        for rms, kind in itertools.product((False, True), ("ranges", "swept_ranges")):
            for mask in itertools.product((True, False), (True, False), (False,) if rms else (True, False)):
                with self.subTest(rms=rms, kind=kind, mask=mask):
                    self.check(make_case(3, 5, 16, rms, ("per_sample", "shared")), rms, kind=kind, mask=mask)

    def test_large_mean_weight_gradient(self):
        """At mean/std = 1e3 in fp32 the per-sample weight gradient is within 5e-5 of the
        float64 one, relative to its largest entry (summed as dy * (x - mean) * rstd:
        measured 2e-5, stock's 5e-5), which the textbook
        ``sum(rstd * dy * x) - sum(rstd * mean * dy)`` misses (measured 1.6e-4)."""
        for kind, rms in itertools.product(("rows", "swept"), (False, True)):
            with self.subTest(kind=kind, rms=rms):
                x, w, b, dy = case = make_case(2, 16, 40, rms, ("shared", None), offset=1e3)
                self.check(case, rms, kind=kind)
                with path(kind):
                    _, mean, rstd = triton_row_norm.forward(x, w, b, rms, EPS)
                    gw = triton_row_norm.backward(dy, x, mean, rstd, w, rms, (False, True, False))[1]
                want = reference(x, w, b, rms, EPS, dy)[4]
                self.assertLessEqual(relative_error(gw, want), 5e-5)
                if not rms:
                    r, mu = rstd[..., None], mean[..., None]
                    self.assertGreater(relative_error((dy * x * r).sum(1) - (dy * mu * r).sum(1), want), 5e-5)

    def test_bf16_within_twice_stock_error(self):
        rounding = _round_bf16_to_nearest()
        if rounding is None:
            self.skipTest("this triton's interpreter cannot be made to round bf16")
        for (param_dtype, rms, kind) in itertools.product((None, F32), (False, True), ("rows", "swept_ranges")):
            with self.subTest(param_dtype=param_dtype, rms=rms, kind=kind), rounding:
                self.check(make_case(3, 5, 40, rms, ("per_sample", "shared"), BF16, param_dtype), rms, kind=kind)


def relative_error(got, want):
    return ((got.detach().cpu().double() - want).abs().max() / want.abs().max()).item()


class TestProperties(RowNormTestCase):
    @examples(6)
    @given(d=st.sampled_from((1, 3, 16, 40)), m=st.sampled_from((1, 5)), n=st.sampled_from((1, 3)),
           rms=st.booleans(), params=st.sampled_from(PARAMS), dtype=st.sampled_from((F32, BF16)),
           kind=st.sampled_from(tuple(PATHS)), seed=st.integers(0, 2**16))
    def test_matches_float64_by_the_error_model(self, d, m, n, rms, params, dtype, kind, seed):
        if kind.startswith("swept") and d <= PATHS["swept"]["REGISTER_ELEMENTS"]:
            kind = "rows"  # a row this narrow is held in registers under any knobs
        rounding = _round_bf16_to_nearest() if dtype == BF16 else contextlib.nullcontext()
        if rounding is None:
            return
        with rounding:
            self.check(make_case(n, m, d, rms, params, dtype, seed=seed), rms, kind=kind)


class TestPlan(TestCase):
    def test_plans_cover_every_row(self):
        knobs = ({}, dict(REGISTER_ELEMENTS=16, TILE_ELEMENTS=16, CHUNK_ELEMENTS=8),
                 dict(TILE_ELEMENTS=1, PROGRAMS_PER_SM=64))
        for kn, n, m, d in itertools.product(knobs, (1, 3, 64), (1, 5, 300), (1, 3, 40, 768, 2048, 2049, 20000)):
            with self.subTest(knobs=kn, n=n, m=m, d=d), mock.patch.multiple(triton_row_norm, **kn) if kn else contextlib.nullcontext():
                plan = triton_row_norm.Plan(n, m, d, NOMINAL_SMS)
                self.assertEqual(plan.swept, triton.next_power_of_2(d) > triton_row_norm.REGISTER_ELEMENTS)
                if not plan.swept:
                    self.assertGreaterEqual(plan.block_d, d)
                    self.assertLessEqual(plan.block_r * plan.block_d,
                                         max(triton_row_norm.TILE_ELEMENTS, plan.block_d))
                else:
                    self.assertEqual(plan.block_r, 1)
                self.assertEqual(plan.m_per % plan.block_r, 0)
                self.assertGreaterEqual(plan.ranges * plan.m_per, m)
                self.assertLess((plan.ranges - 1) * plan.m_per, m)
                self.assertIn(plan.num_warps, (1, 2, 4, 8))

    def test_transformer_grids_fill_an_h200(self):
        """At the AOT shapes (tests/triton_aot.py) the forward launches at least
        PROGRAMS_PER_SM programs an SM of an H200; the backward's ranges are the longest
        that come near it (within the rounding of tiles to ranges): fewest partial sums."""
        target = triton_row_norm.PROGRAMS_PER_SM * NOMINAL_SMS
        for n, m, d in ((16, 128, 768), (8, 512, 1024), (64, 64, 384)):
            with self.subTest(shape=(n, m, d)):
                plan = triton_row_norm.Plan(n, m, d, NOMINAL_SMS)
                self.assertGreaterEqual(n * plan.tiles, target)
                self.assertGreaterEqual(n * plan.ranges, target * 0.9)
                self.assertLessEqual(plan.ranges, triton.cdiv(target, n))

    def test_samples_beyond_int32_offsets_do_not_fit(self):
        huge = torch.zeros((), device=DEVICE).expand(2, 2, 2**30)
        self.assertFalse(triton_row_norm.fits(huge))
        self.assertTrue(triton_row_norm.fits(torch.zeros((), device=DEVICE).expand(2, 1, 2**31 - 1)))
