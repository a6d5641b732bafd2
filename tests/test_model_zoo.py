"""persample.convert_group_norm on real architectures from model libraries
(tests/zoo_models.py: timm, torchvision, diffusers, MONAI), eager: every group norm
reaches persample and none is left unrouted, outputs are unchanged, and the GroupNorm
per-sample gradients of call_for_per_sample_grads and torch.func equal a float64
per-example loop through the stock model as closely as stock PyTorch's own
(tests/error_model.py). Each library's tests skip, with the reason, when it is not
installed (the 'zoo' extra). Compiled and exported: torch_compile_tests/test_model_zoo_compiled.py
(diffusers' affine-free AdaGroupNorm block is exported here, and not compiled).
"""

import copy
import unittest

import torch
import torch.nn.functional as F

import persample
from convert_models import count_persample_calls, float64_per_example_grads, func_per_example_grads
from error_model import assert_all_track_stock, assert_tracks_stock
from zoo_models import ZOO, diffusers_ada_group_block, load_case, skip_reason


class ZooChecks:
    """The checks, for the architecture named by ``zoo`` (a key of ``ZOO``)."""

    zoo = None

    @classmethod
    def setUpClass(cls):
        load_case(cls)

    def setUp(self):
        self.model = persample.convert_group_norm(copy.deepcopy(self.stock))

    def test_every_group_norm_runs_through_persample(self):
        # Each GroupNorm module of these models runs once per forward.
        norms = sum(isinstance(m, torch.nn.GroupNorm) for m in self.stock.modules())
        self.assertGreater(norms, 0)
        self.assertEqual(count_persample_calls(self.stock, self.x), {"persample": 0, "aten": norms})
        self.assertEqual(count_persample_calls(self.model, self.x), {"persample": norms, "aten": 0})
        self.assertEqual(persample.unrouted_group_norms(self.model, self.x), [])

    def test_output_unchanged(self):
        with torch.no_grad():
            got, want = self.model(self.x), self.stock(self.x)
            ref = copy.deepcopy(self.stock).double()(self.x.double())
        assert_tracks_stock(got, want, ref, f"{self.zoo} output")

    def test_call_for_per_sample_grads(self):
        out = persample.call_for_per_sample_grads(self.model, loss_reduction="mean")(self.x)
        F.cross_entropy(out, self.y).backward()
        got = {k: p.grad_sample for k, p in self.model.named_parameters() if getattr(p, "grad_sample", None) is not None}
        self.assertEqual(sorted(got), sorted(self.norm_params))  # every GroupNorm parameter, no other
        assert_all_track_stock(got, self.stock_grads, self.ref_grads, f"{self.zoo} grad_sample ")

    def test_torch_func(self):
        got = func_per_example_grads(self.model, self.x, self.y)
        assert_all_track_stock({k: got[k] for k in self.norm_params}, self.stock_grads, self.ref_grads,
                               f"{self.zoo} vmap(grad) ")

    def test_revert(self):
        reverted = persample.revert_group_norm(self.model)
        for (name, got), want in zip(reverted.named_modules(), self.stock.modules()):
            self.assertIs(type(got), type(want), name)
        self.assertEqual(count_persample_calls(reverted, self.x)["persample"], 0)


class TestTimmResNetV2(ZooChecks, unittest.TestCase):
    zoo = "timm_resnetv2"

    def test_norm_act_layers_are_routed(self):
        # timm's GroupNormAct keeps its own forward (norm, then activation): routed in
        # place, not replaced by persample.nn.GroupNorm.
        routed = [k for k, _ in persample.convert.routed_modules(self.model)]
        want = [k for k, m in self.stock.named_modules() if type(m).__name__ == "GroupNormAct"]
        self.assertEqual(routed, want)
        self.assertGreater(len(want), 0)

    def test_fast_norm(self):
        # With timm's fast norm on, GroupNormAct calls timm.layers.fast_norm's helper,
        # which calls F.group_norm in another file: the module's route catches it.
        from timm.layers import is_fast_norm, set_fast_norm

        was = is_fast_norm()
        set_fast_norm(True)
        try:
            stock = ZOO[self.zoo].build()[0]  # GroupNormAct reads the flag when built
        finally:
            set_fast_norm(was)
        model = persample.convert_group_norm(stock)
        self.assertTrue(all(m._fast_norm for _, m in persample.convert.routed_modules(model)))
        norms = len(persample.convert.routed_modules(model))
        self.assertEqual(count_persample_calls(model, self.x), {"persample": norms, "aten": 0})


class TestTorchvisionResNet(ZooChecks, unittest.TestCase):
    zoo = "torchvision_resnet"


class TestDiffusersUNet(ZooChecks, unittest.TestCase):
    zoo = "diffusers_unet"


@unittest.skipIf(skip_reason("diffusers"), skip_reason("diffusers"))
class TestDiffusersAdaGroupNorm(unittest.TestCase):
    """A library's direct ``F.group_norm`` call in a module that is no GroupNorm:
    diffusers' AdaGroupNorm, affine-free, so the per-sample gradients checked are those
    of every parameter (torch.func, through persample's backward)."""

    def setUp(self):
        self.stock, self.x, self.y = diffusers_ada_group_block()
        self.model = persample.convert_group_norm(copy.deepcopy(self.stock))

    def test_every_group_norm_runs_through_persample(self):
        self.assertEqual([k for k, _ in persample.convert.routed_modules(self.model)], ["block.norm1", "block.norm2"])
        self.assertEqual(count_persample_calls(self.stock, self.x), {"persample": 0, "aten": 2})
        self.assertEqual(count_persample_calls(self.model, self.x), {"persample": 2, "aten": 0})
        self.assertEqual(persample.unrouted_group_norms(self.model, self.x), [])

    def test_torch_func(self):
        with torch.no_grad():
            ref_out = copy.deepcopy(self.stock).double()(self.x.double())
            assert_tracks_stock(self.model(self.x), self.stock(self.x), ref_out, "AdaGroupNorm block output")
        got = func_per_example_grads(self.model, self.x, self.y)
        stock = func_per_example_grads(self.stock, self.x, self.y)
        assert_all_track_stock(got, stock, float64_per_example_grads(self.stock, self.x, self.y), "AdaGroupNorm vmap(grad) ")

    def test_export(self):
        ep = torch.export.export(self.model, (self.x,))
        self.assertEqual(ep.graph_module.code.count("torch.ops.persample.group_norm.default"), 2)
        self.assertNotIn("native_group_norm", ep.graph_module.code)


class TestMonaiSegResNet(ZooChecks, unittest.TestCase):
    zoo = "monai_segresnet"


if __name__ == "__main__":
    unittest.main()
