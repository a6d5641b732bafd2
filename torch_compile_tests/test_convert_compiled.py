"""persample.convert_group_norm's routed group norms (tests/convert_models.py) under
torch.compile(fullgraph=True) and torch.export: the graphs hold the persample op for
every group norm and no ATen one, and per-sample gradients (call_for_per_sample_grads,
compiled vmap(grad)) equal a float64 per-example loop as closely as stock's own."""

import copy
import unittest

import torch
import torch._dynamo.testing
import torch.nn.functional as F

import persample
from tests.convert_models import NORM_PARAMS, batch, float64_per_example_grads, func_per_example_grads, make_net
from tests.error_model import assert_all_track_stock, assert_tracks_stock

GROUP_NORMS = 5  # in convert_models.Net


class TestConvertCompiled(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        self.stock = make_net()
        self.model = persample.convert_group_norm(copy.deepcopy(self.stock))
        self.x, self.y = batch(5)

    def _reference(self, names):
        stock = func_per_example_grads(self.stock, self.x, self.y)
        ref = float64_per_example_grads(self.stock, self.x, self.y)
        return {k: stock[k] for k in names}, {k: ref[k] for k in names}

    def test_graph_holds_the_ops(self):
        backend = torch._dynamo.testing.EagerAndRecordGraphs()
        out = torch.compile(self.model, fullgraph=True, backend=backend)(self.x)
        (graph,) = backend.graphs
        code = graph.code
        self.assertEqual(code.count("torch.ops.persample.group_norm.default"), GROUP_NORMS, code)
        self.assertNotIn("torch.group_norm", code)
        self.assertNotIn("functional.group_norm", code)
        with torch.no_grad():
            assert_tracks_stock(out.detach(), self.stock(self.x), self.stock.double()(self.x.double()), "output")

    def test_export(self):
        with torch.no_grad():
            want = self.stock(self.x), copy.deepcopy(self.stock).double()(self.x.double())
        for strict in (False, True):
            with self.subTest(strict=strict):
                ep = torch.export.export(self.model.eval(), (self.x,), strict=strict)
                self.assertEqual(ep.graph_module.code.count("torch.ops.persample.group_norm.default"), GROUP_NORMS)
                self.assertNotIn("aten.group_norm", ep.graph_module.code)
                with torch.no_grad():
                    assert_tracks_stock(ep.module()(self.x), *want, "output")

    def test_call_for_per_sample_grads(self):
        compiled = torch.compile(self.model, fullgraph=True)
        out = persample.call_for_per_sample_grads(compiled, loss_reduction="mean")(self.x)
        F.cross_entropy(out, self.y).backward()
        params = dict(self.model.named_parameters())
        got = {k: params[k].grad_sample for k in NORM_PARAMS}
        assert_all_track_stock(got, *self._reference(NORM_PARAMS), "compiled grad_sample ")

    def test_torch_func(self):
        params = {k: v.detach() for k, v in self.model.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(torch.func.functional_call(self.model, p, (xi[None],)), yi[None])

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
        got = torch.compile(per_sample, fullgraph=True, backend="aot_eager")(params, self.x, self.y)
        assert_all_track_stock(got, *self._reference(list(got)), "compiled vmap(grad) ")


if __name__ == "__main__":
    unittest.main()
