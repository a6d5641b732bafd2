"""The CUDA kernels: on a GPU when there is one, and their Python bodies on CPU tensors
(``group_norm_cuda`` and ``group_norm_backward_cuda`` are plain ATen code), so that
their math is covered on any machine."""

import unittest
from unittest import mock

import torch
import torch.nn.functional as F

import persample
from persample.ops import functional
from persample.ops.cuda import group_norm_backward_cuda, group_norm_cuda
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
)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
no_cuda = unittest.skipIf(not torch.cuda.is_available(), "needs a CUDA device")


def cpu(t):
    return t.detach().cpu()


def reduced(dtype):
    return dtype in (F16, BF16)


class TestCudaKernelsOnCpuTensors(TestCase):
    def test_forward_matches_reference(self):
        for dtype in (F64, F32):
            for i, (x, groups, w, b, eps) in enumerate(
                sample_inputs("cpu", requires_grad=False, dtype=dtype)
            ):
                with self.subTest(dtype=dtype, sample=i):
                    out, mean, rstd = group_norm_cuda(x, groups, w, b, eps)
                    ref_out = reference(x, groups, w, b, eps, torch.zeros_like(x))[0]
                    self.assertEqual(out, ref_out, exact_dtype=False, **TOL[dtype])
                    # As ATen's CUDA GroupNorm: contiguous output whatever the input layout.
                    self.assertTrue(out.is_contiguous())
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
        self.assertEqual((gx.dtype, gw.dtype, gb.dtype), (dtype, p_dtype, p_dtype))
        self.assertEqual(gx, ref[1], exact_dtype=False, **TOL[dtype])
        self.assertEqual(gw, ref[2], exact_dtype=False, **TOL[p_dtype])
        self.assertEqual(gb, ref[3], exact_dtype=False, **TOL[p_dtype])
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
        for i, (x, groups, w, b, eps) in enumerate(sample_inputs("cuda", requires_grad=True)):
            with self.subTest(sample=i):
                y = persample.group_norm(x, groups, w, b, eps)
                grad_out = torch.randn_like(y)
                leaves = [t for t in (x, w, b) if t is not None]
                grads = dict(zip(map(id, leaves), torch.autograd.grad(y, leaves, grad_out)))
                ref = reference(x, groups, w, b, eps, grad_out)
                self.assertEqual(cpu(y), ref[0], exact_dtype=False, **TOL[F32])
                self.assertEqual(cpu(grads[id(x)]), ref[1], exact_dtype=False, **TOL[F32])
                for p, r in ((w, ref[2]), (b, ref[3])):
                    if p is not None:
                        expected = expected_param_grad(p, r)
                        self.assertEqual(cpu(grads[id(p)]), expected, exact_dtype=False, **TOL[F32])

    def test_backward_op_matches_reference(self):
        for i, (x, groups, w, b, eps) in enumerate(sample_inputs("cuda", requires_grad=False)):
            _, mean, rstd = group_norm_op(x, groups, None, None, eps)
            grad_out = torch.randn_like(x)
            ref = reference(x, groups, w, b, eps, grad_out)
            for mask in MASKS:
                with self.subTest(sample=i, mask=mask):
                    outs = group_norm_backward_op(grad_out, x, mean, rstd, w, groups, mask)
                    for out, wanted, expected in zip(outs, mask, ref[1:]):
                        expected = expected if wanted else expected.new_empty(0)
                        self.assertEqual(cpu(out), expected, exact_dtype=False, **TOL[F32])

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

    def test_channels_last_gives_contiguous_like_stock(self):
        for shape, fmt in (((2, 6, 3, 5), CL), ((2, 6, 2, 3, 4), CL3)):
            for w_kind in ("shared", "per_sample"):
                with self.subTest(fmt=fmt, weight=w_kind):
                    x = make_input(shape, fmt, device="cuda", requires_grad=True)
                    y = persample.group_norm(x, 3, make_param(w_kind, 2, 6, device="cuda"))
                    stock = torch.nn.GroupNorm(3, 6).cuda()(x)
                    self.assertEqual(y.stride(), stock.stride())
                    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
                    self.assertTrue(gx.is_contiguous())

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
