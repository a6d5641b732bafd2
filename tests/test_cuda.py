"""The CUDA kernels: on a GPU when there is one, and their ATen bodies on CPU tensors
(``aten_forward`` and ``aten_backward`` are plain ATen code), so that their math is
covered on any machine. On a GPU, fp32/bf16/fp16 take the Triton kernels
(ops/group_norm/triton_kernels.py; tests/test_triton.py checks them kernel by kernel), and
TestTritonTransforms runs them under every transform."""

import contextlib
import importlib.util
import os
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn.functional as F

import persample
from persample.ops import functional
from persample.ops.group_norm import cuda
from persample.ops.group_norm.checks import grad_param_dtype
from persample.ops.group_norm.cuda import group_norm_backward_cuda, group_norm_cuda
from persample.ops.group_norm.layout import output_memory_format
from error_model import check_close, grad_input_scale
from testcase import TestCase
from samples import (
    CL,
    CL3,
    MASKS,
    TOL,
    backward_sample_inputs,
    expected_param_grad,
    group_norm_backward_op,
    group_norm_op,
    make_input,
    make_param,
    opcheck_samples,
    reference,
    sample_inputs,
    stock_loop,
)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
no_cuda = unittest.skipIf(not torch.cuda.is_available(), "needs a CUDA device")
no_triton = unittest.skipIf(importlib.util.find_spec("triton") is None, "triton is not installed")


def cpu(t):
    return t.detach().cpu()


def reduced(dtype):
    return dtype in (F16, BF16)


class TestAtenPathOnCpuTensors(TestCase):
    """The ATen path (fp64, or no triton), through the kernels' glue: CPU tensors would
    take the Triton kernels while triton interprets them (tests/test_triton.py)."""

    def setUp(self):
        super().setUp()
        patch = mock.patch.object(cuda, "_triton_for", lambda input: None)
        patch.start()
        self.addCleanup(patch.stop)

    def test_forward_matches_reference(self):
        for dtype in (F64, F32):
            for i, (x, groups, w, b, eps) in enumerate(
                sample_inputs("cpu", requires_grad=False, dtype=dtype)
            ):
                with self.subTest(dtype=dtype, sample=i):
                    out, mean, rstd = group_norm_cuda(x, groups, w, b, eps)
                    ref_out = reference(x, groups, w, b, eps, torch.zeros_like(x))[0]
                    self.assertEqual(out, ref_out, exact_dtype=False, **TOL[dtype])
                    # In the input's layout, as on CPU (ATen's CUDA GroupNorm: contiguous).
                    self.assertEqual(out.stride(), torch.empty_like(x, memory_format=output_memory_format(x)).stride())
                    self.assertEqual((mean, rstd), group_norm_op(x, groups, None, None, eps)[1:])

    def test_backward_matches_reference(self):
        for dtype in (F64, F32):
            for i, (x, groups, w, b, eps) in enumerate(
                sample_inputs("cpu", requires_grad=False, dtype=dtype)
            ):
                _, mean, rstd = group_norm_cuda(x, groups, None, None, eps)
                grad_out = torch.randn_like(x)
                ref = reference(x, groups, w, b, eps, grad_out)
                for mask in MASKS:
                    with self.subTest(dtype=dtype, sample=i, mask=mask):
                        outs = group_norm_backward_cuda(grad_out, x, mean, rstd, w, groups, mask)
                        for out, wanted, expected in zip(outs, mask, ref[1:]):
                            expected = expected if wanted else expected.new_empty(0)
                            self.assertEqual(out, expected, exact_dtype=False, **TOL[dtype])

    def test_reduced_precision_upcast(self):
        for dtype in (F16, BF16):
            for p_dtype in (dtype, F32):
                for w_kind in ("shared", "per_sample", "expanded"):
                    with self.subTest(dtype=dtype, param_dtype=p_dtype, weight=w_kind):
                        self.check_reduced(dtype, p_dtype, w_kind)

    def check_reduced(self, dtype, p_dtype, w_kind):
        x = make_input((3, 6, 4, 5), CL, dtype=dtype)
        w, b = (make_param(k, 3, 6, dtype=p_dtype) for k in (w_kind, "per_sample"))
        out, mean, rstd = group_norm_cuda(x, 3, w, b)
        self.assertEqual((out.dtype, mean.dtype, rstd.dtype), (dtype, F32, F32))
        grad_out = torch.randn_like(x)
        ref = reference(x, 3, w, b, 1e-5, grad_out)
        self.assertEqual(out, ref[0], exact_dtype=False, **TOL[dtype])
        gx, gw, gb = group_norm_backward_cuda(grad_out, x, mean, rstd, w, 3, [True, True, True])
        self.assertEqual((gx.dtype, gw.dtype, gb.dtype), (dtype, *[grad_param_dtype(x, w)] * 2))
        self.assertEqual(gx, ref[1], exact_dtype=False, **TOL[dtype])
        self.assertEqual(gw, ref[2], exact_dtype=False, **TOL[gw.dtype])
        self.assertEqual(gb, ref[3], exact_dtype=False, **TOL[gb.dtype])
        # Without a weight the parameter gradients come in the fp32 accumulation dtype.
        grads = group_norm_backward_cuda(grad_out, x, mean, rstd, None, 3, [False, True, True])
        self.assertEqual(grads[1:], ref[2:], exact_dtype=False, **TOL[F32])
        self.assertEqual((grads[1].dtype, grads[2].dtype), (F32, F32))

    def test_empty_batch(self):
        x = make_input((0, 6, 5))
        out, mean, rstd = group_norm_cuda(x, 3, torch.ones(0, 6))
        self.assertEqual((out.shape, mean.shape), (x.shape, (0, 3)))
        grads = group_norm_backward_cuda(x, x, mean, rstd, torch.ones(6), 3, [True, True, True])
        self.assertEqual([g.shape for g in grads], [x.shape, (0, 6), (0, 6)])


