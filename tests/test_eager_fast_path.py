"""The C++ eager fast path (ops/csrc/group_norm.cpp): it agrees with the public
op's Python kernels and with the float64 per-example reference, and it is taken exactly
when it should be."""

import contextlib
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import persample
from persample.ops.group_norm import eager
from persample.ops.shared import backends
from error_model import check_group_norm
from samples import CASES, CL, CL3, TOL, group_norm_op, make_input, make_param, reference, stock_loop
from testcase import TestCase, run_tests

FAST_NODE = "torch::autograd::CppNode<persample::EagerGroupNorm>"
BUILT = eager.LIBRARY is not None
needs_library = unittest.skipUnless(BUILT, "the C++ library is not built (see setup.py)")

# Rows long enough for the C++ library's fused contiguous kernel (L >= 128, below that it
# drives ATen's) and past its summation blocks (1024 contiguous, 64 channels_last rows).
LONG_CASES = (
    ((2, 4, 16, 9), 2, None, "per_sample", "shared", 1e-5),
    ((3, 6, 130), 3, None, "expanded", "per_sample", 1e-5),
    ((2, 2, 1100), 1, None, "shared", None, 1e-5),
    ((2, 4, 2, 8, 9), 4, None, None, "per_sample", 1e-5),
    ((2, 4, 9, 9), 2, CL, "per_sample", "per_sample", 1e-5),
    ((2, 6, 3, 5, 7), 3, CL3, "shared", "shared", 1e-5),
)

# (input requires grad, params require grad): every combination autograd can ask for.
GRAD_SETS = ((True, True), (True, False), (False, True))


def node_name(y):
    return "" if y.grad_fn is None else y.grad_fn.name()


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class TestLibrary(unittest.TestCase):
    def test_built_where_required(self):
        # scripts/test.sh builds the library and sets this, so that a failed build
        # (setup.py builds it as optional) cannot pass CI on the Python kernels alone.
        if os.environ.get("PERSAMPLE_REQUIRE_CPP") != "1":
            self.skipTest("PERSAMPLE_REQUIRE_CPP is not set")
        self.assertTrue(BUILT, f"no {backends.library_name()}.so next to persample/__init__.py")

    def test_disabled_by_environment(self):
        code = (
            "import torch, persample; from persample.ops.group_norm import eager; "
            "x = torch.randn(2, 4, 3, requires_grad=True); "
            "y = persample.group_norm(x, 2); y.sum().backward(); "
            "print(eager.LIBRARY, y.grad_fn.name())"
        )
        env = dict(os.environ, PERSAMPLE_DISABLE_CPP="1")
        # From tests/: "-c" puts the working directory first on sys.path, and the
        # checkout's persample/ is not the package where scripts/gpu_check.sh lays it out.
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True).stdout.split()
        self.assertEqual(out, ["None", "GroupNormAutogradBackward"])

    def test_unloadable_library_warns_and_falls_back(self):
        env = mock.patch.dict(os.environ, {"PERSAMPLE_DISABLE_CPP": "0"})
        with env, tempfile.TemporaryDirectory() as tmp:
            self.assertIsNone(backends.load(tmp))  # not built: silent
            with open(os.path.join(tmp, backends.library_name() + ".so"), "wb") as f:
                f.write(b"not a shared library")
            with self.assertWarnsRegex(UserWarning, "using the Python kernels"):
                self.assertIsNone(backends.load(tmp))

    @unittest.skipUnless(BUILT, "the C++ library is not built")
    def test_stale_library_warns_and_falls_back(self):
        # A library built from an older checkout lacks the newer ops; loading it again
        # is harmless (the dispatcher keeps the registrations it has).
        package_dir = os.path.dirname(persample.__file__)
        stale = mock.patch.object(backends, "_LIBRARY_OPS", backends._LIBRARY_OPS + ("_not_built_yet",))
        with stale, mock.patch.dict(os.environ, {"PERSAMPLE_DISABLE_CPP": "0"}):
            with self.assertWarnsRegex(UserWarning, "is stale \\(no _not_built_yet\\); using the Python"):
                self.assertIsNone(backends.load(package_dir))

    def test_library_name_per_torch_release(self):
        self.assertEqual(backends.library_name("2.14.1+cu130"), "_C_torch2_14_1_cu130")
        self.assertEqual(backends.library_name("2.13.0"), "_C_torch2_13_0")


