"""The Triton kernels (ops/group_norm/triton_kernels.py) and their glue in ops/group_norm/cuda.py, against the
float64 per-example reference.

Without a CUDA device, triton's interpreter runs them on CPU tensors, and ops/group_norm/cuda.py
sends CPU tensors to them; tests/conftest.py switches the interpreter on before triton
is first imported, which is when triton reads ``TRITON_INTERPRET``. On a GPU the same
tests run the compiled kernels on CUDA tensors. The interpreter costs ~10 ms per
program, so the shapes are tiny.
"""

import contextlib
import itertools
import os
import sys
import unittest
from unittest import mock

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from persample.ops.group_norm import cuda, eager, triton_kernels, triton_launch  # noqa: E402
from persample.ops.shared import backends  # noqa: E402
from persample.ops.group_norm.checks import grad_param_dtype  # noqa: E402
from persample.ops.group_norm.layout import output_memory_format  # noqa: E402
from samples import CL, CL3, reference  # noqa: E402
from testcase import TestCase  # noqa: E402

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
TILE = {"forward_tile", "backward_tile"}
SPLIT = {"forward_partial", "forward_merge", "forward_normalize",
         "backward_partial", "backward_merge", "backward_grad_input"}
ALL_MASKS = [list(m) for m in itertools.product((True, False), repeat=3)]

# Knobs of ops/group_norm/triton_launch.py that force each kind of plan at these tiny shapes.
KINDS = {
    "single": {},  # the defaults: every tiny block is held in registers
    "swept": dict(REGISTER_ELEMENTS=1, CHUNK_ELEMENTS=8, PROGRAMS_PER_SM=0),
    "split": dict(REGISTER_ELEMENTS=1, CHUNK_ELEMENTS=8, PROGRAMS_PER_SM=1 << 20),
    "channel_blocks": dict(REGISTER_ELEMENTS=1, CHUNK_ELEMENTS=1, RUN_BYTES=1, PROGRAMS_PER_SM=0),
}

# (input shape, num_groups, memory format, weight kind, bias kind); kinds are None,
# "shared" [C], "per_sample" [N, C], "expanded" ([C].expand(N, C), stride 0) and
# "transposed" (a [C, N] tensor's .t()).
CASES = (
    ((3, 8), 2, None, "shared", "per_sample"),  # rank 2
    ((2, 6, 7), 1, None, "per_sample", "shared"),  # rank 3, G = 1, odd L
    ((2, 6, 7), 6, None, None, None),  # G = C, no params
    ((1, 4, 3, 5), 2, None, "expanded", "transposed"),  # N = 1
    ((2, 6, 3, 5), 3, CL, "transposed", "expanded"),
    ((2, 6, 2, 3, 2), 2, CL3, "shared", None),  # rank 5
    ((2, 1, 3, 3), 1, CL, "per_sample", "per_sample"),  # C = 1, also contiguous
    ((3, 6, 1, 1), 2, CL, "shared", "shared"),  # H = W = 1, also contiguous
    ((2, 4, 1, 1, 1), 4, CL3, None, "per_sample"),  # G = C, one position
    ((2, 16, 3, 3), 8, CL, "per_sample", "shared"),  # several groups to a program
)
TOL = {F32: dict(atol=1e-4, rtol=1e-4), F64: dict(atol=1e-7, rtol=1e-7)}


