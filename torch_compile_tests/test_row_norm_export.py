"""Exported programs holding the row norms, ``persample.layer_norm`` / ``persample.rms_norm``
and the modules ``persample.nn.LayerNorm`` / ``persample.nn.RMSNorm``, as
test_export.py, test_core_aten.py, test_aoti.py and test_onnx.py check group_norm:

- torch.export with a dynamic batch (the ops opaque in the graph, per-sample parameters
  as inputs tied to the batch), save/load, export-time errors with the eager message;
- the ATen decompositions (persample/export.py) in eager, and ``run_decompositions(
  core_aten_decompositions())`` of forward and joint forward-backward programs: no
  persample op left, only core ATen;
- the joint graph's per-sample parameter gradients;
- one AOTInductor package, dynamic batch, both ops;
- ONNX (dynamo exporter) run in onnxruntime, forward and both backward ops.

Results that round otherwise than eager (the decompositions, so core ATen and ONNX;
the per-sample gradients) are checked against the float64 per-example loop over stock
``F.layer_norm`` / ``F.rms_norm`` (tests/row_samples.py) by the error model
(tests/error_model.py), stock's float32 loop the scale; programs that run the ops' own
kernels (exported, loaded, AOTInductor) must give eager's numbers. The whole TokenNet
is checked by the model-level bound (``assert_all_track_stock``).
"""

import collections
import copy
import itertools
import json
import os
import re
import sys
import tempfile
import unittest
import zipfile

import torch
import torch.export.experimental  # torch.export does not import it itself
from torch.export import Dim
from torch.testing import FileCheck
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from persample.export import (
    core_aten_decompositions,
    layer_norm_backward_decomposition,
    layer_norm_decomposition,
    rms_norm_backward_decomposition,
    rms_norm_decomposition,
)
from tests.error_model import assert_all_track_stock, check_close, grad_input_scale
from torch_compile_tests.models import loss_fn
from torch_compile_tests.test_core_aten import non_core_ops
from torch_compile_tests.test_export import _run_joint
from torch_compile_tests.test_onnx import MISSING, ONNX_EXTRA, run_onnx
from torch_compile_tests.test_row_norm_compiled import (
    BAD_CALLS,
    TOKENS,
    WIDTH,
    batch,
    make_models,
)

# tests/row_samples.py imports its siblings as top-level modules (tests/ is on sys.path
# when pytest collects tests/, through its conftest.py); running this file alone needs
# the same path.
_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from row_samples import (  # noqa: E402
    check_results,
    layer_norm_backward_op,
    layer_norm_backward_samples,
    layer_norm_op,
    layer_norm_samples,
    reference,
    rms_norm_backward_op,
    rms_norm_backward_samples,
    rms_norm_op,
    rms_norm_samples,
    stock_loop,
)

# (input dtype, parameter dtype) of the eager decomposition checks; None: the input's.
DTYPES = ((torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32))
GRAD_NAMES = ("grad_input", "grad_weight", "grad_bias")
OPS = {name: f"torch.ops.persample.{name}.default" for name in
       ("layer_norm", "rms_norm", "layer_norm_backward", "rms_norm_backward")}


def _check_op_counts(code, counts):
    for name, count in counts.items():
        FileCheck().check_count(OPS[name], count, exactly=True).run(code)


class RowNorms(torch.nn.Module):
    """Both modules with shared parameters (LayerNorm also over a 2-d normalized_shape,
    a whole sample; RMSNorm with eps None) and both functions with per-sample ``[N, D]``
    parameters given as inputs, on ``[N, T, D]`` tokens."""

    def __init__(self):
        super().__init__()
        self.ln = persample.nn.LayerNorm(WIDTH)
        self.ln2 = persample.nn.LayerNorm((TOKENS, WIDTH), eps=1e-3)
        self.rms = persample.nn.RMSNorm(WIDTH)
        with torch.no_grad():  # not 1 and 0, which would hide a weight/bias mix-up
            for p in (self.ln.weight, self.ln2.weight, self.rms.weight):
                p.uniform_(0.5, 1.5)
            self.ln.bias.normal_()
            self.ln2.bias.normal_()

    def specs(self, w, b):
        """``(normalized_shape, weight, bias, eps, rms)`` of each output, for the reference."""
        d = [WIDTH]
        return (
            (d, self.ln.weight, self.ln.bias, self.ln.eps, False),
            ([TOKENS, WIDTH], self.ln2.weight, self.ln2.bias, 1e-3, False),
            (d, w, b, 1e-5, False),
            (d, self.rms.weight, None, None, True),
            (d, w, None, 1e-5, True),
        )

    def forward(self, x, w, b):
        return (
            self.ln(x),
            self.ln2(x),
            persample.layer_norm(x, WIDTH, w, b),
            self.rms(x),
            persample.rms_norm(x, WIDTH, w, 1e-5),
        )