class AgreementTests:
    """The fast path against the public op and the float64 loop, on ``self.device``."""

    device = "cpu"

    def input(self, shape, fmt=None, **kw):
        return make_input(shape, fmt, device=self.device, **kw)

    def param(self, kind, n, c, **kw):
        return make_param(kind, n, c, device=self.device, **kw)

    def run_both(self, x, groups, w, b, eps, x_grad, p_grad):
        """(output, grads) of the fast path and of the public op with its Python kernels
        alone (its CPU backward otherwise calls the library's kernel), on fresh leaves."""
        results = []
        for fast in (True, False):
            python_kernels = mock.patch.object(eager, "_cpu_backward", None)
            leaves = [None if t is None else t.detach().requires_grad_(g)
                      for t, g in ((x, x_grad), (w, p_grad), (b, p_grad))]
            if fast:
                y = persample.group_norm(leaves[0], groups, leaves[1], leaves[2], eps)
                self.assertEqual(node_name(y), FAST_NODE)
            else:
                y = group_norm_op(leaves[0], groups, leaves[1], leaves[2], eps)[0]
                self.assertNotEqual(node_name(y), FAST_NODE)
            pattern = torch.arange(y.numel(), device=y.device).view_as(y) % 7 - 3
            grad_out = torch.ones_like(y).mul_(pattern)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            with python_kernels if not fast else contextlib.nullcontext():
                grads = torch.autograd.grad(y, wanted, grad_out)
            results.append((y, grads))
        return results

    def test_matches_public_op(self):
        for dtype in (torch.float32, torch.float64):
            for shape, groups, fmt, w_kind, b_kind, eps in CASES + LONG_CASES:
                for x_grad, p_grad in GRAD_SETS:
                    if not (x_grad or (p_grad and (w_kind or b_kind))):
                        continue
                    n, c = shape[:2]
                    x = self.input(shape, fmt, dtype=dtype) * 3 + 1
                    w = self.param(w_kind, n, c, dtype=dtype)
                    b = self.param(b_kind, n, c, dtype=dtype)
                    with self.subTest(dtype=dtype, shape=shape, fmt=fmt, weight=w_kind,
                                      bias=b_kind, x_grad=x_grad, p_grad=p_grad):
                        (y, grads), (ref_y, ref_grads) = self.run_both(
                            x, groups, w, b, eps, x_grad, p_grad)
                        self.assertEqual(y, ref_y, **TOL[dtype])
                        self.assertEqual(y.stride(), ref_y.stride())
                        self.assertEqual(grads, ref_grads, **TOL[dtype])
                        for g, r in zip(grads, ref_grads):
                            self.assertEqual(g.stride(), r.stride())

    def test_matches_float64_loop(self):
        for shape, groups, fmt, w_kind, b_kind, eps in CASES + LONG_CASES:
            n, c = shape[:2]
            x = self.input(shape, fmt, requires_grad=True)
            w = self.param("per_sample" if w_kind else None, n, c, requires_grad=True)
            b = self.param("per_sample" if b_kind else None, n, c, requires_grad=True)
            grad_out = torch.randn_like(x)
            with self.subTest(shape=shape, fmt=fmt, weight=w_kind, bias=b_kind):
                y = persample.group_norm(x, groups, w, b, eps)
                self.assertEqual(node_name(y), FAST_NODE)
                wanted = [t for t in (x, w, b) if t is not None]
                got = torch.autograd.grad(y, wanted, grad_out)
                got = iter(got)
                got = [None if t is None else next(got) for t in (x, w, b)]
                args = (x, groups, w, b, eps, grad_out)
                check_group_norm(y, got, (w, b), reference(*args), stock_loop(*args))

    def test_grad_out_in_any_layout(self):
        # Autograd hands in what the graph produced: stride-0 (from .sum()), or another
        # memory format than the input's.
        for fmt in (None, CL):
            x = self.input((2, 4, 12, 11), fmt, requires_grad=True)
            w = self.param("per_sample", 2, 4, requires_grad=True)
            y = persample.group_norm(x, 2, w)
            ref_y = group_norm_op(x, 2, w)[0]
            other = CL if fmt is None else torch.contiguous_format
            for name, grad_out in (
                ("stride 0", torch.tensor(1.5, device=y.device).expand_as(y)),
                ("other format", torch.randn_like(y).contiguous(memory_format=other)),
            ):
                with self.subTest(fmt=fmt, grad_out=name):
                    got = torch.autograd.grad(y, (x, w), grad_out, retain_graph=True)
                    with mock.patch.object(eager, "_cpu_backward", None):
                        ref = torch.autograd.grad(ref_y, (x, w), grad_out, retain_graph=True)
                    self.assertEqual(got, ref)
                    self.assertEqual(got[0].stride(), ref[0].stride())

    def test_gradcheck(self):
        for shape, fmt, w_kind in (((3, 4, 2, 3), None, "per_sample"), ((3, 4, 2, 3), None, "shared"),
                                   ((3, 4, 2, 3), CL, "per_sample"), ((3, 4, 2, 3), CL, "shared"),
                                   ((2, 4, 1, 130), None, "per_sample")):
            x = self.input(shape, fmt, dtype=torch.float64, requires_grad=True)
            w = self.param(w_kind, shape[0], 4, dtype=torch.float64, requires_grad=True)
            b = self.param(w_kind, shape[0], 4, dtype=torch.float64, requires_grad=True)
            with self.subTest(shape=shape, fmt=fmt, weight=w_kind):
                self.assertEqual(node_name(persample.group_norm(x, 2, w, b)), FAST_NODE)
                self.assertTrue(torch.autograd.gradcheck(
                    lambda *a: persample.group_norm(a[0], 2, a[1], a[2]), (x, w, b)))
                if x.numel() > 100:
                    # Rows past the kernels' blocks are first-order business; the double
                    # backward (ops/group_norm/composite.py) does not see blocks, and its
                    # numerical Jacobian here would cost ~(1040 + 16)^2 evaluations (minutes).
                    continue
                self.assertTrue(torch.autograd.gradgradcheck(
                    lambda *a: persample.group_norm(a[0], 2, a[1], a[2]), (x, w, b)))

    def test_module(self):
        layer = persample.nn.GroupNorm(2, 4, device=self.device)
        x = self.input((3, 4, 5), requires_grad=True)
        y = layer(x)
        self.assertEqual(node_name(y), FAST_NODE)
        y.square().sum().backward()
        stock = torch.nn.GroupNorm(2, 4, device=self.device)
        x2 = x.detach().requires_grad_()
        stock(x2).square().sum().backward()
        self.assertEqual((x.grad, layer.weight.grad, layer.bias.grad),
                         (x2.grad, stock.weight.grad, stock.bias.grad))

    def test_module_under_forward_hooks_keeps_statistics(self):
        # Opacus's hooks: the layer stashes its statistics for persample.opacus's sampler,
        # and still takes the fast path.
        layer = persample.nn.GroupNorm(2, 4, device=self.device)
        layer.register_forward_hook(lambda *args: None)
        for fmt in (None, CL):
            x = self.input((3, 4, 5, 2), fmt, requires_grad=True) * 4 + 3
            with self.subTest(fmt=fmt):
                y = layer(x)
                self.assertEqual(node_name(y), FAST_NODE)
                ref, mean, rstd = group_norm_op(x, 2, layer.weight, layer.bias, layer.eps)
                self.assertEqual(y, ref)
                saved = persample.nn.pop_stats(layer, x)
                self.assertIsNotNone(saved)
                self.assertEqual(saved, (mean, rstd))
                self.assertFalse(any(t.requires_grad for t in saved))
                got = torch.autograd.grad(y, (x, layer.weight), torch.ones_like(y).cumsum(-1))
                expected = torch.autograd.grad(ref, (x, layer.weight), torch.ones_like(y).cumsum(-1))
                self.assertEqual(got, expected)


