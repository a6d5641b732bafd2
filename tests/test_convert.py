"""persample.convert_group_norm on every kind of group norm (tests/convert_models.py),
eager: the calls reach persample, outputs are unchanged, per-sample gradients from
call_for_per_sample_grads, torch.func and Opacus equal a float64 per-example loop as
closely as stock PyTorch's own, revert restores, and a missed call is named."""

import copy
import pickle
import unittest
import warnings

import torch
import torch.nn.functional as F

import persample
from convert_models import (
    NORM_PARAMS,
    GroupNormAct,
    batch,
    count_persample_calls,
    float64_per_example_grads,
    func_per_example_grads,
    make_net,
)
from error_model import assert_all_track_stock, assert_tracks_stock


class TestConvert(unittest.TestCase):
    def setUp(self):
        self.stock = make_net()
        self.model = persample.convert_group_norm(copy.deepcopy(self.stock))
        self.x, self.y = batch(5)

    def test_every_group_norm_runs_through_persample(self):
        self.assertEqual(count_persample_calls(self.stock, self.x), {"persample": 0, "aten": 5})
        self.assertEqual(count_persample_calls(self.model, self.x), {"persample": 5, "aten": 0})
        self.assertEqual(persample.unrouted_group_norms(self.model, self.x), [])

    def test_output_unchanged(self):
        with torch.no_grad():
            got, want = self.model(self.x), self.stock(self.x)
            ref = self.stock.double()(self.x.double())
        assert_tracks_stock(got, want, ref, "output")

    def test_objects_and_state_dict_kept(self):
        # Conversion swaps classes in place: same modules (subclasses of the originals),
        # same Parameter objects, same state_dict keys.
        for name, module in self.model.named_modules():
            self.assertIsInstance(module, type(dict(self.stock.named_modules())[name]))
        self.assertEqual(list(self.model.state_dict()), list(self.stock.state_dict()))
        self.assertIsInstance(self.model.stock, persample.nn.GroupNorm)
        self.assertEqual(type(self.model.act_norm).__name__, "GroupNormAct")

    def test_call_for_per_sample_grads(self):
        for reduction in ("sum", "mean"):
            self.model.zero_grad()
            out = persample.call_for_per_sample_grads(self.model, loss_reduction=reduction)(self.x)
            F.cross_entropy(out, self.y, reduction=reduction).backward()
            params = dict(self.model.named_parameters())
            got = {k: params[k].grad_sample for k in NORM_PARAMS}
            self._check(got, f"grad_sample ({reduction}) ")

    def test_torch_func(self):
        got = func_per_example_grads(self.model, self.x, self.y)
        self._check({k: got[k] for k in NORM_PARAMS}, "vmap(grad) ")

    def _check(self, got, what):
        stock = func_per_example_grads(self.stock, self.x, self.y)
        ref = float64_per_example_grads(self.stock, self.x, self.y)
        assert_all_track_stock(got, {k: stock[k] for k in got}, {k: ref[k] for k in got}, what)

    def test_revert(self):
        reverted = persample.revert_group_norm(self.model)
        for (name, got), want in zip(reverted.named_modules(), self.stock.modules()):
            self.assertIs(type(got), type(want), name)
        self.assertEqual(count_persample_calls(reverted, self.x)["persample"], 0)

    def test_pickle(self):
        # Routed classes are importable by name, so a whole converted model pickles.
        loaded = pickle.loads(pickle.dumps(self.model))
        self.assertIs(type(loaded.act_norm), type(self.model.act_norm))
        self.assertEqual(count_persample_calls(loaded, self.x)["persample"], 5)

    def test_missed_call_is_named(self):
        class Helper(torch.nn.Module):  # calls a group norm through a function of another name
            def forward(self, x):
                return norm(x, 3)

        norm = getattr(F, "group_norm")
        model = persample.convert_group_norm(torch.nn.Sequential(torch.nn.Identity(), Helper()))
        with self.assertWarnsRegex(UserWarning, r"\['1'\]"):
            self.assertEqual(persample.unrouted_group_norms(model, self.x), ["1"])

    def test_foreign_parameter_raises(self):
        class Borrow(torch.nn.Module):  # another module's parameter in its group norm
            def __init__(self, other):
                super().__init__()
                self.other = other

            def forward(self, x):
                return F.group_norm(x, 3, self.other.weight)

        model = persample.convert_group_norm(torch.nn.Sequential(GroupNormAct(3, 3), Borrow(GroupNormAct(3, 3))))
        with self.assertRaisesRegex(ValueError, "not its own"):
            persample.call_for_per_sample_grads(model)(self.x)


@unittest.skipUnless(__import__("importlib").util.find_spec("opacus"), "opacus is not installed")
class TestConvertOpacus(unittest.TestCase):
    """Opacus hooks: persample.nn.GroupNorm has persample's sampler; routed modules,
    whose forward may do more than the group norm (an activation), are unknown to
    Opacus, which differentiates their forward with torch.func, through persample."""

    def test_grad_sample_module(self):
        from opacus import GradSampleModule

        import persample.opacus  # noqa: F401

        stock, (x, y) = make_net(), batch(5)
        model = persample.convert_group_norm(copy.deepcopy(stock))
        gsm = GradSampleModule(model, loss_reduction="sum")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's note on full backward hooks
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
        params = dict(model.named_parameters())
        got = {k: params[k].grad_sample for k in params}
        want = func_per_example_grads(stock, x, y)
        ref = float64_per_example_grads(stock, x, y)
        assert_all_track_stock(got, want, ref, "Opacus grad_sample ")


if __name__ == "__main__":
    unittest.main()