def make_input(shape, fmt, dtype=F32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    # .to(memory_format=...), not .contiguous(...): where size-1 dims make a tensor dense
    # in both formats (C = 1, H = W = 1), it gives it channels_last strides, which
    # .contiguous(...) leaves as they are: the ambiguity that ops/group_norm/layout.py resolves.
    return x if fmt is None else x.to(memory_format=fmt)


def make_param(kind, n, c, dtype=F32):
    if kind is None:
        return None
    if kind == "transposed":
        return (torch.rand((c, n), dtype=dtype, device=DEVICE) + 0.5).t()
    p = torch.rand((n, c), dtype=dtype, device=DEVICE) + 0.5
    return {"shared": p[0], "per_sample": p, "expanded": p[0].expand(n, c)}[kind]


def make_case(case, dtype=F32, param_dtype=None, seed=0):
    shape, groups, fmt, w_kind, b_kind = case
    x = make_input(shape, fmt, dtype, seed)
    n, c = shape[:2]
    w, b = (make_param(kind, n, c, param_dtype or dtype) for kind in (w_kind, b_kind))
    return x, groups, w, b


class _Spy:
    """A kernel whose launches are logged as (name, args)."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, args))
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def launches(kind="single", merge_block=None):
    """Logs the Triton launches under the knobs that force plans of ``kind``;
    ``merge_block`` lowers the merge kernels' block (forcing their loops)."""
    log = []
    with contextlib.ExitStack() as stack:
        for name in TILE | SPLIT:
            spy = _Spy(name, getattr(triton_kernels, name), log)
            stack.enter_context(mock.patch.object(triton_kernels, name, spy))
        for knob, value in KINDS[kind].items():
            stack.enter_context(mock.patch.object(triton_launch, knob, value))
        if merge_block is not None:
            stack.enter_context(mock.patch.object(triton_launch, "_MERGE_BLOCK", merge_block))
        yield log


def plan_of(x, groups):
    dense, fmt = triton_launch.dense(x)
    return triton_launch.plan_for(dense, fmt, groups)


def stats_reference(x, groups, eps):
    var, mean = torch.var_mean(x.detach().cpu().double().reshape(x.shape[0], groups, -1), -1, correction=0)
    return mean, (var + eps).rsqrt()


def cpu(t):
    return t.detach().cpu()


class TritonTestCase(TestCase):
    def run_both(self, x, groups, w, b, grad_out, masks=([True, True, True],), eps=1e-5):
        """Forward and backward (every mask in ``masks``) through ops/group_norm/cuda.py's kernels;
        returns the float64 reference and the results."""
        out, mean, rstd = cuda.group_norm_cuda(x, groups, w, b, eps)
        grads = [cuda.group_norm_backward_cuda(grad_out, x, mean, rstd, w, groups, m) for m in masks]
        return reference(x, groups, w, b, eps, grad_out), (out, mean, rstd), grads

    def check_layout(self, t, x):
        """``t`` has the layout the fake implementation states for input ``x``."""
        expected = torch.empty_like(x, memory_format=output_memory_format(x)).stride()
        big = [i for i, s in enumerate(x.shape) if s > 1]
        self.assertEqual([t.stride(i) for i in big], [expected[i] for i in big])

    def check_f32(self, case, kind="single", masks=([True, True, True],), dtype=F32):
        x, groups, w, b = make_case(case, dtype)
        grad_out = torch.randn_like(x)
        if case[0][0] % 2:  # what y.sum().backward() hands in: stride 0
            grad_out = torch.randn((), dtype=dtype, device=DEVICE).expand_as(x)
        with launches(kind, merge_block=2 if kind == "split" else None) as log:
            ref, (out, mean, rstd), grads = self.run_both(x, groups, w, b, grad_out, masks)
            plan = plan_of(x, groups)
        self.assertEqual({name for name, _ in log}, SPLIT if plan.splits > 1 else TILE)
        if kind == "single":
            self.assertTrue(plan.single)
        tol = TOL[dtype]
        self.assertEqual(cpu(out), ref[0], exact_dtype=False, **tol)
        self.check_layout(out, x)
        ref_mean, ref_rstd = stats_reference(x, groups, 1e-5)
        self.assertEqual((cpu(mean), cpu(rstd)), (ref_mean, ref_rstd), exact_dtype=False, **tol)
        for mask, got in zip(masks, grads):
            with self.subTest(mask=mask):
                for g, wanted, expected in zip(got, mask, ref[1:]):
                    if wanted:
                        self.assertEqual(cpu(g), expected, exact_dtype=False, **tol)
                    else:
                        self.assertEqual(g.numel(), 0)
                if mask[0]:
                    self.check_layout(got[0], x)
                    self.assertEqual(got[0].dtype, x.dtype)
                for g in got[1:]:
                    self.assertEqual(g.dtype, grad_param_dtype(x, w))


class TestKernels(TritonTestCase):
    def test_every_kind_of_plan(self):
        for kind in KINDS:
            for i, case in enumerate(CASES):
                with self.subTest(kind=kind, case=i):
                    self.check_f32(case, kind)

    def test_forced_plans_are_what_they_say(self):
        """The knobs that the tests use reach the plans they are named for."""
        x, groups = make_case(((2, 6, 3, 5), 3, CL, None, None))[:2]
        for kind in KINDS:
            with self.subTest(kind=kind), launches(kind):
                plan = plan_of(x, groups)
                self.assertEqual(plan.single, kind == "single")
                self.assertEqual(plan.splits > 1, kind == "split")
                self.assertEqual(plan.c_blocks > 1, kind == "channel_blocks")

    def test_every_output_mask(self):
        case = ((2, 4, 3, 3), 2, CL, "per_sample", "shared")
        for kind in ("single", "split"):
            with self.subTest(kind=kind):
                self.check_f32(case, kind, masks=ALL_MASKS)

    def test_channels_last_read_in_place(self):
        """A channels_last x and a grad_out in its layout are read where they lie; the
        output and grad_input take the input's layout on every device."""
        for case in (((2, 4, 3, 3), 2, CL, "shared", None), ((2, 4, 2, 2, 3), 2, CL3, None, None)):
            for kind, (fwd, bwd) in (("single", ("forward_tile", "backward_tile")),
                                     ("split", ("forward_partial", "backward_partial"))):
                with self.subTest(fmt=case[2], kind=kind):
                    x, groups, w, b = make_case(case)
                    dy = torch.randn_like(x)
                    with launches(kind) as log:
                        _, (out, _, _), ((gi, _, _),) = self.run_both(x, groups, w, b, dy)
                    args = {name: a for name, a in log}
                    self.assertEqual(args[fwd][0].data_ptr(), x.data_ptr())
                    self.assertEqual(args[bwd][0].data_ptr(), dy.data_ptr())
                    self.assertEqual(args[bwd][1].data_ptr(), x.data_ptr())
                    for t in (out, gi):
                        self.assertTrue(t.is_contiguous(memory_format=case[2]))

    def test_grad_out_in_another_layout(self):
        """A contiguous grad_out for a channels_last input (what stock CUDA GroupNorm's
        contiguous output hands back) is copied into the input's layout: right values."""
        case = ((2, 4, 3, 3), 2, CL, "per_sample", "shared")
        x, groups, w, b = make_case(case)
        dy = torch.randn_like(x, memory_format=torch.contiguous_format)
        ref, _, ((gi, gw, gb),) = self.run_both(x, groups, w, b, dy)
        self.assertEqual((cpu(gi), cpu(gw), cpu(gb)), ref[1:], exact_dtype=False, **TOL[F32])

    def test_large_mean_has_no_cancellation(self):
        """At mean/std = 1e3 (1e4) in fp32 the per-sample dgamma is within 5e-5 (5e-4) of
        float64 on the same fp32-rounded inputs, relative to its largest entry: the CPU
        C++ path's level, which the saved mean's rounding bounds. The saved mean is the
        exact mean correctly rounded to fp32 (the refinement step, or the shifted sums)."""
        for offset, bound in ((1e3, 5e-5), (1e4, 5e-4)):
            torch.manual_seed(1)
            x = (torch.randn(2, 8, 16, 16, device=DEVICE) + offset).to(memory_format=CL)
            w = torch.rand(8, device=DEVICE) + 0.5
            dy = torch.randn_like(x)
            ref = reference(x, 2, w, None, 1e-5, dy)[2]
            exact_mean = stats_reference(x, 2, 1e-5)[0]
            for kind in ("single", "swept", "split"):
                with self.subTest(offset=offset, kind=kind), launches(kind):
                    _, mean, rstd = cuda.group_norm_cuda(x, 2, w, None, 1e-5)
                    spacing = torch.finfo(F32).eps * 2.0 ** torch.floor(torch.log2(exact_mean))
                    self.assertLessEqual(((cpu(mean) - exact_mean).abs() / spacing).max().item(), 0.5 + 1e-3)
                    gw = cuda.group_norm_backward_cuda(dy, x, mean, rstd, w, 2, [False, True, False])[1]
                    self.assertLessEqual(relative_error(gw, ref), bound)
            if offset == 1e3:
                # The bound discriminates: the textbook sum(dy * x) - mean * sum(dy) (ATen's
                # formula), in fp32 from the same exact mean, misses it on any device.
                mean32 = exact_mean.float().to(DEVICE).repeat_interleave(4, 1)[..., None, None]
                rstd32 = stats_reference(x, 2, 1e-5)[1].float().to(DEVICE).repeat_interleave(4, 1)
                naive = ((dy * x).sum((2, 3)) - mean32[..., 0, 0] * dy.sum((2, 3))) * rstd32
                self.assertGreater(relative_error(naive, ref), bound)


def relative_error(got, expected):
    return ((cpu(got).double() - expected).abs().max() / expected.abs().max()).item()


def _round_bf16_to_nearest():
    """The interpreter truncates fp32 -> bf16 casts (triton/runtime/interpreter.py,
    ``_convert_float``; its round-to-nearest option drops the carry), where GPUs round
    to nearest even. Patch it to round as the GPU does, or None if it cannot be."""
    if DEVICE != "cpu":
        return contextlib.nullcontext()
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        return None
    import numpy as np
    import triton.language as tl

    def convert(data, src, dst, rounding):
        if not (src == tl.float32 and dst == tl.bfloat16):
            return original(data, src, dst, rounding)
        bits = np.ascontiguousarray(data).view(np.uint32)
        one = np.uint32(1)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & one)) >> np.uint32(16)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
        return out.astype(np.uint16).reshape(data.shape)

    return mock.patch.object(interpreter, "_convert_float", convert)


