"""``persample.nn.GroupNorm`` as a drop-in for ``nn.GroupNorm``, and ``convert_group_norm``."""

import torch
from torch import nn
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from samples import reference


def randomized(module):
    """``module`` with random affine parameters, so that a lost parameter shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
        self.norm = nn.GroupNorm(4, 4, affine=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.body(x)).mean((2, 3)))


class TestGroupNormModule(TestCase):
    def test_same_state_dict_keys_and_repr(self):
        for kwargs in (dict(), dict(eps=1e-3), dict(affine=False)):
            with self.subTest(**kwargs):
                ours, stock = persample.nn.GroupNorm(2, 6, **kwargs), nn.GroupNorm(2, 6, **kwargs)
                self.assertEqual(list(ours.state_dict()), list(stock.state_dict()))
                self.assertEqual(ours.extra_repr(), stock.extra_repr())
                self.assertEqual(repr(ours), repr(stock))

    def test_loads_stock_state_dict_and_matches_stock(self):
        stock = randomized(nn.GroupNorm(3, 6, eps=1e-3))
        ours = persample.nn.GroupNorm(3, 6, eps=1e-3)
        ours.load_state_dict(stock.state_dict())
        for shape in ((4, 6), (4, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 2)):
            with self.subTest(shape=shape):
                x = torch.randn(shape, requires_grad=True)
                self.assertEqual(ours(x), stock(x))
                gx_ours, *g_ours = torch.autograd.grad(
                    ours(x).square().sum(), (x, *ours.parameters())
                )
                gx_stock, *g_stock = torch.autograd.grad(
                    stock(x).square().sum(), (x, *stock.parameters())
                )
                self.assertEqual(gx_ours, gx_stock)
                self.assertEqual(g_ours, g_stock, atol=1e-4, rtol=1e-5)

    def test_functional_call_gives_per_sample_grads(self):
        n = 4
        m = randomized(persample.nn.GroupNorm(3, 6))
        x = torch.randn(n, 6, 5, 5)
        grad_out = torch.randn_like(x)
        w = m.weight.detach().expand(n, -1).requires_grad_()
        b = m.bias.detach().expand(n, -1).requires_grad_()
        y = torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
        y.backward(grad_out)
        _, _, ref_w, ref_b = reference(x, 3, w, b, m.eps, grad_out)
        self.assertEqual(w.grad, ref_w, exact_dtype=False)
        self.assertEqual(b.grad, ref_b, exact_dtype=False)
        self.assertIsNone(m.weight.grad)


class TestConvertGroupNorm(TestCase):
    def test_nested_model(self):
        model = randomized(Net()).eval()
        originals = {name: p for name, p in model.named_parameters()}
        norm_state = model.body[1].state_dict()
        x = torch.randn(2, 3, 6, 6)
        expected = model(x)
        converted = persample.convert_group_norm(model)
        self.assertIs(converted, model)
        self.assertIs(type(model.body[1]), persample.nn.GroupNorm)
        self.assertIs(type(model.norm), persample.nn.GroupNorm)
        self.assertIsInstance(model.body[0], nn.Conv2d)
        self.assertEqual(model.body[1].state_dict(), norm_state)
        self.assertEqual(list(dict(model.named_parameters())), list(originals))
        for name, p in model.named_parameters():
            self.assertIs(p, originals[name], msg=name)
        self.assertFalse(any(m.training for m in model.modules()))
        self.assertEqual(model(x), expected)

    def test_bare_group_norm(self):
        for affine in (True, False):
            with self.subTest(affine=affine):
                stock = randomized(nn.GroupNorm(2, 4, eps=1e-4, affine=affine))
                ours = persample.convert_group_norm(stock)
                self.assertIs(type(ours), persample.nn.GroupNorm)
                self.assertEqual(repr(ours), repr(stock))
                self.assertEqual(ours.affine, affine)
                self.assertIs(ours.weight, stock.weight)
                self.assertIs(ours.bias, stock.bias)
                self.assertEqual(list(ours.state_dict()), list(stock.state_dict()))
                x = torch.randn(3, 4, 5)
                self.assertEqual(ours(x), stock(x))

    def test_optimizer_built_before_conversion_still_trains(self):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        persample.convert_group_norm(model)
        before = model.body[1].weight.detach().clone()
        # The instance-normalised head sees zero-mean features: train the body alone.
        model.body(torch.randn(2, 3, 6, 6)).square().sum().backward()
        opt.step()
        self.assertNotEqual(model.body[1].weight, before)


if __name__ == "__main__":
    run_tests()