@no_cuda
class TestCudaDevice(TestCase):
    def test_autograd_matches_reference(self):
        """Against float64, within twice stock CUDA GroupNorm's own error per example
        (tests/error_model.py): ATen's CUDA backward (the C++ path's below the Triton
        threshold) cancels in groups of two elements, as stock's does."""
        for i, (x, groups, w, b, eps) in enumerate(sample_inputs("cuda", requires_grad=True)):
            with self.subTest(sample=i):
                rstd = group_norm_op(x.detach(), groups, None, None, eps)[2]
                y = persample.group_norm(x, groups, w, b, eps)
                grad_out = torch.randn_like(y)
                leaves = [t for t in (x, w, b) if t is not None]
                grads = dict(zip(map(id, leaves), torch.autograd.grad(y, leaves, grad_out)))
                ref = reference(x, groups, w, b, eps, grad_out)
                stock = stock_loop(x, groups, w, b, eps, grad_out)
                check_close(y, ref[0], stock[0], "output")
                check_close(grads[id(x)], ref[1], stock[1], "grad_input",
                            scale=grad_input_scale(grad_out, rstd, w))
                for name, p, r, st in (("weight", w, ref[2], stock[2]), ("bias", b, ref[3], stock[3])):
                    if p is not None:
                        if p.dim() == 1:  # stock's rows summed exactly, then rounded
                            r, st = r.sum(0), st.double().sum(0).to(st.dtype)
                        check_close(grads[id(p)], r, st, f"grad_{name}")

    def test_backward_op_matches_reference(self):
        for i, (x, groups, w, b, eps) in enumerate(sample_inputs("cuda", requires_grad=False)):
            _, mean, rstd = group_norm_op(x, groups, None, None, eps)
            grad_out = torch.randn_like(x)
            ref = reference(x, groups, w, b, eps, grad_out)
            stock = stock_loop(x, groups, w, b, eps, grad_out)
            scales = (grad_input_scale(grad_out, rstd, w), 0.0, 0.0)
            for mask in MASKS:
                with self.subTest(sample=i, mask=mask):
                    outs = group_norm_backward_op(grad_out, x, mean, rstd, w, groups, mask)
                    for name, out, wanted, expected, st, scale in zip(
                            ("grad_input", "grad_weight", "grad_bias"), outs, mask, ref[1:], stock[1:], scales):
                        if wanted:
                            check_close(out, expected, st, name, scale=scale)
                        else:
                            self.assertEqual(out.numel(), 0)

    def test_dtypes_match_stock_and_reference(self):
        dtypes = ((F32, F32), (F64, F64), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32))
        for dtype, p_dtype in dtypes:
            for w_kind in ("shared", "per_sample"):
                with self.subTest(dtype=dtype, param_dtype=p_dtype, weight=w_kind):
                    self.check_dtypes(dtype, p_dtype, w_kind)

    def check_dtypes(self, dtype, p_dtype, w_kind):
        x = make_input((3, 6, 4, 5), device="cuda", dtype=dtype, requires_grad=True)
        kw = dict(device="cuda", dtype=p_dtype, requires_grad=True)
        w, b = make_param(w_kind, 3, 6, **kw), make_param("shared", 3, 6, **kw)
        y, mean, rstd = group_norm_op(x, 3, w, b)
        self.assertEqual(y.dtype, dtype)
        self.assertEqual((mean.dtype, rstd.dtype), (F32, F32) if reduced(dtype) else (dtype, dtype))
        if w_kind == "shared":
            # Stock CUDA GroupNorm takes its params in the input dtype.
            stock = F.group_norm(x, 3, w.to(dtype), b.to(dtype))
            self.assertEqual(y, stock, **TOL[dtype])
        grad_out = torch.randn_like(y)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out)
        self.assertEqual((gx.dtype, gw.dtype, gb.dtype), (dtype, p_dtype, p_dtype))
        ref_y, ref_x, ref_w, ref_b = reference(x, 3, w, b, 1e-5, grad_out)
        self.assertEqual(cpu(y), ref_y, exact_dtype=False, **TOL[dtype])
        self.assertEqual(cpu(gx), ref_x, exact_dtype=False, **TOL[dtype])
        self.assertEqual(cpu(gw), expected_param_grad(w, ref_w), exact_dtype=False, **TOL[p_dtype])
        self.assertEqual(cpu(gb), ref_b.sum(0), exact_dtype=False, **TOL[p_dtype])

    def test_channels_last_stays_channels_last(self):
        """Output and grad_input keep the input's layout on CUDA too, where stock
        GroupNorm returns contiguous output (pytorch/pytorch#111824): a channels_last
        network does not convert its activations at every GroupNorm."""
        for shape, fmt in (((2, 6, 3, 5), CL), ((2, 6, 2, 3, 4), CL3)):
            for w_kind in ("shared", "per_sample"):
                with self.subTest(fmt=fmt, weight=w_kind):
                    x = make_input(shape, fmt, device="cuda", requires_grad=True)
                    y = persample.group_norm(x, 3, make_param(w_kind, 2, 6, device="cuda"))
                    self.assertTrue(y.is_contiguous(memory_format=fmt))
                    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
                    self.assertTrue(gx.is_contiguous(memory_format=fmt))

    def test_opcheck_cuda(self):
        for requires_grad in (False, True):
            opcheck_samples(self, group_norm_op, sample_inputs, "cuda", requires_grad=requires_grad)
            opcheck_samples(
                self,
                group_norm_backward_op,
                backward_sample_inputs,
                "cuda",
                requires_grad=requires_grad,
            )


