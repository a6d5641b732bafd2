"""Dtypes of outputs, statistics and gradients, values per dtype, and memory formats."""

import torch
import torch.nn.functional as F
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from error_model import check_close, check_group_norm, check_statistics
from samples import CL, CL3, group_norm_op, make_input, make_param, reference, stock_loop

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# (input dtype, parameter dtype)
DTYPES = ((F32, F32), (F64, F64), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32))


def acc(dtype):
    return F32 if dtype in (F16, BF16) else dtype


class TestDtypes(TestCase):
    def test_forward_dtypes_and_values(self):
        for dtype, p_dtype in DTYPES:
            for w_kind, b_kind in (("shared", "shared"), ("per_sample", "shared"), (None, None)):
                for fmt in (None, CL):
                    with self.subTest(dtype=dtype, param_dtype=p_dtype, weight=w_kind, fmt=fmt):
                        x = make_input((3, 6, 4, 5), fmt, dtype=dtype)
                        w = make_param(w_kind, 3, 6, dtype=p_dtype)
                        b = make_param(b_kind, 3, 6, dtype=p_dtype)
                        y, mean, rstd = group_norm_op(x, 3, w, b)
                        self.assertEqual(y.dtype, dtype)
                        self.assertEqual((mean.dtype, rstd.dtype), (acc(dtype), acc(dtype)))
                        # Error model: twice stock's error in the same dtypes (tests/error_model.py).
                        zeros = torch.zeros_like(x)
                        check_close(y, reference(x, 3, w, b, 1e-5, zeros)[0], stock_loop(x, 3, w, b, 1e-5, zeros)[0],
                                    "output")
                        check_statistics(x, 3, 1e-5, mean, rstd)

    def test_gradient_dtypes_and_values(self):
        for dtype, p_dtype in DTYPES:
            for w_kind, b_kind in (("shared", "per_sample"), ("per_sample", "shared")):
                for fmt in (None, CL):
                    with self.subTest(dtype=dtype, param_dtype=p_dtype, weight=w_kind, fmt=fmt):
                        self.check_gradients(dtype, p_dtype, w_kind, b_kind, fmt)

    def check_gradients(self, dtype, p_dtype, w_kind, b_kind, fmt):
        x = make_input((3, 6, 4, 5), fmt, dtype=dtype, requires_grad=True)
        w = make_param(w_kind, 3, 6, dtype=p_dtype, requires_grad=True)
        b = make_param(b_kind, 3, 6, dtype=p_dtype, requires_grad=True)
        grad_out = torch.randn_like(x)
        y = persample.group_norm(x, 3, w, b)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out)
        self.assertEqual((gx.dtype, gw.dtype, gb.dtype), (dtype, p_dtype, p_dtype))
        args = (x, 3, w, b, 1e-5, grad_out)
        check_group_norm(y, (gx, gw, gb), (w, b), reference(*args), stock_loop(*args))

    def test_reduced_input_without_params(self):
        for dtype in (F16, BF16):
            with self.subTest(dtype=dtype):
                x = make_input((2, 4, 6), dtype=dtype, requires_grad=True)
                grad_out = torch.randn_like(x)
                y = persample.group_norm(x, 2)
                (gx,) = torch.autograd.grad(y, x, grad_out)
                args = (x, 2, None, None, 1e-5, grad_out)
                check_group_norm(y, (gx, None, None), (None, None), reference(*args), stock_loop(*args))


class TestMemoryFormat(TestCase):
    """On CPU the output and grad_input keep the input's layout, as ``nn.GroupNorm`` does."""

    def test_matches_stock(self):
        inputs = (
            ((2, 6, 3, 5), CL),
            ((2, 6, 2, 3, 4), CL3),
            ((2, 6, 3, 5), None),
        )
        for shape, fmt in inputs:
            for dtype in (F32, BF16):
                for w_kind in (None, "shared", "per_sample", "expanded"):
                    with self.subTest(shape=shape, fmt=fmt, dtype=dtype, weight=w_kind):
                        self.check_layout(shape, fmt, dtype, w_kind)

    def test_non_contiguous_4d_gives_contiguous(self):
        x = torch.randn(2, 6, 5, 3).transpose(2, 3).requires_grad_()
        y = persample.group_norm(x, 3, make_param("per_sample", 2, 6))
        (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        stock = F.group_norm(x, 3)
        self.assertEqual(y.stride(), stock.stride())
        self.assertTrue(gx.is_contiguous())

    def check_layout(self, shape, fmt, dtype, w_kind):
        n, c = shape[:2]
        x = make_input(shape, fmt, dtype=dtype, requires_grad=True)
        w = make_param(w_kind, n, c, dtype=dtype, requires_grad=True)
        b = make_param(w_kind, n, c, dtype=dtype, requires_grad=True)
        y = persample.group_norm(x, 3, w, b)
        stock = torch.nn.GroupNorm(3, c).to(dtype)
        y_stock = stock(x)
        self.assertEqual(y.stride(), y_stock.stride())
        grad_out = torch.randn_like(y_stock)
        (gx,) = torch.autograd.grad(y, x, grad_out)
        (gx_stock,) = torch.autograd.grad(y_stock, x, grad_out)
        self.assertEqual(gx.stride(), gx_stock.stride())
        if fmt is not None:
            self.assertTrue(y.is_contiguous(memory_format=fmt))
            self.assertTrue(gx.is_contiguous(memory_format=fmt))


if __name__ == "__main__":
    run_tests()