def stock(x, groups, w, b, eps, grad_out):
    """Stock GroupNorm per example, in the input dtype (params too: CUDA's needs them
    so): ``(out, grad_input, grad_weight, grad_bias)``, per-sample [N, C] param grads."""
    n, c = x.shape[:2]
    rows = [[], [], [], []]
    for i in range(n):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        wi, bi = (torch.ones(c) if p is None else p if p.dim() == 1 else p[i] for p in (w, b))
        wi, bi = (p.to(x.device, x.dtype).detach().clone().requires_grad_() for p in (wi, bi))
        yi = torch.group_norm(xi, groups, wi, bi, eps)
        for row, t in zip(rows, (yi, *torch.autograd.grad(yi, (xi, wi, bi), grad_out[i : i + 1]))):
            row.append(t.detach())
    return torch.cat(rows[0]), torch.cat(rows[1]), torch.stack(rows[2]), torch.stack(rows[3])


class TestReducedPrecision(TritonTestCase):
    """fp16/bf16 input with params in that dtype or fp32: every output's max error
    against float64 at most twice stock GroupNorm's own error in that dtype."""

    CASES = (
        ((2, 8, 3, 5), 2, CL, "shared", "per_sample"),
        ((2, 6, 7), 1, None, "expanded", None),
    )

    def test_within_twice_stock_error(self):
        rounding = _round_bf16_to_nearest()
        for dtype, param_dtype, (i, case) in itertools.product(
            (BF16, F16), (None, F32), enumerate(self.CASES)
        ):
            kind = "split" if i == 1 else "single"  # the split kernels too
            with self.subTest(dtype=dtype, param_dtype=param_dtype, case=i):
                if rounding is None and dtype == BF16:
                    self.skipTest("this triton's interpreter cannot be made to round bf16")
                with rounding or contextlib.nullcontext():
                    self.check_reduced(case, dtype, param_dtype, kind)

    def check_reduced(self, case, dtype, param_dtype, kind):
        x, groups, w, b = make_case(case, dtype, param_dtype)
        grad_out = torch.randn_like(x)
        with launches(kind) as log:
            ref, (out, mean, rstd), ((gi, gw, gb),) = self.run_both(x, groups, w, b, grad_out)
        self.assertTrue(log)
        self.assertEqual((out.dtype, mean.dtype, rstd.dtype, gi.dtype), (dtype, F32, F32, dtype))
        self.assertEqual((gw.dtype, gb.dtype), (grad_param_dtype(x, w),) * 2)
        theirs = stock(x, groups, w, b, 1e-5, grad_out)
        for name, got, st, expected in zip(("out", "grad_input", "grad_weight", "grad_bias"),
                                           (out, gi, gw, gb), theirs, ref):
            ours_err = (cpu(got).double() - expected).abs().max().item()
            stock_err = (cpu(st).double() - expected).abs().max().item()
            self.assertLessEqual(ours_err, 2 * stock_err, f"{name}: {ours_err:.3g} vs stock {stock_err:.3g}")


