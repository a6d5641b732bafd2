"""persample.convert_norms on every kind of norm of the family (issue 18): stock
LayerNorm, RMSNorm, GroupNorm and InstanceNorm modules, subclasses with their own
forward, and modules calling F.layer_norm / F.rms_norm / F.instance_norm directly.
Every norm reaches persample; outputs are unchanged; per-sample gradients from
call_for_per_sample_grads (eager and compiled) and Opacus equal a float64 per-example
loop as closely as stock PyTorch's own; export works; revert restores; what cannot be
converted (running statistics) is named."""

import copy
import importlib.util
import unittest
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import persample
from error_model import assert_all_track_stock, assert_tracks_stock


class ScaledLayerNorm(nn.LayerNorm):
    """A subclass with its own forward (as model libraries write them)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * 2


class FunctionalRMS(nn.Module):
    """A module that calls F.rms_norm with its own parameter (Llama-style)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.scale, 1e-6)


class Block(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.rms = nn.RMSNorm(dim)
        self.sub = ScaledLayerNorm(dim, bias=False)
        self.fn = FunctionalRMS(dim)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * dim, 3)

    def forward(self, x):  # x: [N, 4, dim]
        h = self.fn(self.sub(self.rms(self.ln(self.proj(x)).relu())))
        h = self.gn(self.inorm(self.conv(h)))
        return self.head(h.flatten(1))


NORMS = ("ln", "rms", "sub", "fn", "inorm", "gn")


def norm_params(model):
    return {k: p for k, p in model.named_parameters() if k.split(".")[0] in NORMS}


def make_block():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():  # non-trivial affine parameters
        for k, p in norm_params(model).items():
            p.copy_(torch.rand_like(p) + 0.5 if "bias" not in k else torch.randn_like(p))
    return model


def batch(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 6, generator=g) * 3 + 1, torch.randint(0, 3, (n,), generator=g)


def per_example(model, x, y, dtype=torch.float64):
    """``{name: Tensor[N, *shape]}``: each example's own loss gradient, by a loop."""
    ref = copy.deepcopy(model).to(dtype)
    out = {k: [] for k in norm_params(ref)}
    for xi, yi in zip(x.to(dtype), y):
        ref.zero_grad()
        F.cross_entropy(ref(xi[None]), yi[None], reduction="sum").backward()
        for k, p in norm_params(ref).items():
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def count_ops(model, *args):
    """``{op name: calls}`` of the persample ops and ATen's norms, by a dispatch mode."""
    counts = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("persample::") or "norm" in name:
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(*args)
    return counts


