"""torch.export of models holding persample.group_norm: dynamic batch, save/load, per-sample
weights as inputs, the joint forward-backward graph, and export-time errors."""

import os
import re
import tempfile

import torch
import torch.export.experimental  # torch.export does not import it itself
import torch.nn.functional as F
from torch.export import Dim
from torch.testing import FileCheck
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from torch_compile_tests.models import (
    IMAGE,
    SmallNet,
    batch,
    loss_fn,
    make_models,
    per_example_grads,
)

FORWARD_OP = "torch.ops.persample.group_norm.default"
BACKWARD_OP = "torch.ops.persample.group_norm_backward.default"


def _check_op_count(code, op, count):
    FileCheck().check_count(op, count, exactly=True).run(code)


class TestExport(TestCase):
    def test_dynamic_batch_runs_and_round_trips(self):
        model = SmallNet().eval()
        ep = torch.export.export(
            model, (torch.randn(4, *IMAGE),), dynamic_shapes={"x": {0: Dim("batch", min=2)}}
        )
        # The op stays opaque: one call, not decomposed into ATen, even when lowering
        # to core ATen IR.
        _check_op_count(ep.graph_module.code, FORWARD_OP, 1)
        core = ep.run_decompositions()
        _check_op_count(core.graph_module.code, FORWARD_OP, 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "small_net.pt2")
            torch.export.save(ep, path)
            loaded = torch.export.load(path)
        _check_op_count(loaded.graph_module.code, FORWARD_OP, 1)
        for n in (3, 7):  # neither is the example batch size
            x = torch.randn(n, *IMAGE)
            with torch.no_grad():
                expected = model(x)
                for program in (ep, core, loaded):
                    self.assertEqual(program.module()(x), expected)

    def test_per_sample_weights_as_inputs(self):
        class PerSampleNorm(torch.nn.Module):
            def forward(self, x, w, b):
                return persample.group_norm(x, 2, w, b)

        # Only x's batch is declared; the fake impl's N check must tie w's and b's to it.
        ep = torch.export.export(
            PerSampleNorm(),
            (torch.randn(4, 6, 5), torch.randn(4, 6), torch.randn(4, 6)),
            dynamic_shapes={"x": {0: Dim("batch", min=2)}, "w": {0: Dim.AUTO}, "b": {0: Dim.AUTO}},
        )
        _check_op_count(ep.graph_module.code, FORWARD_OP, 1)
        self.assertEqual(len(ep.range_constraints), 1)
        exported = ep.module()
        for n in (3, 7):
            x, w0, b0 = torch.randn(n, 6, 5), torch.randn(n, 6), torch.randn(n, 6)
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            # The exported graph calls the op itself, so the op's autograd kernel still
            # gives [N, C] gradients.
            out = exported(x, w, b)
            out.square().sum().backward()
            rw, rb = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            expected = torch.cat(
                [F.group_norm(x[i : i + 1], 2, rw[i], rb[i]) for i in range(n)]
            )
            expected.square().sum().backward()
            self.assertEqual(out, expected)
            self.assertEqual((w.grad, b.grad), (rw.grad, rb.grad))
        with self.assertRaisesRegex(AssertionError, re.escape("w.size()[0] == x.size()[0]")):
            exported(torch.randn(7, 6, 5), torch.randn(3, 6), torch.randn(7, 6))

    def test_export_time_errors_carry_persample_message(self):
        class Norm(torch.nn.Module):
            def __init__(self, eps=1e-5):
                super().__init__()
                self.eps = eps

            def forward(self, x, w=None):
                return persample.group_norm(x, 2, w, None, self.eps)

        bad = {
            "channels not divisible": (Norm(), (torch.randn(4, 5, 3),)),
            "per-sample weight with wrong N": (Norm(), (torch.randn(4, 6, 3), torch.randn(3, 6))),
            "integer input": (Norm(), (torch.ones(4, 6, 3, dtype=torch.int64),)),
            "negative eps": (Norm(eps=-1.0), (torch.randn(4, 6, 3),)),
        }
        for name, (module, args) in bad.items():
            with self.subTest(name):
                with self.assertRaises(RuntimeError) as eager:
                    module(*args)
                self.assertTrue(str(eager.exception).startswith("persample.group_norm: "))
                with self.assertRaisesRegex(RuntimeError, re.escape(str(eager.exception))):
                    torch.export.export(module, args)


class LossModule(torch.nn.Module):
    """SmallNet plus its loss: joint export needs a module that returns a scalar loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return loss_fn(self.net(x), y)


def _run_joint(jep, x, y):
    """Runs a joint graph: ``(loss, {parameter name: gradient})``.

    ``jep.module()`` cannot run it (its output spec still holds only the loss), so this
    calls the graph module with the lifted parameters in the signature's order.
    """
    state = jep.state_dict
    args = [state[s.target] if s.target is not None else None for s in jep.graph_signature.input_specs]
    user = iter((x, y))
    args = [a if a is not None else next(user) for a in args]
    with torch.no_grad():
        outs = jep.graph_module(*args)
    specs = jep.graph_signature.output_specs
    return outs[0], {s.target: g for s, g in zip(specs[1:], outs[1:])}


class TestJointExport(TestCase):
    def _joint(self, module, x, y):
        jep = torch.export.experimental._export_forward_backward(torch.export.export(module, (x, y)))
        code = jep.graph_module.code
        _check_op_count(code, FORWARD_OP, 1)
        _check_op_count(code, BACKWARD_OP, 1)
        return _run_joint(jep, x, y)

    def test_shared_params_joint_graph(self):
        model, stock = make_models()
        x, y = batch(4)
        loss, grads = self._joint(LossModule(model), x, y)
        expected = loss_fn(stock(x), y)
        expected.backward()
        self.assertEqual(loss, expected.detach())
        self.assertEqual(grads, {f"net.{k}": p.grad for k, p in stock.named_parameters()})

    def test_per_sample_params_joint_graph(self):
        # [N, C] parameters: the joint graph's gradients for them are per sample.
        model, stock = make_models(torch.float64)
        x, y = batch(4, torch.float64)
        for name in ("weight", "bias"):
            p = getattr(model.gn, name)
            setattr(model.gn, name, torch.nn.Parameter(p.detach().expand(4, -1).clone()))
        _, grads = self._joint(LossModule(model), x, y)
        expected = per_example_grads(stock, x, y)
        self.assertEqual(grads["net.gn.weight"], expected["gn.weight"])
        self.assertEqual(grads["net.gn.bias"], expected["gn.bias"])


if __name__ == "__main__":
    run_tests()
