"""persample.opacus for the whole norm family (issue 18): the samplers registered for
persample.nn.LayerNorm, RMSNorm, InstanceNorm*d and GroupNorm, where Opacus's hooks
mode, ghost clipping and FSDP2 wrapper look them up; per-sample gradients (hooks mode)
and per-sample gradient norms (ghost clipping, directly and through PrivacyEngine)
against a float64 per-example loop over the stock model, with a spy showing that
persample's sampler, not Opacus's own nor its torch.func fallback, ran on each layer;
``register_for_torch_norms`` for stock layers; and the LayerNorm/RMSNorm samplers'
reuse of the statistics their layer's forward stashed (persample/nn.py)."""

import contextlib
import copy
import importlib.util
import unittest
import warnings
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import persample
from error_model import assert_all_track_stock, assert_tracks_stock
from test_row_norm_modules import NORM_LAYERS, make_norm_net, norm_batch, per_example_grads

HAS_OPACUS = importlib.util.find_spec("opacus") is not None
ROW_LAYERS = ("ln", "ln2", "rms")


def sample_norms(grads):
    """``Tensor[N]``: each example's gradient norm over all the parameters in ``grads``."""
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)


@contextlib.contextmanager
def spy_on_samplers(classes, names):
    """Yields the list of layer names (``names``: {layer: name}) on which the sampler
    registered for one of ``classes`` ran; the registry is restored on exit."""
    from opacus.grad_sample import GradSampleModule

    samplers, ran = GradSampleModule.GRAD_SAMPLERS, []
    saved = {cls: samplers[cls] for cls in classes}

    def spy(registered):
        def run(layer, activations, backprops):
            ran.append(names[layer])
            return registered(layer, activations, backprops)

        return run

    samplers.update({cls: spy(f) for cls, f in saved.items()})
    try:
        yield ran
    finally:
        samplers.update(saved)