def row_inputs(n):
    return torch.randn(n, TOKENS, WIDTH), torch.rand(n, WIDTH) + 0.5, torch.randn(n, WIDTH)


def check_row_norms(test, model, outs, args):
    """Each of RowNorms' outputs against the float64 per-example loop, stock's float32
    loop the scale."""
    x = args[0]
    test.assertEqual(len(outs), 5)
    for i, (out, (ns, w, b, eps, rms)) in enumerate(zip(outs, model.specs(*args[1:]), strict=True)):
        call = (x, ns, w, b, eps, torch.zeros_like(x), rms)  # reference() runs autograd
        check_close(out, reference(*call)[0], stock_loop(*call)[0], f"output {i}")


class TestExport(TestCase):
    def test_token_net_dynamic_batch_round_trips(self):
        model, _ = make_models()
        ep = torch.export.export(model, (batch(4)[0],), dynamic_shapes={"x": {0: Dim("batch", min=2)}})
        # Opaque: one call of each, kept by a default run_decompositions and by save/load.
        counts = {"layer_norm": 1, "rms_norm": 1}
        _check_op_counts(ep.graph_module.code, counts)
        default = ep.run_decompositions()
        _check_op_counts(default.graph_module.code, counts)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "token_net.pt2")
            torch.export.save(ep, path)
            loaded = torch.export.load(path)
        _check_op_counts(loaded.graph_module.code, counts)
        for n in (3, 7):  # neither is the example batch size
            x = batch(n)[0]
            with torch.no_grad():
                expected = model(x)
                for program in (ep, default, loaded):
                    self.assertEqual(program.module()(x), expected)

    def test_per_sample_params_as_inputs(self):
        model = RowNorms()
        # Only x's batch is declared; the fake impls' N checks must tie w's and b's to it.
        ep = torch.export.export(
            model, row_inputs(4),
            dynamic_shapes={"x": {0: Dim("batch", min=2)}, "w": {0: Dim.AUTO}, "b": {0: Dim.AUTO}},
        )
        _check_op_counts(ep.graph_module.code, {"layer_norm": 3, "rms_norm": 2})
        self.assertEqual(len(ep.range_constraints), 1)
        exported = ep.module()
        for n in (3, 7):
            x, w0, b0 = row_inputs(n)
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            outs = exported(x, w, b)
            with torch.no_grad():
                self.assertEqual(outs, model(x, w0, b0))
            # The graph calls the ops themselves, so their autograd kernels still give
            # [N, D] gradients: per-sample layer_norm's and rms_norm's weight rows add up.
            dy = torch.randn(n, TOKENS, WIDTH)
            torch.autograd.backward([outs[2], outs[4]], [dy, dy])
            ln = reference(x, [WIDTH], w0, b0, 1e-5, dy)
            rms = reference(x, [WIDTH], w0, None, 1e-5, dy, rms=True)
            ln_stock = stock_loop(x, [WIDTH], w0, b0, 1e-5, dy)
            rms_stock = stock_loop(x, [WIDTH], w0, None, 1e-5, dy, rms=True)
            check_close(w.grad, ln[2] + rms[2], ln_stock[2] + rms_stock[2], "grad_weight")
            check_close(b.grad, ln[3], ln_stock[3], "grad_bias")
        with self.assertRaisesRegex(AssertionError, re.escape("w.size()[0] == x.size()[0]")):
            exported(torch.randn(7, TOKENS, WIDTH), torch.randn(3, WIDTH), torch.randn(7, WIDTH))

    def test_export_time_errors_carry_persample_message(self):
        # test_row_norm_compiled.py's bad calls, here refused by torch.export's trace.
        class Call(torch.nn.Module):
            def __init__(self, fn, w, eps):
                super().__init__()
                self.fn, self.w, self.eps = fn, w, eps

            def forward(self, x):
                return self.fn(x, self.w, self.eps)

        for name, (fn, (x, w, eps)) in BAD_CALLS.items():
            with self.subTest(name):
                with self.assertRaises(RuntimeError) as eager:
                    fn(x, w, eps)
                self.assertRegex(str(eager.exception), r"^persample\.(layer|rms)_norm: ")
                with self.assertRaisesRegex(RuntimeError, re.escape(str(eager.exception))):
                    torch.export.export(Call(fn, w, eps), (x,))


