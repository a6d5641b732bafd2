"""Per-sample gradients under activation checkpointing (torch.utils.checkpoint,
reentrant and not), eager and compiled, equal those without checkpointing.

Checkpointing runs a block's forward again in the backward pass; call_for_per_sample_grads
keeps its per-sample leaves for that recomputation (persample/leaves.py). Opacus's hooks
work under reentrant checkpointing; under non-reentrant checkpointing Opacus 1.6 leaves
every ``grad_sample`` None, for its own layers too (not tested here: an Opacus limit).
"""

import copy
import importlib.util
import unittest
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import persample
from convert_models import NORM_PARAMS, GroupNormAct, Net, batch, float64_per_example_grads, make_net
from error_model import assert_all_track_stock


class Checkpointed(Net):
    """convert_models.Net with its two stages under torch.utils.checkpoint (or not)."""

    use_reentrant = None  # None: no checkpointing

    def _stage1(self, x):
        return self.plain(self.act_norm(self.stem(x)))

    def _stage2(self, x):
        return self.stock(self.ada(self.scale_shift(self.conv(x))))

    def forward(self, x):
        for stage in (self._stage1, self._stage2):
            x = stage(x) if self.use_reentrant is None else checkpoint(stage, x, use_reentrant=self.use_reentrant)
        return self.head(x.mean((2, 3)))


def checkpointed(use_reentrant):
    model = Checkpointed()
    model.load_state_dict(make_net().state_dict())
    model.use_reentrant = use_reentrant
    return persample.convert_group_norm(model)


class TestCheckpoint(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        self.x, self.y = batch(5)
        # Reentrant checkpointing passes gradients only to blocks whose input requires grad.
        self.x.requires_grad_()
        self.ref = float64_per_example_grads(make_net(), self.x.detach(), self.y)

    def _grad_samples(self, use_reentrant, compile=None):
        model = checkpointed(use_reentrant)
        run = model if compile is None else torch.compile(model, **compile)
        out = persample.call_for_per_sample_grads(run, loss_reduction="mean")(self.x)
        F.cross_entropy(out, self.y).backward()
        params = dict(model.named_parameters())
        return {k: params[k].grad_sample for k in NORM_PARAMS}, {k: p.grad for k, p in params.items()}

    def _check(self, use_reentrant, compile=None):
        plain = self._grad_samples(None, compile)
        got = self._grad_samples(use_reentrant, compile)
        for what, g, p in zip(("grad_sample ", "grad "), got, plain):
            self.assertTrue(all(v is not None for v in g.values()), what)
            # Against the float64 truth, with the error of the run without checkpointing as the scale.
            want = self.ref if what == "grad_sample " else {k: v.sum(0) / len(self.x) for k, v in self.ref.items()}
            assert_all_track_stock(g, p, {k: want[k] for k in g}, what)

    def test_eager_non_reentrant(self):
        self._check(use_reentrant=False)

    def test_eager_reentrant(self):
        self._check(use_reentrant=True)

    def test_compiled_non_reentrant(self):
        # The routed modules enter and leave their mode inside the checkpointed region,
        # with no dynamo flag set (persample/convert.py, _unchecked).
        self._check(use_reentrant=False, compile={"fullgraph": True, "backend": "aot_eager"})

    def test_compiled_non_reentrant_refuses_module_side_effects(self):
        # Only the mode's push and pop are let through: a side effect of the routed
        # module's own code stays refused, as dynamo refuses it for any module.
        calls = []

        class Counting(GroupNormAct):
            def forward(self, x):
                calls.append(None)
                return super().forward(x)

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = Counting(8, 4)

            def forward(self, x):
                return checkpoint(self.norm, x, use_reentrant=False)

        run = torch.compile(persample.convert_group_norm(Block()), fullgraph=True, backend="aot_eager")
        with self.assertRaisesRegex(torch._dynamo.exc.Unsupported, "side effect"):
            run(torch.randn(2, 8, 4, 4))

    def test_compiled_reentrant(self):
        # Dynamo runs a reentrant checkpoint as eager code (a graph break), so no fullgraph.
        self._check(use_reentrant=True, compile={"backend": "aot_eager"})

    def test_parked_leaves_dropped_after_backward(self):
        model = checkpointed(False)
        F.cross_entropy(persample.call_for_per_sample_grads(model)(self.x), self.y).backward()
        self.assertFalse(any("_persample_parked" in vars(m) for m in model.modules()))
        # A later plain forward and backward (checkpointed) runs without per-sample leaves.
        F.cross_entropy(model(self.x), self.y).backward()


@unittest.skipUnless(importlib.util.find_spec("opacus"), "opacus is not installed")
class TestCheckpointOpacus(unittest.TestCase):
    def test_reentrant_hooks(self):
        from opacus import GradSampleModule

        import persample.opacus  # noqa: F401

        x, y = batch(5)
        x.requires_grad_()
        grads = []
        for use_reentrant in (None, True):
            model = checkpointed(use_reentrant)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus's note on full backward hooks
                F.cross_entropy(GradSampleModule(model)(x), y, reduction="sum").backward()
            grads.append({k: p.grad_sample for k, p in model.named_parameters()})
        ref = float64_per_example_grads(make_net(), x.detach(), y)
        assert_all_track_stock(grads[1], grads[0], ref, "Opacus grad_sample ")


if __name__ == "__main__":
    unittest.main()
