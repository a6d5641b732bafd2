"""torch.func under torch.compile with persample.group_norm called directly."""

import unittest

import torch
import torch.utils._python_dispatch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from tests.error_model import check_close
from torch_compile_tests.models import per_sample_loss, stock_loop


class TestTorchFuncCompiled(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(0)
        self.weight, self.bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
        self.x, self.target = torch.randn(5, 6, 4, 4, generator=g), torch.randn(5, 6, 4, 4, generator=g)

    def _check(self, x, backend):
        fn = torch.func.vmap(torch.func.grad(per_sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
        eager = fn(self.weight, self.bias, x, self.target)
        compiled = torch.compile(fn, fullgraph=True, backend=backend)(self.weight, self.bias, x, self.target)
        ref = stock_loop(self.weight, self.bias, x, self.target)
        stock = stock_loop(self.weight, self.bias, x, self.target, torch.float32)
        for name, got_e, got_c, want, stock_got in zip(("weight", "bias"), eager, compiled, ref, stock):
            check_close(got_e, want, stock_got, f"eager grad_{name}")
            check_close(got_c, want, stock_got, f"compiled grad_{name}")

    def test_inductor_matches_per_example_loop(self):
        self._check(self.x, "inductor")

    def test_lowers_to_aten_under_compiled_transforms(self):
        # Inductor fuses ATen's GroupNorm into the per-sample computation; the op would
        # be an opaque call in the middle of it.
        for x in (self.x, self.x.contiguous(memory_format=torch.channels_last)):
            with self.subTest(channels_last=not x.is_contiguous()):
                torch._dynamo.reset()
                backend = AotEagerAndRecordGraphs()
                self._check(x, backend)
                code = backend.graphs[0].code
                self.assertNotIn("persample", code)
                self.assertIn("group_norm", code)

    def test_eager_transform_runs_the_op(self):
        calls = []

        class Count(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append(str(func))
                return func(*args, **(kwargs or {}))

        fn = torch.func.vmap(torch.func.grad(per_sample_loss), in_dims=(None, None, 0, 0))
        with Count():
            fn(self.weight, self.bias, self.x, self.target)
        self.assertIn("persample.group_norm.default", calls)
        self.assertIn("persample.group_norm_backward.default", calls)


if __name__ == "__main__":
    unittest.main()
