"""Correctness of outputs and per-sample gradients against a per-example loop over stock
``F.group_norm`` in float64."""

import torch
import torch.nn.functional as F
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from samples import (
    CL,
    MASKS,
    expected_param_grad,
    group_norm_backward_op,
    group_norm_op,
    make_input,
    make_param,
    reference,
    sample_inputs,
)

F64 = torch.float64


def autograd_grads(x, groups, w, b, eps, grad_out):
    """``persample.group_norm`` and the gradients autograd gives its inputs (None where
    an input does not require grad). No ``grad_out`` means ``y.sum()``'s stride-0 one."""
    y = persample.group_norm(x, groups, w, b, eps)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    if grad_out is None:
        grads = iter(torch.autograd.grad(y.sum(), leaves))
    else:
        grads = iter(torch.autograd.grad(y, leaves, grad_out))
    return y, [next(grads) if t is not None and t.requires_grad else None for t in (x, w, b)]


def statistics(x, groups, eps):
    """Mean and rstd over each (sample, group), straight from the definition."""
    v = x.detach().to(F64).reshape(x.shape[0], groups, -1)
    return v.mean(-1), (v.var(-1, unbiased=False) + eps).rsqrt()


class TestGroupNormAutograd(TestCase):
    def check_against_reference(self, x, groups, w, b, eps=1e-5, grad_out=None):
        y, (gx, gw, gb) = autograd_grads(x, groups, w, b, eps, grad_out)
        ref = reference(x, groups, w, b, eps, torch.ones_like(y) if grad_out is None else grad_out)
        self.assertEqual(y, ref[0], exact_dtype=False)
        if gx is not None:
            self.assertEqual(gx, ref[1], exact_dtype=False)
        for p, g, ref_g in ((w, gw, ref[2]), (b, gb, ref[3])):
            if g is not None:
                self.assertEqual(g, expected_param_grad(p, ref_g), exact_dtype=False)

    def test_matches_reference(self):
        for i, (x, groups, w, b, eps) in enumerate(
            sample_inputs("cpu", requires_grad=True, dtype=F64)
        ):
            with self.subTest(sample=i):
                self.check_against_reference(x, groups, w, b, eps, torch.randn_like(x))

    def test_only_some_inputs_require_grad(self):
        x = make_input((3, 6, 5), dtype=F64)
        w = make_param("per_sample", 3, 6, dtype=F64, requires_grad=True)
        b = make_param("shared", 3, 6, dtype=F64)
        self.check_against_reference(x, 3, w, b, grad_out=torch.randn_like(x))
        self.check_against_reference(x.requires_grad_(), 3, w.detach(), b.requires_grad_())

    def test_gradcheck(self):
        cases = (
            ((2, 4, 3), 2, None, "shared", "shared"),
            ((2, 4, 3), 1, None, "per_sample", "per_sample"),
            ((2, 4, 3), 4, None, "per_sample", "shared"),
            ((2, 4, 2, 3), 2, CL, "per_sample", "per_sample"),
            ((2, 4, 2, 3), 2, CL, "shared", "per_sample"),
            ((3, 2, 3), 1, None, None, None),
        )
        for shape, groups, fmt, w_kind, b_kind in cases:
            n, c = shape[:2]
            x = make_input(shape, fmt, dtype=F64, requires_grad=True)
            w, b = (make_param(k, n, c, dtype=F64, requires_grad=True) for k in (w_kind, b_kind))

            def fn(x, w, b):
                return persample.group_norm(x, groups, w, b)

            with self.subTest(shape=shape, fmt=fmt, weight=w_kind, bias=b_kind):
                self.assertTrue(torch.autograd.gradcheck(fn, (x, w, b)))

    def test_double_backward_matches_stock(self):
        # nn.GroupNorm supports double backward (e.g. gradient penalties on per-sample
        # gradient norms), so the drop-in must agree with it.
        x = make_input((2, 4, 3, 5), CL, dtype=F64, requires_grad=True)
        w = make_param("per_sample", 2, 4, dtype=F64, requires_grad=True)
        b = make_param("per_sample", 2, 4, dtype=F64)
        y = persample.group_norm(x, 2, w, b)
        (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
        (gx,) = torch.autograd.grad(gw.square().sum(), x)
        xr = x.detach().contiguous().requires_grad_()
        rows = []
        for i in range(2):
            wi = w[i].detach().requires_grad_()
            yi = F.group_norm(xr[i : i + 1], 2, wi, b[i])
            rows.append(torch.autograd.grad(yi.square().sum(), wi, create_graph=True)[0])
        (ref_gx,) = torch.autograd.grad(torch.stack(rows).square().sum(), xr)
        self.assertEqual(gx, ref_gx)

    def test_empty_batch(self):
        for w_kind in ("shared", "per_sample"):
            with self.subTest(weight=w_kind):
                x = make_input((0, 6, 5), requires_grad=True)
                w, b = (make_param(w_kind, 0, 6, requires_grad=True) for _ in range(2))
                y = persample.group_norm(x, 3, w, b)
                self.assertEqual(y, F.group_norm(x.detach(), 3))
                y.sum().backward()
                self.assertEqual(x.grad, torch.zeros_like(x))
                self.assertEqual(w.grad, torch.zeros_like(w))
                self.assertEqual(b.grad, torch.zeros_like(b))

    def test_non_contiguous(self):
        n, c = 3, 6
        inputs = (
            torch.randn(n, 2 * c, 7, dtype=F64)[:, ::2],
            torch.randn(n, 7, c, dtype=F64).transpose(1, 2),
            torch.randn(n, c, 8, 5, dtype=F64)[:, :, ::2],
            # Sliced channels_last: strides like channels_last, but not dense.
            torch.randn(n, c, 8, 5, dtype=F64).contiguous(memory_format=CL)[:, :, ::2],
        )
        w = torch.rand(n, 2 * c, dtype=F64)[:, ::2]
        b = torch.randn(c, n, dtype=F64).t()
        for i, x in enumerate(inputs):
            with self.subTest(input=i, strides=x.stride()):
                x.requires_grad_()
                self.check_against_reference(
                    x, 3, w.requires_grad_(), b.requires_grad_(), grad_out=torch.randn_like(x)
                )

    def test_expanded_grad_out(self):
        # ``y.sum().backward()`` hands the backward a stride-0 grad_out.
        for fmt in (None, CL):
            for w_kind in ("shared", "per_sample"):
                with self.subTest(fmt=fmt, weight=w_kind):
                    x = make_input((2, 4, 3, 5), fmt, dtype=F64, requires_grad=True)
                    w, b = (
                        make_param(w_kind, 2, 4, dtype=F64, requires_grad=True) for _ in range(2)
                    )
                    self.check_against_reference(x, 2, w, b)


class TestGroupNormBackwardOp(TestCase):
    def test_matches_reference(self):
        for i, (x, groups, w, b, eps) in enumerate(
            sample_inputs("cpu", requires_grad=False, dtype=F64)
        ):
            with self.subTest(sample=i):
                _, mean, rstd = group_norm_op(x, groups, None, None, eps)
                ref_mean, ref_rstd = statistics(x, groups, eps)
                self.assertEqual(mean, ref_mean)
                self.assertEqual(rstd, ref_rstd)
                grad_out = torch.randn_like(x)
                ref = reference(x, groups, w, b, eps, grad_out)
                for mask in MASKS:
                    outs = group_norm_backward_op(grad_out, x, mean, rstd, w, groups, mask)
                    for out, wanted, expected in zip(outs, mask, ref[1:]):
                        self.assertEqual(out, expected if wanted else expected.new_empty(0))

    def test_non_dense_channels_last(self):
        # Strides like channels_last but with gaps: ATen's kernels read dense arrays.
        x = torch.randn(2, 4, 6, 5, dtype=F64).contiguous(memory_format=CL)[:, :, ::2]
        w = make_param("per_sample", 2, 4, dtype=F64)
        _, mean, rstd = group_norm_op(x.contiguous(), 2)
        grad_out = torch.randn_like(x)
        outs = group_norm_backward_op(grad_out, x, mean, rstd, w, 2, [True, True, True])
        self.assertEqual(outs, reference(x, 2, w, None, 1e-5, grad_out)[1:])

    def test_empty_batch(self):
        x = make_input((0, 6, 5))
        _, mean, rstd = group_norm_op(x, 3)
        for w in (None, torch.ones(6), torch.ones(0, 6)):
            gx, gw, gb = group_norm_backward_op(x, x, mean, rstd, w, 3, [True, True, True])
            self.assertEqual(gx.shape, x.shape)
            self.assertEqual(gw, torch.zeros(0, 6))
            self.assertEqual(gb, torch.zeros(0, 6))


if __name__ == "__main__":
    run_tests()
