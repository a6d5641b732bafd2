"""persample.call_for_per_sample_grads: p.grad_sample for persample GroupNorm layers, eager."""

import copy
import unittest

import torch
import torch.nn.functional as F

import persample
from samples import per_example_model_grads


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

    def _check(self, loss_reduction, convert):
        stock = stock_model()
        model = persample.convert_group_norm(copy.deepcopy(stock)) if convert else stock
        out = persample.call_for_per_sample_grads(model, loss_reduction=loss_reduction)(self.x)
        F.cross_entropy(out, self.y, reduction=loss_reduction).backward()
        ref = per_example_model_grads(stock, self.x, self.y)
        params = dict(model.named_parameters())
        for name in gn_names(model):
            # grad_sample holds each example's own gradient, whatever the reduction.
            torch.testing.assert_close(params[name].grad_sample.double(), ref[name], rtol=1e-4, atol=1e-5)
            total = ref[name].sum(0) / (len(self.x) if loss_reduction == "mean" else 1)
            torch.testing.assert_close(params[name].grad.double(), total, rtol=1e-4, atol=1e-5)
        # Other layers' parameters get their usual gradients and no grad_sample.
        self.assertFalse(hasattr(params["0.weight"], "grad_sample"))
        torch.testing.assert_close(
            params["0.weight"].grad.double(),
            ref["0.weight"].sum(0) / (len(self.x) if loss_reduction == "mean" else 1),
            rtol=1e-4, atol=1e-5,
        )

    def test_sum(self):
        self._check("sum", convert=True)

    def test_mean(self):
        self._check("mean", convert=True)

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
        with self.assertRaisesRegex(ValueError, "no affine persample.nn.GroupNorm"):
            persample.call_for_per_sample_grads(stock_model())
        with self.assertRaisesRegex(ValueError, "loss_reduction"):
            persample.call_for_per_sample_grads(persample.convert_group_norm(stock_model()), loss_reduction="max")
        with self.assertRaisesRegex(ValueError, "batch_size"):
            persample.call_for_per_sample_grads(persample.convert_group_norm(stock_model()))()


if __name__ == "__main__":
    unittest.main()
