"""persample.call_for_per_sample_grads: p.grad_sample for persample GroupNorm layers, eager."""

import copy
import unittest

import torch
import torch.nn.functional as F

import persample
from error_model import assert_all_track_stock
from samples import per_example_model_grads
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads as expanded_weights


def stock_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.GroupNorm(3, 6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, padding=1),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )


def gn_names(model):
    return [f"{i}.{p}" for i, m in enumerate(model) if isinstance(m, torch.nn.GroupNorm) for p in ("weight", "bias")]


class TestCallForPerSampleGrads(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(5, 3, 5, 5, generator=g)
        self.y = torch.randint(0, 3, (5,), generator=g)

    def _grads(self, model, loss_reduction, call=None):
        """``{name: grad_sample}`` of the GroupNorm parameters where ``call`` wraps the
        model for them, and ``{name: grad}`` of all."""
        out = (call(model, loss_reduction=loss_reduction) if call else model)(self.x)
        F.cross_entropy(out, self.y, reduction=loss_reduction).backward()
        params = dict(model.named_parameters())
        samples = {k: params[k].grad_sample for k in gn_names(model)} if call else None
        return samples, {k: p.grad for k, p in params.items()}

    def _check(self, loss_reduction):
        stock = stock_model()
        model = persample.convert_group_norm(copy.deepcopy(stock))
        samples, grads = self._grads(model, loss_reduction, persample.call_for_per_sample_grads)
        # Other layers' parameters get their usual gradients and no grad_sample.
        self.assertFalse(hasattr(model[0].weight, "grad_sample"))
        # Stock's results in float32, whose own error is the scale: torch's
        # ExpandedWeights and a plain backward, on stock copies; the truth: a float64
        # loop. grad_sample holds each example's own gradient, whatever the reduction.
        stock_samples, _ = self._grads(stock_model(), loss_reduction, expanded_weights)
        _, stock_grads = self._grads(stock_model(), loss_reduction)
        ref = per_example_model_grads(stock, self.x, self.y)
        scale = len(self.x) if loss_reduction == "mean" else 1
        assert_all_track_stock(samples, stock_samples, {k: ref[k] for k in samples}, "grad_sample ")
        assert_all_track_stock(grads, stock_grads, {k: g.sum(0) / scale for k, g in ref.items()}, "grad ")

    def test_sum(self):
        self._check("sum")

    def test_mean(self):
        self._check("mean")

    def test_persample_layers_built_directly(self):
        model = stock_model()
        model[1] = persample.nn.GroupNorm(3, 6)
        model[4] = persample.nn.GroupNorm(2, 4)
        persample.call_for_per_sample_grads(model)(self.x).sum().backward()
        self.assertEqual(model[1].weight.grad_sample.shape, (5, 6))
        self.assertEqual(model[4].bias.grad_sample.shape, (5, 4))

    def test_layers_detached_after_the_call(self):
        model = persample.convert_group_norm(stock_model())
        out = persample.call_for_per_sample_grads(model)(self.x)
        self.assertIsNone(model[1]._weight_sample)
        out.sum().backward()  # backward after the call still fills grad_sample
        self.assertEqual(model[1].weight.grad_sample.shape, (5, 6))
        # A plain call afterwards neither needs nor touches grad_sample.
        model[1].weight.grad_sample = None
        model(self.x).sum().backward()
        self.assertIsNone(model[1].weight.grad_sample)

    def test_two_backwards_accumulate_and_next_call_resets(self):
        model = persample.convert_group_norm(stock_model())
        out = persample.call_for_per_sample_grads(model)(self.x)
        out.sum().backward(retain_graph=True)
        once = model[1].weight.grad_sample.clone()
        out.sum().backward()
        torch.testing.assert_close(model[1].weight.grad_sample, 2 * once)
        persample.call_for_per_sample_grads(model)(self.x[:2]).sum().backward()
        self.assertEqual(model[1].weight.grad_sample.shape, (2, 6))

    def test_explicit_batch_size(self):
        model = persample.convert_group_norm(stock_model())
        persample.call_for_per_sample_grads(model, batch_size=5)(self.x).sum().backward()
        self.assertEqual(model[1].weight.grad_sample.shape, (5, 6))

    def test_batch_second(self):
        class BatchSecond(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gn = persample.nn.GroupNorm(5, 5)

            def forward(self, x):  # [T, N, F] -> the layer sees [N, C=T, F]
                return self.gn(x.transpose(0, 1))

        model = BatchSecond()
        persample.call_for_per_sample_grads(model, batch_first=False)(torch.randn(5, 7, 4)).sum().backward()
        self.assertEqual(model.gn.weight.grad_sample.shape, (7, 5))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "no persample norm layer"):
            persample.call_for_per_sample_grads(stock_model())
        with self.assertRaisesRegex(ValueError, "loss_reduction"):
            persample.call_for_per_sample_grads(persample.convert_group_norm(stock_model()), loss_reduction="max")
        with self.assertRaisesRegex(ValueError, "batch_size"):
            persample.call_for_per_sample_grads(persample.convert_group_norm(stock_model()))()


if __name__ == "__main__":
    unittest.main()
