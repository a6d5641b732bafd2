"""persample.call_for_per_sample_grads around a torch.compile(fullgraph=True) model:
p.grad_sample and p.grad, varying batch sizes, no recompiles past the dynamic one."""

import copy
import unittest

import torch
import torch._dynamo.testing
import torch.nn.functional as F

import persample
from tests.error_model import assert_tracks_stock

from .models import SmallNet, batch, make_models, per_example_grads

SIZES = (4, 6, 9, 13)


class TestGradSampleCompiled(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        torch.manual_seed(0)

    def _train_steps(self, model, stock, loss_reduction):
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        frames = []
        for n in SIZES:
            x, y = batch(n)
            model.zero_grad()
            logits = persample.call_for_per_sample_grads(compiled, loss_reduction=loss_reduction)(x)
            F.cross_entropy(logits, y, reduction=loss_reduction).backward()
            # Stock's float32 loop over examples, whose error against float64's is the scale.
            stock_rows = per_example_grads(stock, x, y)
            ref = per_example_grads(copy.deepcopy(stock).double(), x.double(), y)
            scale = n if loss_reduction == "mean" else 1
            for name in ("weight", "bias"):
                param, key = getattr(model.gn, name), f"gn.{name}"
                assert_tracks_stock(param.grad_sample, stock_rows[key], ref[key], f"{key}.grad_sample")
                assert_tracks_stock(param.grad, stock_rows[key].sum(0) / scale, ref[key].sum(0) / scale, key)
            self.assertFalse(hasattr(model.conv.weight, "grad_sample"))
            frames.append(counter.frame_count)
        # One static graph, one dynamic recompile, then reuse: never a graph per batch.
        self.assertEqual(frames, [1, 2, 2, 2])

    def test_sum(self):
        self._train_steps(*make_models(), "sum")

    def test_mean(self):
        self._train_steps(*make_models(), "mean")

    def test_converted_stock_model(self):
        _, stock = make_models()
        model = persample.convert_group_norm(copy.deepcopy(stock))
        self.assertIsInstance(model.gn, persample.nn.GroupNorm)
        self._train_steps(model, stock, "mean")

    def test_plain_calls_after_per_sample_calls(self):
        model = SmallNet()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        x, _ = batch(4)
        with_samples = persample.call_for_per_sample_grads(compiled)(x)
        plain = compiled(x)  # no leaves attached: the layer takes its shared parameters
        torch.testing.assert_close(with_samples, plain)


if __name__ == "__main__":
    unittest.main()
