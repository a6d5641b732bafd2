"""Eager calls go straight to the backend kernel only when the dispatcher would pick it
too: a dispatch mode (profilers, FlopCounterMode, tracers) still sees both ops."""

import unittest

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import persample


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class TestDispatch(unittest.TestCase):
    def _step(self):
        torch.manual_seed(0)
        x = torch.randn(4, 6, 3, 3, requires_grad=True)
        w = torch.rand(4, 6, requires_grad=True)
        y = persample.group_norm(x, 3, w)
        y.backward(torch.randn_like(y))
        return y.detach(), x.grad, w.grad

    def test_modes_see_both_ops_and_results_agree(self):
        plain = self._step()
        with RecordOps() as mode:
            recorded = self._step()
        self.assertIn("persample.group_norm.default", mode.ops)
        self.assertIn("persample.group_norm_backward.default", mode.ops)
        for a, b in zip(plain, recorded):
            torch.testing.assert_close(a, b)

    def test_backward_under_a_mode_after_a_plain_forward(self):
        x = torch.randn(4, 6, 3, 3, requires_grad=True)
        y = persample.group_norm(x, 3)
        with RecordOps() as mode:
            y.backward(torch.randn_like(y))
        self.assertIn("persample.group_norm_backward.default", mode.ops)

    def test_no_grad_call_under_a_mode(self):
        with torch.no_grad(), RecordOps() as mode:
            persample.group_norm(torch.randn(2, 4, 5), 2)
        self.assertEqual(mode.ops.count("persample.group_norm.default"), 1)


if __name__ == "__main__":
    unittest.main()