class TestConvertNorms(unittest.TestCase):
    def setUp(self):
        self.stock = make_block()
        self.model = persample.convert_norms(copy.deepcopy(self.stock))
        self.x, self.y = batch()

    def test_every_norm_runs_through_persample(self):
        counts = count_ops(self.model, self.x)
        self.assertEqual(
            {k: v for k, v in counts.items() if k.startswith("persample::")},
            {"persample::layer_norm": 2, "persample::rms_norm": 2, "persample::group_norm": 2},
        )
        self.assertFalse([k for k in counts if k.startswith("aten::")], counts)
        self.assertEqual(persample.unrouted_norms(self.model, self.x), [])
        # The stock model makes ATen calls only, and the audit names every one.
        self.assertEqual(sorted(persample.unrouted_norms(self.stock, self.x, warn=False)), sorted(NORMS))

    def test_output_unchanged(self):
        with torch.no_grad():
            got, want = self.model(self.x), self.stock(self.x)
            ref = copy.deepcopy(self.stock).double()(self.x.double())
        assert_tracks_stock(got, want, ref, "output")

    def test_classes_state_and_revert(self):
        self.assertIsInstance(self.model.ln, persample.nn.LayerNorm)
        self.assertIsInstance(self.model.rms, persample.nn.RMSNorm)
        self.assertIsInstance(self.model.inorm, persample.nn.InstanceNorm1d)
        self.assertIsInstance(self.model.gn, persample.nn.GroupNorm)
        self.assertIsInstance(self.model.sub, ScaledLayerNorm)  # routed in place
        self.assertEqual(list(self.model.state_dict()), list(self.stock.state_dict()))
        self.assertIs(self.model.ln.weight, dict(self.model.named_parameters())["ln.weight"])
        self.assertEqual(repr(self.model), repr(self.stock))
        reverted = persample.revert_norms(self.model)
        for (name, got), want in zip(reverted.named_modules(), self.stock.modules()):
            self.assertIs(type(got), type(want), name)
        self.assertEqual(count_ops(reverted, self.x).get("persample::layer_norm", 0), 0)

    def test_convert_group_norm_leaves_other_norms(self):
        model = persample.convert_group_norm(copy.deepcopy(self.stock))
        self.assertIs(type(model.ln), nn.LayerNorm)
        self.assertIs(type(model.sub), ScaledLayerNorm)
        self.assertIsInstance(model.gn, persample.nn.GroupNorm)
        self.assertEqual(sorted(persample.unrouted_norms(model, self.x, warn=False)), ["fn", "inorm", "ln", "rms", "sub"])

    def _check(self, got, what):
        want = per_example(self.stock, self.x, self.y)
        stock = per_example(self.stock, self.x, self.y, torch.float32)
        assert_all_track_stock(got, stock, want, what)

    def test_call_for_per_sample_grads(self):
        out = persample.call_for_per_sample_grads(self.model)(self.x)
        F.cross_entropy(out, self.y, reduction="sum").backward()
        self._check({k: p.grad_sample for k, p in norm_params(self.model).items()}, "eager ")

    def test_call_for_per_sample_grads_compiled(self):
        compiled = torch.compile(self.model, fullgraph=True, backend="aot_eager")
        out = persample.call_for_per_sample_grads(compiled)(self.x)
        F.cross_entropy(out, self.y, reduction="sum").backward()
        self._check({k: p.grad_sample for k, p in norm_params(self.model).items()}, "compiled ")

    def test_torch_func(self):
        params = {k: p.detach() for k, p in self.model.named_parameters()}

        def loss(p, x, y):
            return F.cross_entropy(torch.func.functional_call(self.model, p, (x[None],)), y[None], reduction="sum")

        grads = torch.func.vmap(torch.func.grad(loss), (None, 0, 0))(params, self.x, self.y)
        self._check({k: grads[k] for k in norm_params(self.model)}, "vmap(grad) ")

    def test_export(self):
        ep = torch.export.export(self.model, (self.x,))
        code = ep.graph_module.code
        for op in ("persample.layer_norm", "persample.rms_norm", "persample.group_norm"):
            self.assertIn(op, code)
        torch.testing.assert_close(ep.module()(self.x), self.model(self.x))

    @unittest.skipUnless(importlib.util.find_spec("opacus"), "opacus is not installed")
    def test_opacus_hooks(self):
        import persample.opacus  # noqa: F401  (registers the samplers)
        from opacus import GradSampleModule

        # Opacus has no sampler for a routed class it does not know: it differentiates
        # those by torch.func (its fallback), the others by persample's samplers.
        gsm = GradSampleModule(self.model, loss_reduction="sum", force_functorch=False)
        F.cross_entropy(gsm(self.x), self.y, reduction="sum").backward()
        self._check({k: p.grad_sample for k, p in norm_params(self.model).items()}, "opacus ")
        gsm._close()

    def test_running_statistics_named(self):
        model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = persample.convert_norms(model)
        self.assertIs(type(converted[1]), nn.InstanceNorm1d)
        self.assertTrue(any("'1'" in str(w.message) and "running" in str(w.message) for w in caught))
        self.assertEqual(persample.unrouted_norms(converted, self.x, warn=False), ["1"])

    def test_unknown_kind(self):
        with self.assertRaisesRegex(ValueError, "unknown kinds"):
            persample.convert_norms(self.stock, kinds=("batch_norm",))


if __name__ == "__main__":
    unittest.main()
