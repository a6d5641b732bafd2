"""persample.opacus: Opacus grad samplers through persample::group_norm_backward."""

import importlib.util
import unittest
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from error_model import assert_all_track_stock
from samples import per_example_model_grads

import persample
from persample.ops.group_norm import eager


HAS_OPACUS = importlib.util.find_spec("opacus") is not None


def stock_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.GroupNorm(2, 8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 3),
    )


@unittest.skipUnless(HAS_OPACUS, "opacus is not installed (pip install 'persample[opacus]')")
class TestOpacus(unittest.TestCase):
    def setUp(self):
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and hooks
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(6, 3, 6, 6, generator=g)
        self.y = torch.randint(0, 3, (6,), generator=g)

    def _grad_samples(self, model, loss_reduction="mean"):
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction=loss_reduction)
        F.cross_entropy(gsm(self.x), self.y, reduction=loss_reduction).backward()
        return {k.removeprefix("_module."): p.grad_sample for k, p in gsm.named_parameters()}

    def _check(self, got, reduction="mean", names=None):
        """``got``'s grad samples (of ``names``, default all) against Opacus's own
        samplers on the stock model in float32, whose error against the float64 loop
        is the scale."""
        stock = self._grad_samples(stock_model(), reduction)
        ref = per_example_model_grads(stock_model(), self.x, self.y)
        names = names or list(ref)
        assert_all_track_stock(*({k: d[k] for k in names} for d in (got, stock, ref)), f"{reduction}: ")

    def test_hooks_mode_matches_per_example_loop(self):
        import persample.opacus  # noqa: F401

        for reduction in ("mean", "sum"):
            self._check(self._grad_samples(persample.convert_group_norm(stock_model()), reduction), reduction)

    def test_uses_forward_statistics_without_recomputing(self):
        import persample.opacus  # noqa: F401

        model = persample.convert_group_norm(stock_model())
        with mock.patch("torch.var_mean", side_effect=AssertionError("recomputed statistics")), \
             mock.patch("torch.nn.functional.group_norm", side_effect=AssertionError("recomputed norm")):
            got = self._grad_samples(model)
        self.assertEqual(got["1.weight"].shape, (6, 8))
        self.assertEqual(model[1]._saved_stats, [])  # claimed by the sampler

    @unittest.skipUnless(eager.LIBRARY, "needs the C++ library")
    def test_hooks_mode_keeps_the_fast_path(self):
        # The layer's forward under Opacus's hooks takes the C++ op that also returns the
        # statistics, rather than the public op's Python path.
        import persample.opacus  # noqa: F401

        calls, real = [], eager._stats_op

        def spy(*args):
            calls.append(args[0].shape)
            return real(*args)

        with mock.patch.object(eager, "_stats_op", spy):
            got = self._grad_samples(persample.convert_group_norm(stock_model()))
        self.assertEqual(calls, [(6, 8, 4, 4)])
        self._check(got, names=["1.weight"])

    def test_opt_in_for_torch_group_norm(self):
        from opacus.grad_sample import GradSampleModule

        import persample.opacus

        stock_sampler = GradSampleModule.GRAD_SAMPLERS[torch.nn.GroupNorm]
        try:
            persample.opacus.register_for_torch_group_norm()
            self.assertIs(GradSampleModule.GRAD_SAMPLERS[torch.nn.GroupNorm],
                          persample.opacus.compute_group_norm_grad_sample)
            got = self._grad_samples(stock_model())
        finally:
            persample.opacus.register_grad_sampler(torch.nn.GroupNorm)(stock_sampler)
        self._check(got, names=["1.weight", "1.bias"])

    def test_module_validator_accepts(self):
        from opacus.validators import ModuleValidator

        import persample.opacus  # noqa: F401

        model = persample.convert_group_norm(stock_model())
        self.assertEqual(ModuleValidator.validate(model, strict=False), [])
        ModuleValidator.validate(model, strict=True)

    def test_privacy_engine_trains_and_reports_epsilon(self):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        import persample.opacus  # noqa: F401

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(64, 3, 6, 6), torch.randint(0, 3, (64,)))
        model = persample.convert_group_norm(stock_model())
        before = model[1].weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=16),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        eps = engine.get_epsilon(1e-5)
        self.assertTrue(0 < eps < float("inf"))
        self.assertFalse(torch.equal(model._module[1].weight.detach(), before))


if __name__ == "__main__":
    unittest.main()