@no_cuda
class TestCudaCompiled(TestCase):
    """Inductor on the GPU generates Triton code around the ops; CPU CI never does."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def test_compiled_per_sample_grads(self):
        from torch.func import functional_call
        from torch_compile_tests.models import batch, loss_fn, make_models, per_example_grads, per_sample_leaves

        model, stock = (m.cuda() for m in make_models())

        def loss(x, y, w, b):
            return loss_fn(functional_call(model, {"gn.weight": w, "gn.bias": b}, (x,)), y)

        compiled = torch.compile(loss, fullgraph=True)
        for n in (4, 6, 9):
            x, y = (t.cuda() for t in batch(n))
            expected = per_example_grads(stock, x, y)
            w, b = per_sample_leaves(model.gn, n)
            compiled(x, y, w, b).backward()
            self.assertEqual(w.grad, expected["gn.weight"], atol=1e-4, rtol=1e-4)
            self.assertEqual(b.grad, expected["gn.bias"], atol=1e-4, rtol=1e-4)

    def test_compiled_vmap_grad(self):
        from torch_compile_tests.models import per_sample_loss

        args, ref = vmap_grad_case("cuda")
        fn = per_sample_grad_fn(per_sample_loss)
        for got in (fn(*args), torch.compile(fn, fullgraph=True)(*args)):
            for g, r in zip(got, ref):
                self.assertEqual(g.double(), r, atol=1e-4, rtol=1e-4)


def op_norm(x, w, b):
    """The public op itself: in eager mode the C++ path takes small fp32 calls, and under
    eager CUDA transforms persample.group_norm lowers to ATen (functional.use_aten)."""
    return group_norm_op(x, 3, w, b, 1e-5)[0]


def dot(y, t):
    return (y.float() * t.float()).sum()


@no_cuda
@no_triton
class TestTritonTransforms(TestCase):
    """Every transform on CUDA runs the Triton kernels (counted) and gives the float64
    per-example results, in fp32, bf16 and fp16, contiguous and channels_last."""

    device = "cuda"
    VARIANTS = ((F32, None), (F32, CL), (BF16, CL), (F16, None))

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    @contextlib.contextmanager
    def triton_runs(self, *names):
        """The block calls these functions of ops/group_norm/triton_launch.py."""
        if self.device != "cuda":  # the CPU kernels (a dry run of the test's logic)
            yield
            return
        launch = cuda.triton_launch()
        with contextlib.ExitStack() as stack:
            spies = [stack.enter_context(mock.patch.object(launch, n, wraps=getattr(launch, n)))
                     for n in names]
            yield
        for name, spy in zip(names, spies):
            self.assertGreater(spy.call_count, 0, f"triton_launch.{name} did not run")

    def case(self, dtype, fmt, n=4, per_sample_bias=True):
        """``(x [N, 6, 5, 7], shared w, b, grad_out t)``; b is [N, C] or [C]."""
        torch.manual_seed(0)
        x = make_input((n, 6, 5, 7), fmt, device=self.device, dtype=dtype)
        w = make_param("shared", n, 6, device=self.device, dtype=dtype)
        b = make_param("per_sample" if per_sample_bias else "shared", n, 6, device=self.device, dtype=dtype)
        return x, w, b, torch.randn_like(x)

    def check(self, got, expected, dtype):
        self.assertEqual(cpu(got), expected, exact_dtype=False, **TOL[dtype])

    def test_eager_above_the_routing_threshold(self):
        from persample.ops.group_norm import eager

        split = ((2, 4, 96, 96), 1)  # a 4 x 9216 group: swept, or split over programs
        for shape, groups in (((4, 6, 5, 7), 3), split):
            for dtype, fmt in self.VARIANTS:
                with self.subTest(shape=shape, dtype=dtype, fmt=fmt), \
                        mock.patch.object(eager, "TRITON_MIN_NUMEL", 0), \
                        self.triton_runs("forward", "backward"):
                    x = make_input(shape, fmt, device=self.device, dtype=dtype, requires_grad=True)
                    w = make_param("per_sample", shape[0], shape[1], device=self.device, dtype=dtype,
                                   requires_grad=True)
                    y = persample.group_norm(x, groups, w)
                    t = torch.randn_like(y)
                    gx, gw = torch.autograd.grad(y, (x, w), t)
                    ref = reference(x, groups, w, None, 1e-5, t)
                    for got, expected in zip((y, gx, gw), ref[:3]):
                        self.check(got, expected, dtype)

    def test_compile_fullgraph(self):
        compiled = torch.compile(lambda x, w, b, t: dot(persample.group_norm(x, 3, w, b), t), fullgraph=True)
        for dtype, fmt in self.VARIANTS:
            with self.subTest(dtype=dtype, fmt=fmt), self.triton_runs("forward", "backward"):
                x, w, b, t = self.case(dtype, fmt)
                leaves = [v.detach().requires_grad_() for v in (x, w, b)]
                grads = torch.autograd.grad(compiled(*leaves, t), leaves)
                ref = reference(x, 3, w, b, 1e-5, t)
                for got, expected in zip(grads, (ref[1], ref[2].sum(0), ref[3])):
                    self.check(got, expected, dtype)

    def test_export_save_load(self):
        from torch.export import Dim

        for dtype, fmt in self.VARIANTS:
            with self.subTest(dtype=dtype, fmt=fmt), self.triton_runs("forward"):
                layer = persample.nn.GroupNorm(3, 6).to(self.device, dtype).eval()
                x, w, b, _ = self.case(dtype, fmt, per_sample_bias=False)
                with torch.no_grad():
                    layer.weight.copy_(w)
                    layer.bias.copy_(b)
                ep = torch.export.export(layer, (x,), dynamic_shapes={"input": {0: Dim("batch", min=2)}})
                with tempfile.TemporaryDirectory() as tmp:
                    torch.export.save(ep, os.path.join(tmp, "gn.pt2"))
                    loaded = torch.export.load(os.path.join(tmp, "gn.pt2"))
                x3 = x[:3].clone(memory_format=torch.preserve_format)
                self.check(loaded.module()(x3), reference(x3, 3, w, b, 1e-5, x3)[0], dtype)

    def test_aot_inductor(self):
        layer = persample.nn.GroupNorm(3, 6).to(self.device).eval()
        x, w, b, _ = self.case(F32, None, per_sample_bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        ep = torch.export.export(layer, (x,))
        with tempfile.TemporaryDirectory() as tmp:
            package = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "gn.pt2"))
            runner = torch._inductor.aoti_load_package(package)
            with self.triton_runs("forward"):
                self.check(runner(x), reference(x, 3, w, b, 1e-5, x)[0], F32)

    def test_cuda_graphs_reduce_overhead(self):
        """``torch.compile(mode="reduce-overhead")`` records the forward and backward,
        the op's Triton launches included, in CUDA graphs and replays them: the same
        results on every step, in both layouts."""
        for fmt in (None, CL):
            with self.subTest(fmt=fmt), self.triton_runs("forward", "backward"):
                torch._dynamo.reset()
                layer = persample.nn.GroupNorm(3, 6).to(self.device)
                x, w, b, t = self.case(F32, fmt, per_sample_bias=False)
                with torch.no_grad():
                    layer.weight.copy_(w)
                    layer.bias.copy_(b)
                compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
                ref = reference(x, 3, w, b, 1e-5, t)
                for step in range(3):  # warm-up, recording, replay
                    layer.zero_grad(set_to_none=True)
                    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                    y = compiled(xi)
                    y.backward(t)
                    with self.subTest(step=step):
                        self.check(y, ref[0], F32)
                        self.check(xi.grad, ref[1], F32)
                        self.check(layer.weight.grad, ref[2].sum(0), F32)

    def func_case(self, dtype, fmt):
        x, w, b, t = self.case(dtype, fmt, per_sample_bias=False)

        def loss(w, b, xi, ti):
            return dot(op_norm(xi[None], w, b), ti[None])

        ref = reference(x, 3, w, b, 1e-5, t)
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0)), \
            (w, b, x, t), ref[2:]

    def test_torch_func_eager_and_compiled(self):
        for compiled, (dtype, fmt) in ((c, v) for c in (False, True) for v in self.VARIANTS):
            with self.subTest(compiled=compiled, dtype=dtype, fmt=fmt), \
                    self.triton_runs("forward", "backward"):
                torch._dynamo.reset()
                fn, args, ref = self.func_case(dtype, fmt)
                if compiled:
                    fn = torch.compile(fn, fullgraph=True)
                for got, expected in zip(fn(*args), ref):
                    self.check(got, expected, dtype)

    def test_vmap(self):
        for dtype, fmt in self.VARIANTS:
            with self.subTest(dtype=dtype, fmt=fmt), self.triton_runs("forward"):
                x, w, b, _ = self.case(dtype, fmt)
                xs = torch.stack([x, x.flip(0)])  # [2, N, C, H, W]
                got = torch.vmap(lambda xb: op_norm(xb, w, b))(xs)
                expected = reference(xs.flatten(0, 1), 3, w, b.repeat(2, 1), 1e-5, xs.flatten(0, 1))[0]
                self.check(got.flatten(0, 1), expected, dtype)

    def test_double_backward(self):
        for fmt in (None, CL):
            with self.subTest(fmt=fmt), self.triton_runs("backward"):
                x, w, b, t = self.case(F32, fmt, per_sample_bias=False)
                u, v = torch.randn_like(x), torch.randn_like(w)

                def second(norm, x, w, b):
                    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
                    gx, gw = torch.autograd.grad(dot(norm(x, w, b), t.to(x)), (x, w), create_graph=True)
                    return torch.autograd.grad(dot(gx, u.to(x)) + dot(gw, v.to(x)), (x, w))

                got = second(op_norm, x, w, b)
                f64 = [a.detach().cpu().double() for a in (x, w, b)]
                expected = second(lambda x, w, b: F.group_norm(x, 3, w, b), *f64)
                for g, e in zip(got, expected):
                    self.assertEqual(cpu(g), e, exact_dtype=False, atol=1e-3, rtol=1e-3)


def vmap_grad_case(device):
    """``(weight, bias, x, target)`` and the float64 loop's per-sample (weight, bias)
    gradients of ``torch_compile_tests.models.per_sample_loss``."""
    from torch_compile_tests.models import stock_loop

    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    x, t = torch.randn(5, 6, 4, 4, device=device), torch.randn(5, 6, 4, 4, device=device)
    return (w, b, x, t), stock_loop(w, b, x, t)


def per_sample_grad_fn(loss):
    return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))


class TestEagerTransformsLowering(TestCase):
    """Under eager torch.func transforms, CUDA calls take ATen's GroupNorm on the
    per-sample view and CPU calls the op (see ops.functional.use_aten); both give the
    per-example loop's gradients, through the functional API and the module."""

    def per_sample_grads(self, device):
        from torch.func import functional_call
        from torch_compile_tests.models import per_sample_loss

        args, ref = vmap_grad_case(device)
        layer = persample.nn.GroupNorm(2, 6, device=device)

        def module_loss(weight, bias, xi, ti):
            y = functional_call(layer, {"weight": weight, "bias": bias}, (xi[None],))
            return F.mse_loss(y, ti[None], reduction="sum")

        lowered = [mock.patch.object(m, "aten_group_norm", wraps=functional.aten_group_norm)
                   for m in (functional, persample.nn)]
        with lowered[0] as spy_fn, lowered[1] as spy_module:
            for loss in (per_sample_loss, module_loss):
                got = per_sample_grad_fn(loss)(*args)
                for g, r in zip(got, ref):
                    self.assertEqual(g.double(), r, atol=1e-4, rtol=1e-4)
        return spy_fn.call_count, spy_module.call_count

    def test_cpu_runs_the_op(self):
        self.assertEqual(self.per_sample_grads("cpu"), (0, 0))

    @no_cuda
    def test_cuda_lowers_to_aten(self):
        self.assertEqual(self.per_sample_grads("cuda"), (1, 1))


if __name__ == "__main__":
    unittest.main()
