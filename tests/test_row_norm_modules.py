"""persample.nn.LayerNorm, RMSNorm and InstanceNorm1d/2d/3d as drop-ins for the stock
modules (issue 18): the same constructor, state_dict keys and repr, a stock state dict
loaded as is, outputs and gradients equal to stock's by the error model
(tests/error_model.py); the batch-first contract and running statistics refused with a
clear error. Then persample.call_for_per_sample_grads on a stock model converted with
persample.convert_norms: ``p.grad_sample`` equals a float64 per-example loop over the
stock model, and ``p.grad`` the usual batch gradient.

``NormNet`` and its references are shared with tests/test_opacus_norms.py and
tests/test_fsdp.py."""

import copy
import unittest
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import persample
from error_model import assert_all_track_stock, assert_tracks_stock, check_close

F64 = torch.float64


class NormNet(nn.Module):
    """Every persample norm but GroupNorm, stock: a conv, an InstanceNorm2d, the 4
    channels as tokens of 16 features through a LayerNorm, a two-dim LayerNorm without
    bias and an RMSNorm (eps None) over [N, 2, 2, 16], then a 3-class head. The gradient
    reaching the InstanceNorm is contiguous: stock ``F.instance_norm`` gets the weight
    gradient of a single example wrong when the output gradient is channels_last (CPU,
    torch 2.13 and 2.14.1), which would spoil the per-example reference."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(16)
        self.ln2 = nn.LayerNorm((2, 16), bias=False)
        self.rms = nn.RMSNorm(16)
        self.head = nn.Linear(64, 3)

    def forward(self, x):  # x: [N, 3, 4, 4]
        h = self.inorm(self.conv(x)).flatten(2)  # [N, 4, 16]
        h = self.ln2(self.ln(h).view(-1, 2, 2, 16)).relu()
        return self.head(self.rms(h).flatten(1))


NORM_LAYERS = ("inorm", "ln", "ln2", "rms")


def make_norm_net():
    """A NormNet with non-trivial norm parameters (not a fresh norm's ones and zeros)."""
    torch.manual_seed(0)
    net = NormNet()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.split(".")[0] in NORM_LAYERS:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return net


def norm_batch(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def per_example_grads(model, x, y, dtype=F64, names=None):
    """``{name: Tensor[N, *shape]}``: each example's own cross-entropy gradient, by a loop
    over single examples on a copy of the stock ``model`` in ``dtype`` (float32: stock's
    own per-sample result, the error model's scale); ``names`` default to all."""
    ref = copy.deepcopy(model).to(dtype)
    params = {k: p for k, p in ref.named_parameters() if names is None or k in names}
    out = {k: [] for k in params}
    for xi, yi in zip(x.to(dtype), y):
        ref.zero_grad()
        F.cross_entropy(ref(xi[None]), yi[None]).backward()
        for k, p in params.items():
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def norm_param_names(model):
    return [k for k, _ in model.named_parameters() if k.split(".")[0] in NORM_LAYERS]


def randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


def grads(y, inputs, grad_out):
    return torch.autograd.grad(y, inputs, grad_out)


class DropInCase(unittest.TestCase):
    def assert_same_module(self, ours, stock):
        self.assertEqual(repr(ours), repr(stock))
        self.assertEqual(list(ours.state_dict()), list(stock.state_dict()))
        for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
            self.assertEqual((p.shape, p.dtype, p.device), (q.shape, q.dtype, q.device), name)
            if p.device.type != "meta":
                torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    def check_matches_stock(self, ours, stock, shape, what):
        """Output and gradients (input, parameters) of ``ours`` loaded from the randomized
        float32 ``stock``, against stock in float64, within the error model."""
        ours.load_state_dict(stock.state_dict())
        gen = torch.Generator().manual_seed(len(shape))
        x = (torch.randn(shape, generator=gen) * 3 + 2).requires_grad_()
        grad_out = torch.randn(shape, generator=gen)
        ref = copy.deepcopy(stock).double()
        x64 = x.detach().double().requires_grad_()
        results = []
        for module, xi in ((ours, x), (stock, x), (ref, x64)):
            y = module(xi)
            results.append((y, *grads(y, (xi, *module.parameters()), grad_out.to(xi.dtype))))
        names = ["output", "grad_input"] + [f"grad_{k}" for k, _ in stock.named_parameters()]
        for name, got, stock_got, want in zip(names, *results):
            check_close(got, want.detach(), stock_got, f"{what} {name}")


LAYER_NORM_ARGS = (
    (4, {}),
    ((3, 4), {}),
    ([3, 4], {"eps": 1e-3}),
    (4, {"elementwise_affine": False}),
    ((3, 4), {"bias": False}),
)
RMS_NORM_ARGS = (
    (4, {}),
    ((3, 4), {"eps": 1e-3}),
    ([3, 4], {"eps": None}),
    (4, {"elementwise_affine": False}),
)
ROW_CASES = ((persample.nn.LayerNorm, nn.LayerNorm, LAYER_NORM_ARGS), (persample.nn.RMSNorm, nn.RMSNorm, RMS_NORM_ARGS))


class TestRowNormModules(DropInCase):
    def test_constructor_state_dict_and_repr(self):
        for ours_cls, stock_cls, cases in ROW_CASES:
            for shape, kw in cases + ((4, {"dtype": F64}), ((3, 4), {"device": "meta"})):
                with self.subTest(cls=ours_cls.__name__, shape=shape, **kw):
                    ours, stock = ours_cls(shape, **kw), stock_cls(shape, **kw)
                    self.assertEqual((ours.normalized_shape, ours.eps), (stock.normalized_shape, stock.eps))
                    self.assert_same_module(ours, stock)

    def test_loads_stock_state_dict_and_matches_stock(self):
        for ours_cls, stock_cls, cases in ROW_CASES:
            for shape, kw in cases:
                ns = (shape,) if isinstance(shape, int) else tuple(shape)
                for lead in ((5,), (2, 3)):  # one row per sample, or several
                    with self.subTest(cls=ours_cls.__name__, shape=shape, lead=lead, **kw):
                        stock = randomized(stock_cls(shape, **kw))
                        self.check_matches_stock(ours_cls(shape, **kw), stock, (*lead, *ns), ours_cls.__name__)

    def test_batch_first_contract(self):
        """Dim 0 is the sample dim: an input with no dim outside normalized_shape (which
        stock accepts) is refused, naming the contract."""
        for ours_cls, stock_cls, _ in ROW_CASES:
            for shape, x in ((4, torch.randn(4)), ((3, 4), torch.randn(3, 4))):
                with self.subTest(cls=ours_cls.__name__, shape=shape):
                    stock_cls(shape)(x)  # stock normalises the one row
                    with self.assertRaisesRegex(RuntimeError, r"\[N, \*, \*normalized_shape\] with a sample dim 0"):
                        ours_cls(shape)(x)
            with self.assertRaisesRegex(RuntimeError, r"does not end with normalized_shape=\[3, 4\]"):
                ours_cls((3, 4))(torch.randn(2, 3, 5))


INSTANCE_NORMS = (
    (persample.nn.InstanceNorm1d, nn.InstanceNorm1d, (7,)),
    (persample.nn.InstanceNorm2d, nn.InstanceNorm2d, (3, 4)),
    (persample.nn.InstanceNorm3d, nn.InstanceNorm3d, (2, 3, 2)),
)


class TestInstanceNormModules(DropInCase):
    def test_constructor_state_dict_and_repr(self):
        for ours_cls, stock_cls, _ in INSTANCE_NORMS:
            for kw in ({}, {"affine": True}, {"affine": True, "eps": 1e-3, "dtype": F64}):
                with self.subTest(cls=ours_cls.__name__, **kw):
                    self.assert_same_module(ours_cls(3, **kw), stock_cls(3, **kw))

    def test_matches_stock(self):
        """Batched and unbatched input, with and without affine parameters."""
        for ours_cls, stock_cls, spatial in INSTANCE_NORMS:
            for affine in (True, False):
                for shape in ((4, 3, *spatial), (3, *spatial)):
                    with self.subTest(cls=ours_cls.__name__, affine=affine, shape=shape):
                        stock = randomized(stock_cls(3, affine=affine))
                        self.check_matches_stock(ours_cls(3, affine=affine), stock, shape, ours_cls.__name__)

    def test_running_statistics_refused(self):
        for ours_cls, _, _ in INSTANCE_NORMS:
            with self.subTest(cls=ours_cls.__name__):
                with self.assertRaisesRegex(ValueError, f"{ours_cls.__name__}: track_running_stats=True is not supported"):
                    ours_cls(3, affine=True, track_running_stats=True)

    def test_channel_mismatch_as_stock(self):
        """Stock's checks: a ValueError for an affine layer, a warning (and the norm of
        the input's channels) without affine parameters."""
        x = torch.randn(2, 4, 5)
        for affine in (True, False):
            results = []
            for cls in (persample.nn.InstanceNorm1d, nn.InstanceNorm1d):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        results.append(cls(3, affine=affine)(x))
                    except ValueError as e:
                        results.append(str(e))
                results.append([str(w.message) for w in caught])
            with self.subTest(affine=affine):
                if affine:
                    self.assertEqual(results[0], results[2])
                    self.assertIn("match num_features", results[0])
                else:
                    torch.testing.assert_close(results[0], results[2])
                    self.assertEqual(results[1], results[3])
                    self.assertTrue(results[1])


class TestCallForPerSampleGrads(unittest.TestCase):
    """call_for_per_sample_grads on NormNet converted with persample.convert_norms."""

    @classmethod
    def setUpClass(cls):
        cls.stock = make_norm_net()
        cls.x, cls.y = norm_batch()
        names = norm_param_names(cls.stock)
        cls.want = per_example_grads(cls.stock, cls.x, cls.y, names=names)
        cls.stock_rows = per_example_grads(cls.stock, cls.x, cls.y, torch.float32, names=names)

    def test_converted(self):
        model = persample.convert_norms(copy.deepcopy(self.stock))
        for name, cls in (("inorm", persample.nn.InstanceNorm2d), ("ln", persample.nn.LayerNorm),
                          ("ln2", persample.nn.LayerNorm), ("rms", persample.nn.RMSNorm)):
            self.assertIs(type(getattr(model, name)), cls)

    def test_grad_sample_and_grad(self):
        n = len(self.x)
        for reduction in ("sum", "mean"):
            with self.subTest(loss_reduction=reduction):
                model = persample.convert_norms(copy.deepcopy(self.stock))
                out = persample.call_for_per_sample_grads(model, loss_reduction=reduction)(self.x)
                F.cross_entropy(out, self.y, reduction=reduction).backward()
                got = {k: p.grad_sample for k, p in model.named_parameters() if k in self.want}
                # grad_sample holds each example's own gradient, whatever the reduction.
                assert_all_track_stock(got, self.stock_rows, self.want, f"{reduction}: grad_sample of ")
                for k, p in model.named_parameters():
                    self.assertFalse(k not in self.want and hasattr(p, "grad_sample"), k)
                # p.grad is the batch gradient, for every parameter.
                stock = copy.deepcopy(self.stock)
                F.cross_entropy(stock(self.x), self.y, reduction=reduction).backward()
                ref = copy.deepcopy(self.stock).double()
                F.cross_entropy(ref(self.x.double()), self.y, reduction=reduction).backward()
                scale = n if reduction == "mean" else 1
                for (k, p), q, r in zip(model.named_parameters(), stock.parameters(), ref.parameters()):
                    if k in self.want:  # the batch sum of the per-example truth
                        torch.testing.assert_close(r.grad, self.want[k].sum(0) / scale)
                    assert_tracks_stock(p.grad, q.grad, r.grad, f"{reduction}: grad of {k}")


if __name__ == "__main__":
    unittest.main()