def _strides(t):
    # Strides of size-1 dims say nothing about the layout.
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


class TestDecompositionsEager(TestCase):
    """The decompositions are plain functions of tensors: run them on real ones, the
    row_samples cases (ranks, layouts, [*ns] / [N, *ns] / expanded params, eps 0, an
    empty middle dim) in fp32, bf16, fp16 and bf16 with fp32 params, against the ops
    (shapes, dtypes, layouts) and the reference."""

    def assert_like_op(self, got, op_out):
        for g, e in zip(got, op_out, strict=True):
            self.assertEqual((g.shape, g.dtype, _strides(g)), (e.shape, e.dtype, _strides(e)))

    def test_forward_matches_op_and_reference(self):
        for (dtype, param_dtype), rms in itertools.product(DTYPES, (False, True)):
            kw = dict(requires_grad=False, dtype=dtype, param_dtype=param_dtype)
            samples = rms_norm_samples(**kw) if rms else layer_norm_samples(**kw)
            decomp, op = (rms_norm_decomposition, rms_norm_op) if rms else (layer_norm_decomposition, layer_norm_op)
            for i, args in enumerate(samples):
                x, ns, w, *rest = args
                b, eps = (None, rest[0]) if rms else rest
                with self.subTest(op.name(), dtype=dtype, param_dtype=param_dtype, sample=i):
                    got = decomp(*args)
                    self.assert_like_op(got, op(*args))
                    call = (x, ns, w, b, eps, torch.zeros_like(x), rms)
                    if x.numel():  # error_model.check_close reads the largest entry
                        check_close(got[0], reference(*call)[0], stock_loop(*call)[0], "output")

    def test_backward_matches_op_and_reference(self):
        # Every output mask (cycled); stride-0 grad_outs.
        for (dtype, param_dtype), rms in itertools.product(DTYPES, (False, True)):
            kw = dict(requires_grad=False, dtype=dtype, param_dtype=param_dtype)
            samples = rms_norm_backward_samples(**kw) if rms else layer_norm_backward_samples(**kw)
            decomp, op = ((rms_norm_backward_decomposition, rms_norm_backward_op) if rms
                          else (layer_norm_backward_decomposition, layer_norm_backward_op))
            for i, args in enumerate(samples):
                grad_out, x, ns, *stats, w, mask, eps = args
                with self.subTest(op.name(), dtype=dtype, param_dtype=param_dtype, sample=i, mask=mask):
                    got = decomp(*args)
                    self.assert_like_op(got, op(*args))
                    call = (x, ns, w, None, eps, grad_out, rms)
                    ref, stock = reference(*call)[1:], stock_loop(*call)[1:]
                    # The op's [N, *ns] rows, whatever the weight's kind.
                    for what, g, e, s, keep in zip(GRAD_NAMES, got, ref, stock, mask):
                        if not keep:
                            self.assertEqual(g.shape, (0,))
                        elif e.numel():
                            scale = grad_input_scale(grad_out, stats[-1], w) if what == "grad_input" else 0.0
                            check_close(g, e, s, what, scale)

    def test_bad_input_raises_the_ops_error(self):
        x = torch.randn(4, 3, WIDTH)
        bad = {
            "wrong trailing size": (layer_norm_op, layer_norm_decomposition, (x, [WIDTH + 1], None, None, 1e-5)),
            "per-sample weight with wrong N": (rms_norm_op, rms_norm_decomposition, (x, [WIDTH], torch.randn(3, WIDTH), None)),
            "negative eps": (layer_norm_op, layer_norm_decomposition, (x, [WIDTH], None, None, -1.0)),
        }
        for name, (op, decomp, args) in bad.items():
            with self.subTest(name):
                with self.assertRaises(RuntimeError) as op_error:
                    op(*args)
                with self.assertRaisesRegex(RuntimeError, re.escape(str(op_error.exception))):
                    decomp(*args)


