"""Double backward: persample::group_norm_backward is itself differentiable."""

import unittest

import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import persample

F64 = torch.float64


def inputs(weight_kind, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 2, dtype=F64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shape = (4,) if weight_kind == "shared" else (3, 4)
    w = torch.rand(*shape, dtype=F64, generator=g) + 0.5
    b = torch.randn(*shape, dtype=F64, generator=g)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


class TestDoubleBackward(unittest.TestCase):
    def test_gradgradcheck(self):
        for kind in ("shared", "per_sample"):
            for cl in (False, True):
                with self.subTest(weight=kind, channels_last=cl):
                    args = inputs(kind, cl)
                    fn = lambda x, w, b: persample.group_norm(x, 2, w, b)  # noqa: E731
                    self.assertTrue(gradgradcheck(fn, args))

    def test_backward_op_gradcheck(self):
        x, w, _ = inputs("per_sample")
        _, mean, rstd = torch.ops.persample.group_norm(x.detach(), 2, w.detach())
        grad_out = torch.randn_like(x).requires_grad_()

        def fn(go, x, w):
            return torch.ops.persample.group_norm_backward(go, x, mean, rstd, w, 2, [True, True, True])

        # mean/rstd are recomputed from x by the derivative, so pass matching ones.
        self.assertTrue(gradcheck(lambda go, w: fn(go, x.detach(), w), (grad_out, w)))

    def test_gradient_penalty_on_per_sample_norms_matches_stock(self):
        x, w, b = inputs("shared")

        def penalty(norm):
            ws = w.expand(3, 4)
            y = norm(x, ws)
            (gw,) = torch.autograd.grad(y.sin().sum(), ws, create_graph=True)
            return gw.norm(dim=1).sum()

        ours = torch.autograd.grad(penalty(lambda x, ws: persample.group_norm(x, 2, ws, b)), (x, w))
        stock = torch.autograd.grad(
            penalty(
                lambda x, ws: torch.cat(
                    [F.group_norm(x[i : i + 1], 2, ws[i], b) for i in range(3)]
                )
            ),
            (x, w),
        )
        for a, e in zip(ours, stock):
            torch.testing.assert_close(a, e)

    def test_torch_func_second_derivatives(self):
        x, w, b = (t.detach() for t in inputs("shared"))
        ours = lambda w: persample.group_norm(x, 2, w, b).sin().sum()  # noqa: E731
        stock = lambda w: F.group_norm(x, 2, w, b).sin().sum()  # noqa: E731
        want = torch.func.hessian(stock)(w)
        jr = torch.func.jacrev
        torch.testing.assert_close(jr(jr(ours))(w), want)
        nested = torch.func.grad(lambda w: torch.func.grad(ours)(w).square().sum())(w)
        torch.testing.assert_close(nested, torch.func.grad(lambda w: torch.func.grad(stock)(w).square().sum())(w))
        # Forward-mode over the backward op is refused, never silently wrong.
        with self.assertRaisesRegex(RuntimeError, "does not support forward-mode AD"):
            torch.func.hessian(ours)(w)


class TestForwardMode(unittest.TestCase):
    def test_jvp_matches_stock(self):
        for kind in ("shared", "per_sample"):
            for cl in (False, True):
                with self.subTest(weight=kind, channels_last=cl):
                    x, w, b = (t.detach() for t in inputs(kind, cl))
                    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
                    ours = torch.func.jvp(lambda *a: persample.group_norm(a[0], 2, a[1], a[2]), (x, w, b), tangents)
                    n = x.shape[0]
                    stock = torch.func.jvp(
                        lambda x, w, b: F.group_norm(
                            x.reshape(1, n * 4, -1), 2 * n, w.expand(n, 4).reshape(-1), b.expand(n, 4).reshape(-1)
                        ).view(x.shape),
                        (x, w, b),
                        tangents,
                    )
                    torch.testing.assert_close(ours[1], stock[1])

    def test_jacfwd_matches_stock(self):
        x, w, b = (t.detach() for t in inputs("shared"))
        for argnum in (0, 1):
            with self.subTest(argnum=argnum):
                ours = torch.func.jacfwd(lambda x, w: persample.group_norm(x, 2, w, b), argnum)(x, w)
                stock = torch.func.jacfwd(lambda x, w: F.group_norm(x, 2, w, b), argnum)(x, w)
                torch.testing.assert_close(ours, stock)

    def test_gradcheck_forward_ad(self):
        for kind in ("shared", "per_sample"):
            with self.subTest(weight=kind):
                fn = lambda x, w, b: persample.group_norm(x, 2, w, b)  # noqa: E731
                self.assertTrue(gradcheck(fn, inputs(kind), check_forward_ad=True))


if __name__ == "__main__":
    unittest.main()