@unittest.skipUnless(HAS_OPACUS, "opacus is not installed (pip install 'persample[opacus]')")
class TestOpacusNorms(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import persample.opacus  # noqa: F401  (registers the samplers)

        cls.stock = make_norm_net()
        cls.x, cls.y = norm_batch()
        cls.want = per_example_grads(cls.stock, cls.x, cls.y)
        cls.stock_rows = per_example_grads(cls.stock, cls.x, cls.y, torch.float32)

    def setUp(self):
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and hooks

    def _converted(self):
        return persample.convert_norms(copy.deepcopy(self.stock))

    def _persample_classes(self):
        return (persample.nn.LayerNorm, persample.nn.RMSNorm, persample.nn.InstanceNorm2d)

    def _run(self, gsm, model, reduction="sum"):
        """Forward and backward through ``gsm`` under the spies; which layers they saw."""
        names = {m: k for k, m in model.named_modules()}
        with spy_on_samplers(self._persample_classes(), names) as ran:
            F.cross_entropy(gsm(self.x), self.y, reduction=reduction).backward()
        # Opacus prepares the layers its torch.func fallback differentiates.
        self.assertFalse([k for k, m in model.named_modules() if hasattr(m, "ft_compute_sample_grad")])
        return sorted(ran)

    def test_registered_where_opacus_looks(self):
        """Hooks mode, ghost clipping and FSDP2Wrapper (which makes each class of
        GRAD_SAMPLERS or NORM_SAMPLERS of the FSDP ghost-clipping module its own
        fully_shard unit) look samplers up by exact type, in these registries."""
        import persample.opacus as po
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
            GradSampleModuleFastGradientClippingFSDP as FSDP,
        )

        expected = {
            persample.nn.GroupNorm: po.compute_group_norm_grad_sample,
            persample.nn.InstanceNorm1d: po.compute_group_norm_grad_sample,
            persample.nn.InstanceNorm2d: po.compute_group_norm_grad_sample,
            persample.nn.InstanceNorm3d: po.compute_group_norm_grad_sample,
            persample.nn.LayerNorm: po.compute_layer_norm_grad_sample,
            persample.nn.RMSNorm: po.compute_rms_norm_grad_sample,
        }
        wrapped = {**FSDP.GRAD_SAMPLERS, **FSDP.NORM_SAMPLERS}
        for cls, sampler in expected.items():
            for registry in (GradSampleModule.GRAD_SAMPLERS, GradSampleModuleFastGradientClipping.GRAD_SAMPLERS,
                             FSDP.GRAD_SAMPLERS, wrapped):
                self.assertIs(registry.get(cls), sampler, cls.__name__)

    def test_hooks_mode(self):
        for reduction in ("sum", "mean"):
            with self.subTest(loss_reduction=reduction):
                from opacus import GradSampleModule

                model = self._converted()
                gsm = GradSampleModule(model, loss_reduction=reduction)
                self.assertEqual(self._run(gsm, model, reduction), sorted(NORM_LAYERS))
                got = {k: p.grad_sample for k, p in model.named_parameters()}
                gsm._close()
                assert_all_track_stock(got, self.stock_rows, self.want, f"{reduction}: ")

    def test_ghost_clipping(self):
        """Per-sample gradient norms of the whole model (ghost norms for conv and head,
        persample's per-sample gradients for the norms)."""
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        model = self._converted()
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0,
                                                   use_ghost_clipping=True)
        self.assertEqual(self._run(gsm, model), sorted(NORM_LAYERS))
        assert_tracks_stock(gsm.get_norm_sample(), sample_norms(self.stock_rows), sample_norms(self.want),
                            "ghost per-sample norms")

    def test_privacy_engine_ghost(self):
        """PrivacyEngine's ghost mode end to end: the per-sample norms, and the clipped
        gradient sum that its second backward pass leaves (no noise), against the same
        clipping of the float64 per-example gradients."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        model, clip = self._converted(), 1.0
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, criterion, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x)),
            noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="ghost", poisson_sampling=False,
        )
        names = {m: k for k, m in model._module.named_modules()}
        with spy_on_samplers(self._persample_classes(), names) as ran:
            criterion(model(self.x), self.y).backward()
        self.assertEqual(sorted(ran), sorted(NORM_LAYERS))
        want, stock_norms = sample_norms(self.want), sample_norms(self.stock_rows)
        assert_tracks_stock(model.per_sample_gradient_norms, stock_norms, want, "per-sample norms")
        coef = (clip / (want + 1e-6)).clamp(max=1.0)
        stock_coef = (clip / (stock_norms + 1e-6)).clamp(max=1.0)
        self.assertLess(coef.min().item(), 1.0)  # some examples are clipped
        for k, p in model._module.named_parameters():
            ref, stock = (torch.einsum("n,n...->...", c.to(g.dtype), g) for c, g in
                          ((coef, self.want[k]), (stock_coef, self.stock_rows[k])))
            assert_tracks_stock(p.grad, stock, ref, f"clipped grad of {k}")

    def test_register_for_torch_norms(self):
        """Stock layers, after the opt-in, through persample's samplers (which recompute
        the statistics: a stock forward keeps none)."""
        import persample.opacus as po
        from opacus import GradSampleModule

        stock_classes = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
        samplers = GradSampleModule.GRAD_SAMPLERS
        saved = {cls: samplers[cls] for cls in stock_classes}
        model = copy.deepcopy(self.stock)
        try:
            po.register_for_torch_norms()
            for cls, sampler in zip(stock_classes, (po.compute_group_norm_grad_sample, po.compute_layer_norm_grad_sample,
                                                    po.compute_rms_norm_grad_sample)):
                self.assertIs(samplers[cls], sampler, cls.__name__)
            gsm = GradSampleModule(model, loss_reduction="mean")
            names = {m: k for k, m in model.named_modules()}
            with spy_on_samplers((nn.LayerNorm, nn.RMSNorm), names) as ran:
                F.cross_entropy(gsm(self.x), self.y).backward()
            got = {k: p.grad_sample for k, p in model.named_parameters()}
            gsm._close()  # drops grad_sample
        finally:
            samplers.update(saved)
        self.assertEqual(sorted(ran), sorted(ROW_LAYERS))
        assert_all_track_stock(got, self.stock_rows, self.want)


@unittest.skipUnless(HAS_OPACUS, "opacus is not installed (pip install 'persample[opacus]')")
class TestStashedStatistics(unittest.TestCase):
    """The LayerNorm/RMSNorm samplers take the statistics their layer's forward
    stashed; without them they recompute, with the same result."""

    @classmethod
    def setUpClass(cls):
        import persample.opacus  # noqa: F401

        cls.stock = make_norm_net()
        cls.x, cls.y = norm_batch()
        cls.names = [k for k, _ in cls.stock.named_parameters() if k.split(".")[0] in ROW_LAYERS]
        cls.want = per_example_grads(cls.stock, cls.x, cls.y, names=cls.names)
        cls.stock_rows = per_example_grads(cls.stock, cls.x, cls.y, torch.float32, names=cls.names)

    def setUp(self):
        warnings.simplefilter("ignore")

    def _grad_samples(self, model):
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="sum")
        F.cross_entropy(gsm(self.x), self.y, reduction="sum").backward()
        got = {k: p.grad_sample for k, p in model.named_parameters() if k in self.names}
        gsm._close()
        assert_all_track_stock(got, self.stock_rows, self.want)

    def test_reuses_forward_statistics(self):
        import persample.nn as pnn
        import persample.opacus as po

        forward, backward = [], []

        def record(op, into, stats):
            def run(*args):
                out = op(*args)
                into.append([t.data_ptr() for t in stats(args, out)])
                return out

            return run

        model = persample.convert_norms(copy.deepcopy(self.stock))
        with mock.patch.object(po, "row_stats", side_effect=AssertionError("recomputed statistics")), \
             mock.patch.object(pnn, "layer_norm_op", record(pnn.layer_norm_op, forward, lambda a, o: o[1:])), \
             mock.patch.object(pnn, "rms_norm_op", record(pnn.rms_norm_op, forward, lambda a, o: o[1:])), \
             mock.patch.object(po, "layer_norm_backward_op", record(po.layer_norm_backward_op, backward,
                                                                    lambda a, o: a[3:5])), \
             mock.patch.object(po, "rms_norm_backward_op", record(po.rms_norm_backward_op, backward,
                                                                  lambda a, o: a[3:4])):
            self._grad_samples(model)
        # The backward ops got the very tensors the forward ops returned (Opacus's
        # backward runs the layers in reverse), and every stash was claimed.
        self.assertEqual(len(forward), len(ROW_LAYERS))
        self.assertEqual(backward, forward[::-1])
        self.assertEqual([getattr(model, k)._saved_stats for k in ROW_LAYERS], [[]] * len(ROW_LAYERS))

    def test_without_stash_recomputes(self):
        import persample.nn as pnn
        import persample.opacus as po

        model = persample.convert_norms(copy.deepcopy(self.stock))
        with mock.patch.object(pnn, "_stash_stats", lambda *args: None), \
             mock.patch.object(po, "row_stats", wraps=po.row_stats) as recompute:
            self._grad_samples(model)
        self.assertEqual(recompute.call_count, len(ROW_LAYERS))

    def test_no_stash_without_hooks(self):
        model = persample.convert_norms(copy.deepcopy(self.stock))
        model(self.x)
        self.assertEqual([getattr(model, k).__dict__.get("_saved_stats") for k in ROW_LAYERS], [None] * len(ROW_LAYERS))

    def test_sequence_first_input(self):
        """Opacus's batch_first=False hands the sampler a permuted view of the input the
        forward saw, of the same storage, and of the same shape when T = N: the stash is
        keyed by strides too (it used to give those statistics, transposed)."""
        from opacus import GradSampleModule

        torch.manual_seed(0)
        stock = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.RMSNorm(4))
        randomize = [stock[1].weight, stock[1].bias, stock[2].weight]
        with torch.no_grad():
            for p in randomize:
                p.uniform_(0.5, 1.5)
        x = torch.randn(3, 3, 4) * 2 + 1  # [T, N, 4], T = N

        def loss(model, x):
            return model(x).square().sum()

        ref, rows = copy.deepcopy(stock).double(), copy.deepcopy(stock)
        want, stock_rows = {}, {}
        for m, xd, out in ((ref, x.double(), want), (rows, x, stock_rows)):
            for i in range(x.shape[1]):
                m.zero_grad()
                loss(m, xd[:, i : i + 1]).backward()
                for k, p in m.named_parameters():
                    out.setdefault(k, []).append(p.grad.clone())
        model = persample.convert_norms(copy.deepcopy(stock))
        gsm = GradSampleModule(model, batch_first=False, loss_reduction="sum")
        loss(gsm, x).backward()
        got = {k: p.grad_sample for k, p in model.named_parameters()}
        gsm._close()
        assert_all_track_stock(got, {k: torch.stack(v) for k, v in stock_rows.items()},
                               {k: torch.stack(v) for k, v in want.items()})


if __name__ == "__main__":
    unittest.main()