@needs_library
class TestAgreement(AgreementTests, TestCase):
    def test_no_cancellation_at_large_mean(self):
        # ATen's formula, sum(dy * x) - mean * sum(dy), loses ~1e-3 (relative) in fp32 at
        # mean/std = 1e4 (BRIEF); the library's kernels sum dy * (x - mean), measured from
        # the group's exact mean (the saved one is rounded to fp32, 5e-4 off here).
        # Reference: the float64 per-example loop on the same fp32 input.
        for fmt in (None, CL):
            x = self.input((4, 4, 16, 16), fmt) + 1e4
            w = torch.ones(4).expand(4, 4).requires_grad_()
            grad_out = torch.randn_like(x)
            _, mean, rstd = group_norm_op(x, 2)
            for name, fn in (("fast path", persample.group_norm), ("backward op", None)):
                with self.subTest(fmt=fmt, path=name):
                    if fn is None:
                        _, gw, _ = torch.ops.persample.group_norm_backward(
                            grad_out, x, mean, rstd, w, 2, [False, True, False])
                    else:
                        (gw,) = torch.autograd.grad(fn(x, 2, w), w, grad_out)
                    ref = reference(x, 2, w, None, 1e-5, grad_out)[2]
                    self.assertLess(((gw - ref).abs().max() / ref.abs().max()).item(), 1e-5)