class TestRouting(TestCase):
    def test_fp64_and_empty_take_aten(self):
        x, groups, w, b = make_case(CASES[4], F64)
        dy = torch.randn_like(x)
        with launches() as log:
            out, mean, rstd = cuda.group_norm_cuda(x, groups, w, b)
            grads = cuda.group_norm_backward_cuda(dy, x, mean, rstd, w, groups, [True, True, True])
            empty = torch.empty(0, 6, 3, device=DEVICE)
            cuda.group_norm_cuda(empty, 3)
        self.assertEqual(log, [])
        ref = reference(x, groups, w, b, 1e-5, dy)
        self.assertEqual((cpu(out), *map(cpu, grads)), ref, **TOL[F64])

    def test_fp32_takes_triton(self):
        x, groups, w, b = make_case(CASES[0])
        with launches() as log:
            cuda.group_norm_cuda(x, groups, w, b)
        self.assertEqual([name for name, _ in log], ["forward_tile"])

    def test_samples_beyond_int32_offsets_take_aten(self):
        """The kernels' in-sample offsets are int32: a sample of 2**31 elements or more
        goes to ATen's kernels (an expanded tensor: no memory)."""
        small = make_input((2, 4, 3), None)
        huge = torch.zeros((), device=DEVICE).expand(2, 2, 2**30)
        self.assertIs(cuda._triton_for(small), triton_launch)
        self.assertIsNone(cuda._triton_for(huge))
        self.assertTrue(triton_launch.fits(torch.zeros((), device=DEVICE).expand(2, 2**31 - 1)))

    def test_disabled_or_missing_triton_falls_back_to_aten(self):
        x = make_input((2, 4, 3), None)
        with mock.patch.dict(backends._modules, clear=True), \
                mock.patch.dict(os.environ, {"PERSAMPLE_DISABLE_TRITON": "1"}):
            self.assertIsNone(cuda.triton_launch())
        with mock.patch.dict(backends._modules, clear=True), \
                mock.patch.dict(sys.modules, {"persample.ops.group_norm.triton_launch": None}):
            with self.assertWarnsRegex(UserWarning, "triton is not available"):
                self.assertIsNone(cuda.triton_launch())
            with launches() as log:
                out = cuda.group_norm_cuda(x, 2)[0]
            self.assertEqual(log, [])
        self.assertEqual(cpu(out), reference(x, 2, None, None, 1e-5, x)[0], exact_dtype=False, **TOL[F32])
        self.assertIs(cuda.triton_launch(), triton_launch)

    @unittest.skipIf(eager.LIBRARY is None, "the C++ library is not built")
    def test_large_fp32_cuda_inputs_leave_the_cpp_path(self):
        big = eager.TRITON_MIN_NUMEL
        with FakeTensorMode():  # CUDA tensors without a GPU, and without memory
            inputs = {(dt, dev, numel): torch.empty(numel, 1, dtype=dt, device=dev)
                      for dt in (F32, F64, BF16) for dev in ("cpu", "cuda") for numel in (big - 1, big)}
        for (dt, dev, numel), x in inputs.items():
            with self.subTest(dtype=dt, device=dev, numel=numel):
                expected = None if (dt, dev, numel) == (F32, "cuda", big) else eager._op
                self.assertIs(eager.fast_op(x), expected)