class PerSampleRowNormLoss(torch.nn.Module):
    """persample.nn.LayerNorm and RMSNorm with ``[N, D]`` parameters and the loss
    ``sum(ln(x) * dy[0]) + sum(rms(x) * dy[1])``: the joint graph's parameter gradients
    are then the per-sample gradients for ``dy[0]`` and ``dy[1]`` (one ``dy`` input,
    so that test_export.py's ``_run_joint`` runs the graph)."""

    def __init__(self, n):
        super().__init__()
        self.ln = persample.nn.LayerNorm(WIDTH)
        self.rms = persample.nn.RMSNorm(WIDTH, eps=1e-5)
        self.ln.weight = torch.nn.Parameter(torch.rand(n, WIDTH) + 0.5)
        self.ln.bias = torch.nn.Parameter(torch.randn(n, WIDTH))
        self.rms.weight = torch.nn.Parameter(torch.rand(n, WIDTH) + 0.5)

    def forward(self, x, dy):
        return (self.ln(x) * dy[0]).sum() + (self.rms(x) * dy[1]).sum()


class LossModule(torch.nn.Module):
    """TokenNet plus its loss: joint export needs a module that returns a scalar loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return loss_fn(self.net(x), y)


JOINT_OPS = {"layer_norm": 1, "rms_norm": 1, "layer_norm_backward": 1, "rms_norm_backward": 1}


class TestCoreAtenAndJoint(TestCase):
    def test_forward_lowers_to_core_aten(self):
        model = RowNorms()
        ep = torch.export.export(model, row_inputs(4), dynamic_shapes=[{0: Dim("batch", min=2)}] * 3)
        core = ep.run_decompositions(core_aten_decompositions())
        self.assertNotIn("persample", core.graph_module.code)
        self.assertEqual(non_core_ops(core), set())
        core.validate()  # torch.export's verifier
        for n in (3, 7):  # neither is the example batch size
            args = row_inputs(n)
            with torch.no_grad():
                outs = core.module()(*args)
            check_row_norms(self, model, outs, args)

    def test_per_sample_joint_graph_and_its_lowering(self):
        n = 4
        module = PerSampleRowNormLoss(n)
        x, dy = torch.randn(n, TOKENS, WIDTH), torch.randn(2, n, TOKENS, WIDTH)
        joint = torch.export.experimental._export_forward_backward(torch.export.export(module, (x, dy)))
        _check_op_counts(joint.graph_module.code, JOINT_OPS)
        core = joint.run_decompositions(core_aten_decompositions())
        self.assertNotIn("persample", core.graph_module.code)
        self.assertEqual(non_core_ops(core), set())
        core.validate()
        ln, rms = module.ln, module.rms
        ln_call = (x, [WIDTH], ln.weight, ln.bias, ln.eps, dy[0])
        rms_call = (x, [WIDTH], rms.weight, None, rms.eps, dy[1], True)
        expected = {"ln": (reference(*ln_call), stock_loop(*ln_call)),
                    "rms": (reference(*rms_call), stock_loop(*rms_call))}
        eager_loss = module(x, dy).detach()
        # The float64 loss, and stock's in float32 (the scale).
        want_loss = sum((e[0][0] * d.double()).sum() for e, d in zip(expected.values(), dy))
        stock_loss = sum((e[1][0] * d).sum() for e, d in zip(expected.values(), dy))
        for what, program in (("joint ", joint), ("core ATen ", core)):
            loss, grads = _run_joint(program, x, dy)
            if program is joint:  # the ops' own kernels, then the same sums
                self.assertEqual(loss, eager_loss)
            else:  # the decompositions round otherwise
                check_close(loss.reshape(1), want_loss.reshape(1), stock_loss.reshape(1), what + "loss")
            self.assertEqual(set(grads), {"ln.weight", "ln.bias", "rms.weight"})
            for name in ("ln", "rms"):
                ref, stock = expected[name]
                got = (None, None, grads[f"{name}.weight"], grads.get(f"{name}.bias"))
                params = (module.get_parameter(f"{name}.weight"), getattr(getattr(module, name), "bias", None))
                check_results(got, params, [WIDTH], ref, stock, what + name + " ")

    def test_token_net_joint_graph(self):
        # Shared [D] parameters: every gradient of the model, the norms' batch sums of
        # their per-sample rows, against stock's, by the model-level error model.
        model, stock = make_models()
        x, y = batch(4)
        joint = torch.export.experimental._export_forward_backward(
            torch.export.export(LossModule(model), (x, y))
        )
        _check_op_counts(joint.graph_module.code, JOINT_OPS)
        loss, grads = _run_joint(joint, x, y)
        want = copy.deepcopy(stock).double()
        results = {}
        for name, net, inputs in (("stock", stock, x), ("float64", want, x.double())):
            net.zero_grad()
            out = loss_fn(net(inputs), y)
            out.backward()
            results[name] = {"loss": out.detach().reshape(1), **{f"net.{k}": p.grad for k, p in net.named_parameters()}}
        got = {"loss": loss.reshape(1), **grads}
        assert_all_track_stock(got, results["stock"], results["float64"], "joint ")


@unittest.skipIf(MISSING, f"needs the onnx extra ({', '.join(ONNX_EXTRA)}); missing: {MISSING}")
class TestOnnx(TestCase):
    def assert_standard_onnx(self, program):
        # Translated to standard ONNX operators, no custom domain left.
        self.assertEqual({node.domain for node in program.model_proto.graph.node}, {""})

    def test_modules_and_per_sample_params_dynamic_batch(self):
        model = RowNorms().eval()
        program = torch.onnx.export(
            model, row_inputs(4), dynamo=True, dynamic_shapes=[{0: Dim("batch", min=2)}] * 3, verbose=False
        )
        self.assert_standard_onnx(program)
        for n in (2, 5):  # neither is the example batch size
            args = row_inputs(n)
            check_row_norms(self, model, run_onnx(program, args), args)

    def test_exported_program_with_backward_ops(self):
        class ForwardAndBackward(torch.nn.Module):
            """The four ops called directly: outputs, grad_inputs, per-sample gradients."""

            def forward(self, x, w, b, dy):
                out, mean, rstd = torch.ops.persample.layer_norm(x, [WIDTH], w, b, 1e-5)
                ln = torch.ops.persample.layer_norm_backward(dy, x, [WIDTH], mean, rstd, w, [True, True, True])
                rms_out, rms_rstd = torch.ops.persample.rms_norm(x, [WIDTH], w, None)
                rms = torch.ops.persample.rms_norm_backward(dy, x, [WIDTH], rms_rstd, w, [True, True])
                return (out, *ln, rms_out, *rms, rstd, rms_rstd)

        module = ForwardAndBackward()
        ep = torch.export.export(module, (*row_inputs(4)[:3], torch.randn(4, TOKENS, WIDTH)),
                                 dynamic_shapes=[{0: Dim("batch", min=2)}] * 4)
        _check_op_counts(ep.graph_module.code, JOINT_OPS)
        program = torch.onnx.export(ep, dynamo=True, verbose=False)
        self.assert_standard_onnx(program)
        x, w, b = row_inputs(3)
        dy = torch.randn_like(x)
        got = run_onnx(program, (x, w, b, dy))
        ln_rstd, rms_rstd = got[-2:]
        for name, outs, bias, rstd in (("layer_norm", got[:4], b, ln_rstd), ("rms_norm", got[4:7], None, rms_rstd)):
            call = (x, [WIDTH], w, bias, 1e-5 if bias is not None else None, dy, bias is None)
            check_results(outs, (w, bias), [WIDTH], reference(*call), stock_loop(*call), name + " ",
                          rstd=rstd, grad_out=dy)


class TestAOTInductor(TestCase):
    """One package, compiled once for the class (the slow part on two cores), of
    RowNorms: both ops, shared and per-sample parameters, a dynamic batch."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch.manual_seed(0)
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model = RowNorms()
        ep = torch.export.export(cls.model, row_inputs(4), dynamic_shapes=[{0: Dim("batch", min=2)}] * 3)
        cls.package = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(cls.tmp.name, "row_norms.pt2")
        )

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_matches_eager_at_two_batch_sizes(self):
        runner = torch._inductor.aoti_load_package(self.package)
        for n in (3, 7):  # neither is the example batch size
            args = row_inputs(n)
            with torch.no_grad():
                # The ops' own kernels, through the proxy executor: eager's numbers.
                self.assertEqual(runner(*args), list(self.model(*args)))

    def test_ops_run_through_the_proxy_executor(self):
        # Inductor has no lowering for the ops: extern nodes that the C++ runtime hands
        # back to the dispatcher.
        with zipfile.ZipFile(self.package) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith("wrapper.json")]
            nodes = json.loads(archive.read(name))["nodes"]
        targets = collections.Counter(node["node"]["target"] for node in nodes)
        self.assertEqual(targets, {"persample::layer_norm": 3, "persample::rms_norm": 2})


if __name__ == "__main__":
    run_tests()