@needs_library
@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
class TestAgreementCUDA(AgreementTests, TestCase):
    """On CUDA the library drives ATen's kernels on the per-sample view, as ops/group_norm/cuda.py
    does, without the Python layers."""

    device = "cuda"

    def test_channels_last_output_stays_channels_last(self):
        # ATen's CUDA kernels compute on a contiguous copy; the output and grad_input
        # return to the input's layout, as the public op's CUDA kernel gives them.
        x = self.input((2, 4, 3, 5), CL, requires_grad=True)
        y = persample.group_norm(x, 2, self.param("per_sample", 2, 4))
        self.assertEqual(node_name(y), FAST_NODE)
        self.assertTrue(y.is_contiguous(memory_format=CL))
        (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        self.assertTrue(gx.is_contiguous(memory_format=CL))

    def test_unhandled_inputs_take_the_public_op(self):
        x = self.input((3, 4, 5), requires_grad=True)
        cases = {
            "float16": (x.detach().half().requires_grad_(), None),
            "weight on the CPU": (x, torch.ones(4)),
        }
        for name, (inp, w) in cases.items():
            with self.subTest(name):
                try:
                    y = persample.group_norm(inp, 2, w)
                except RuntimeError as fast:
                    with self.assertRaises(RuntimeError) as public:
                        group_norm_op(inp, 2, w)
                    self.assertEqual(str(fast), str(public.exception))
                else:
                    self.assertEqual(node_name(y), "GroupNormAutogradBackward")


@needs_library
class TestRouting(TestCase):
    """Where the fast path would be wrong or invisible, the public op runs instead."""

    def call(self, x, *params):
        return persample.group_norm(x, 2, *params)

    def test_plain_eager_no_grad_and_inference(self):
        x, w = torch.randn(3, 4, 5), torch.randn(3, 4)
        ref = group_norm_op(x, 2, w)[0]
        self.assertEqual(node_name(self.call(x.requires_grad_(), w)), FAST_NODE)
        with torch.no_grad():
            self.assertEqual(self.call(x, w), ref)
        with torch.inference_mode():
            self.assertEqual(self.call(x.detach().clone(), w.clone()), ref)

    def test_unhandled_inputs_take_the_public_op(self):
        x = torch.randn(3, 4, 5, requires_grad=True)
        cases = {
            "float16": (x.detach().half().requires_grad_(), None),
            "non-contiguous": (torch.randn(3, 5, 4).transpose(1, 2).requires_grad_(), None),
            "fp32 params on bf16": (x.detach().bfloat16().requires_grad_(), torch.ones(4)),
        }
        for name, (inp, w) in cases.items():
            with self.subTest(name):
                self.assertEqual(node_name(self.call(inp, w)), "GroupNormAutogradBackward")

    def test_invalid_calls_raise_the_public_ops_errors(self):
        x = torch.randn(3, 4, 5)
        for args in ((x, 3), (x, 2, torch.ones(2, 4)), (x.long(), 2), (x, 2, None, None, -1.0)):
            with self.subTest(args=[getattr(a, "shape", a) for a in args]):
                with self.assertRaises(RuntimeError) as fast:
                    persample.group_norm(*args)
                with self.assertRaises(RuntimeError) as public:
                    group_norm_op(*args)
                self.assertEqual(str(fast.exception), str(public.exception))

    def test_a_mode_sees_the_public_ops(self):
        x = torch.randn(3, 4, 5, requires_grad=True)
        with RecordOps() as mode:
            self.call(x, torch.ones(3, 4, requires_grad=True)).sum().backward()
        self.assertIn("persample.group_norm", mode.ops)
        self.assertIn("persample.group_norm_backward", mode.ops)
        self.assertNotIn("persample._eager_group_norm", mode.ops)

    def test_backward_under_a_mode_after_a_fast_forward(self):
        x = torch.randn(3, 4, 5, requires_grad=True)
        y = self.call(x, torch.ones(3, 4))
        self.assertEqual(node_name(y), FAST_NODE)
        with RecordOps() as mode:
            y.sum().backward()
        self.assertIn("persample.group_norm_backward", mode.ops)

    def test_transforms_and_forward_ad(self):
        x, w = torch.randn(3, 4, 5), torch.randn(3, 4)
        with RecordOps() as mode:
            torch.func.vmap(lambda xi: self.call(xi[None], w[:1]))(x)
        self.assertEqual(mode.ops.count("persample.group_norm"), 1)
        tangent = torch.randn_like(x)
        with fwAD.dual_level():
            y = self.call(fwAD.make_dual(x, tangent), w)
            jvp = fwAD.unpack_dual(y).tangent
        expected = torch.func.jvp(lambda t: group_norm_op(t, 2, w)[0], (x,), (tangent,))[1]
        self.assertEqual(jvp, expected)


if __name__ == "__main__":
    run_tests()