class TestPlan(unittest.TestCase):
    KNOBS = (
        {},
        dict(REGISTER_ELEMENTS=16, CHUNK_ELEMENTS=16),
        dict(REGISTER_ELEMENTS=1, CHUNK_ELEMENTS=4, RUN_BYTES=1),
        dict(REGISTER_ELEMENTS=16384, CHUNK_ELEMENTS=8192, BYTES_PER_THREAD=128),
    )

    def test_plans_cover_every_group_within_their_limits(self):
        sizes = itertools.product((1, 3, 8, 64), (1, 3, 8, 33, 4096), (1, 7, 64, 1000), (False, True), (2, 4))
        for knobs, (n, d, length, cl, itemsize) in itertools.product(self.KNOBS, sizes):
            for groups in (1, 2, 6, 32):
                with self.subTest(knobs=knobs, n=n, d=d, length=length, groups=groups, cl=cl), \
                        mock.patch.multiple(triton_launch, **knobs) if knobs else contextlib.nullcontext():
                    self.check(triton_launch.Plan(n, d * groups, length, groups, cl, itemsize), groups)

    def check(self, plan, groups):
        d, length = plan.d, plan.length
        chunk, register = triton_launch.CHUNK_ELEMENTS, triton_launch.REGISTER_ELEMENTS
        tile = plan.block_c * plan.block_l
        self.assertLessEqual(tile, max(register, 1) if plan.single else max(chunk, plan.block_c))
        self.assertEqual(groups % plan.gb, 0)
        if plan.gb > 1:
            self.assertEqual(plan.block_d, d)  # whole groups to a chunk
        self.assertGreaterEqual(plan.c_blocks * plan.block_d, d)
        self.assertLess((plan.c_blocks - 1) * plan.block_d, d)
        if plan.single:
            self.assertEqual((plan.c_blocks, plan.splits), (1, 1))
            self.assertGreaterEqual(plan.block_l, length)
        self.assertEqual(plan.l_per % plan.block_l if plan.splits > 1 else 0, 0)
        self.assertGreaterEqual(plan.splits * plan.l_per, length)
        self.assertLess((plan.splits - 1) * plan.l_per, length)
        self.assertIn(plan.num_warps, (1, 2, 4, 8, 16))

    def test_plans_split_only_grids_too_small_for_the_gpu(self):
        big = triton_launch.Plan(256, 256, 4096, 32, False, 4)  # 8192 programs
        small = triton_launch.Plan(2, 64, 16384, 32, False, 4)  # 64 programs, long groups
        self.assertEqual(big.splits, 1)
        self.assertGreater(small.splits, 1)
        self.assertGreaterEqual(small.programs * small.splits, triton_launch.PROGRAMS_PER_SM * 132)
        self.assertGreaterEqual(small.block_c * small.block_l, triton_launch.MIN_SPLIT_CHUNK)

    def test_channels_last_programs_read_wide_runs(self):
        """Several groups to a channels_last program, until its run per position is
        RUN_BYTES wide (or G allows no more)."""
        plan = triton_launch.Plan(64, 128, 1024, 32, True, 2)  # D = 4, bf16: 8 B a group
        self.assertGreaterEqual(plan.block_c * 2, triton_launch.RUN_BYTES)
        self.assertEqual(triton_launch.Plan(64, 96, 1024, 3, True, 2).gb, 1)  # D = 32, G odd


if __name__ == "__main__":
    unittest.main()
