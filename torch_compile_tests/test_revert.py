"""persample.revert_group_norm, the inverse of persample.convert_group_norm: a model with
stock nn.GroupNorm layers, the same Parameters and state, and no persample op left."""

import torch
from torch.testing._internal.common_utils import TestCase, run_tests

import persample


def stock_model():
    """Nested GroupNorms: affine with the default eps, and non-affine with eps=1e-3."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.GroupNorm(2, 6),
        torch.nn.ReLU(),
        torch.nn.Sequential(
            torch.nn.Conv2d(6, 6, 1), torch.nn.GroupNorm(3, 6, eps=1e-3, affine=False)
        ),
    )
    with torch.no_grad():  # not 1 and 0, which would hide a weight/bias mix-up
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def group_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]


class TestRevert(TestCase):
    def test_round_trip_keeps_parameters_state_and_flags(self):
        model = stock_model()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        x = torch.randn(4, 3, 5, 5)
        expected = model(x)

        self.assertIs(persample.convert_group_norm(model), model)
        model[3][1].eval()  # one layer in eval mode: the flag must survive
        self.assertTrue(all(type(m) is persample.nn.GroupNorm for m in group_norms(model)))
        persample_out = model(x)

        self.assertIs(persample.revert_group_norm(model), model)  # in place
        layers = group_norms(model)
        self.assertEqual([type(m) for m in layers], [torch.nn.GroupNorm] * 2)
        self.assertFalse(any(type(m).__module__.startswith("persample") for m in model.modules()))
        self.assertEqual(
            [(m.num_groups, m.num_channels, m.eps, m.affine, m.training) for m in layers],
            [(2, 6, 1e-5, True, True), (3, 6, 1e-3, False, False)],
        )
        self.assertIsNone(layers[1].weight)
        # The same Parameter objects, in the same order, with the same state_dict keys.
        self.assertEqual([id(p) for p in model.parameters()], [id(p) for p in params])
        self.assertEqual(model.state_dict(), state)
        self.assertEqual(model(x), expected)
        self.assertEqual(model(x), persample_out)

    def test_single_layer_and_optimizer(self):
        layer = persample.nn.GroupNorm(2, 4)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        stock = persample.revert_group_norm(layer)
        self.assertIs(type(stock), torch.nn.GroupNorm)
        self.assertIs(stock.weight, layer.weight)
        self.assertIs(stock.bias, layer.bias)
        # An optimizer built before the call updates the reverted layer.
        stock(torch.randn(3, 4, 5)).square().sum().backward()
        before = stock.weight.detach().clone()
        optimizer.step()
        self.assertNotEqual(stock.weight, before)

    def test_leaves_other_modules_alone(self):
        model = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), persample.nn.GroupNorm(2, 4))
        first = model[0]
        persample.revert_group_norm(model)
        self.assertIs(model[0], first)
        self.assertIs(type(model[1]), torch.nn.GroupNorm)

    def test_reverted_model_exports_without_persample_ops(self):
        model = persample.convert_group_norm(stock_model()).eval()
        x = torch.randn(2, 3, 5, 5)
        ep = torch.export.export(model, (x,))
        self.assertIn("torch.ops.persample.group_norm.default", ep.graph_module.code)
        ep = torch.export.export(persample.revert_group_norm(model), (x,))
        self.assertNotIn("persample", ep.graph_module.code)
        self.assertEqual(ep.module()(x), model(x))


if __name__ == "__main__":
    run_tests()
