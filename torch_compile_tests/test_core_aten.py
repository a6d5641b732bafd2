"""The persample ops' ATen decompositions (persample/export.py): in eager against the
ops' kernels and the float64 per-example reference, then lowering exported programs,
forward and joint forward-backward, to core ATen."""

import re

import torch
import torch.export.experimental  # torch.export does not import it itself
from torch.export import Dim
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from persample.export import (
    core_aten_decompositions,
    group_norm_backward_decomposition,
    group_norm_decomposition,
)
from tests.samples import (
    CASES,
    TOL,
    backward_sample_inputs,
    group_norm_backward_op,
    group_norm_op,
    make_input,
    make_param,
    reference,
    sample_inputs,
    stock_loop,
)
from tests.error_model import check_close, grad_input_scale
from torch_compile_tests.test_export import _run_joint

FORWARD_OP = "torch.ops.persample.group_norm.default"
BACKWARD_OP = "torch.ops.persample.group_norm_backward.default"


def _significant_strides(t):
    # Strides of size-1 dimensions say nothing about the layout (ops/group_norm/layout.py).
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


class TestDecompositionsEager(TestCase):
    """The decompositions are plain functions of tensors: run them on real ones."""

    def assert_same_result(self, got, expected, **tol):
        for g, e in zip(got, expected, strict=True):
            self.assertEqual(g.shape, e.shape)
            self.assertEqual(g.dtype, e.dtype)
            self.assertEqual(_significant_strides(g), _significant_strides(e))
            self.assertEqual(g, e, **tol)

    def test_forward_matches_op_and_reference(self):
        # Ranks 2-5, channels_last, None / [C] / [N, C] / expanded params, eps = 0.
        for i, (x, groups, w, b, eps) in enumerate(sample_inputs("cpu", requires_grad=False)):
            with self.subTest(sample=i, shape=tuple(x.shape)):
                out = group_norm_decomposition(x, groups, w, b, eps)
                self.assert_same_result(out, group_norm_op(x, groups, w, b, eps))
                args = (x, groups, w, b, eps, torch.zeros_like(x))
                check_close(out[0], reference(*args)[0], stock_loop(*args)[0], "output")

    def test_reduced_precision_dtypes(self):
        # fp16/bf16 input, with fp32 or same-dtype params: output in the input's dtype,
        # statistics in fp32, as the op gives them.
        for dtype in (torch.float16, torch.bfloat16):
            for param_dtype in (dtype, torch.float32):
                samples = sample_inputs(
                    "cpu", requires_grad=False, dtype=dtype, param_dtype=param_dtype
                )
                for i, args in enumerate(samples):
                    with self.subTest(dtype=dtype, param_dtype=param_dtype, sample=i):
                        out = group_norm_decomposition(*args)
                        self.assertEqual(out[1].dtype, torch.float32)
                        self.assert_same_result(out, group_norm_op(*args), **TOL[dtype])

    def test_backward_matches_op_and_reference(self):
        # Every output_mask (cycled), stride-0 grad_outs, the CASES' eps for the reference.
        samples = backward_sample_inputs("cpu", requires_grad=False)
        for i, (case, args) in enumerate(zip(CASES, samples, strict=True)):
            grad_out, x, mean, rstd, w, groups, mask = args
            with self.subTest(sample=i, shape=tuple(x.shape), mask=mask):
                got = group_norm_backward_decomposition(*args, case[-1])
                # Two fp32 formulas: they differ by more than rounding where groups
                # are tiny (2 elements) and cancel.
                op_grads = group_norm_backward_op(*args, case[-1])
                self.assert_same_result(got, op_grads, **TOL[torch.float32])
                args = (x, groups, w, None, case[-1], grad_out)
                expected, stock = reference(*args)[1:], stock_loop(*args)[1:]
                for name, g, e, s, keep in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, stock, mask):
                    if keep:
                        scale = grad_input_scale(grad_out, rstd, w) if name == "grad_input" else 0.0
                        check_close(g, e, s, name, scale)
                    else:
                        self.assertEqual(g.shape, (0,))

    def test_reduced_precision_backward_dtypes(self):
        for dtype in (torch.float16, torch.bfloat16):
            samples = backward_sample_inputs("cpu", requires_grad=False, dtype=dtype)
            for i, args in enumerate(samples):
                with self.subTest(dtype=dtype, sample=i):
                    got = group_norm_backward_decomposition(*args)
                    self.assert_same_result(got, group_norm_backward_op(*args), **TOL[dtype])

    def test_empty_inputs(self):
        # No samples, and samples with no elements per group: the kernels' zero statistics.
        for shape in ((0, 4, 3), (2, 4, 0)):
            x = make_input(shape)
            w, b = make_param("per_sample", shape[0], 4), make_param("shared", shape[0], 4)
            with self.subTest(shape=shape):
                out = group_norm_decomposition(x, 2, w, b)
                self.assert_same_result(out, group_norm_op(x, 2, w, b))
                grads = (torch.randn(shape), x, out[1], out[2], w, 2, [True, True, True])
                self.assert_same_result(
                    group_norm_backward_decomposition(*grads), group_norm_backward_op(*grads)
                )

    def test_bad_input_raises_the_ops_error(self):
        x = torch.randn(4, 6, 3)
        bad = {
            "channels not divisible": (x, 4, None, None, 1e-5),
            "per-sample weight with wrong N": (x, 2, torch.randn(3, 6), None, 1e-5),
            "negative eps": (x, 2, None, None, -1.0),
        }
        for name, args in bad.items():
            with self.subTest(name):
                with self.assertRaises(RuntimeError) as op_error:
                    group_norm_op(*args)
                with self.assertRaisesRegex(RuntimeError, re.escape(str(op_error.exception))):
                    group_norm_decomposition(*args)


class Norms(torch.nn.Module):
    """Ranks 3-5 with shared, per-sample, mixed and no parameters."""

    def __init__(self):
        super().__init__()
        self.gn3 = persample.nn.GroupNorm(2, 6)
        self.gn5 = persample.nn.GroupNorm(3, 6, eps=1e-3, affine=False)
        with torch.no_grad():  # not 1 and 0, which would hide a weight/bias mix-up
            self.gn3.weight.uniform_(0.5, 1.5)
            self.gn3.bias.normal_()

    def forward(self, x3, x4, x5, w, b):
        return (
            self.gn3(x3),
            persample.group_norm(x4, 3, w, b),
            persample.group_norm(x4, 2, w, self.gn3.bias),
            self.gn5(x5),
        )


def norms_inputs(n):
    return (
        torch.randn(n, 6, 7),
        torch.randn(n, 6, 3, 5),
        torch.randn(n, 6, 2, 3, 2),
        torch.rand(n, 6) + 0.5,
        torch.randn(n, 6),
    )


def non_core_ops(ep):
    """The ATen ops in ``ep``'s graph that are not core ATen, and any persample op."""
    return {
        str(node.target)
        for node in ep.graph.nodes
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and torch.Tag.core not in node.target.tags
    }


class PerSampleNormLoss(torch.nn.Module):
    """A persample GroupNorm with [N, C] parameters and the loss sum(y * dy): the joint
    graph's parameter gradients are then the per-sample gradients for ``dy``."""

    def __init__(self, n, c, groups):
        super().__init__()
        self.gn = persample.nn.GroupNorm(groups, c).double()
        self.gn.weight = torch.nn.Parameter(torch.rand(n, c, dtype=torch.float64) + 0.5)
        self.gn.bias = torch.nn.Parameter(torch.randn(n, c, dtype=torch.float64))

    def forward(self, x, dy):
        return (self.gn(x) * dy).sum()


class TestCoreAtenLowering(TestCase):
    def test_forward_lowers_to_core_aten(self):
        model = Norms().eval()
        batch = Dim("batch", min=2)
        ep = torch.export.export(model, norms_inputs(4), dynamic_shapes=[{0: batch}] * 5)
        self.assertIn(FORWARD_OP, ep.graph_module.code)
        # What a default call does: core ATen for everything but the persample ops,
        # which keep their kernels.
        self.assertIn(FORWARD_OP, ep.run_decompositions().graph_module.code)
        core = ep.run_decompositions(core_aten_decompositions())
        self.assertNotIn("persample", core.graph_module.code)
        self.assertEqual(non_core_ops(core), set())
        core.validate()  # torch.export's verifier
        for n in (3, 7):  # neither is the example batch size
            args = norms_inputs(n)
            with torch.no_grad():
                self.assertEqual(core.module()(*args), ep.module()(*args))
                self.assertEqual(core.module()(*args), model(*args))

    def test_joint_graph_lowers_with_per_sample_grads(self):
        n, c, groups = 4, 6, 3
        module = PerSampleNormLoss(n, c, groups)
        x = torch.randn(n, c, 3, 5, dtype=torch.float64)
        dy = torch.randn_like(x)
        joint = torch.export.experimental._export_forward_backward(
            torch.export.export(module, (x, dy))
        )
        self.assertIn(FORWARD_OP, joint.graph_module.code)
        self.assertIn(BACKWARD_OP, joint.graph_module.code)
        core = joint.run_decompositions(core_aten_decompositions())
        self.assertNotIn("persample", core.graph_module.code)
        self.assertEqual(non_core_ops(core), set())
        core.validate()
        loss, grads = _run_joint(core, x, dy)
        unlowered_loss, unlowered_grads = _run_joint(joint, x, dy)
        self.assertEqual(loss, unlowered_loss)
        self.assertEqual(grads, unlowered_grads)
        out, _, gw, gb = reference(x, groups, module.gn.weight, module.gn.bias, 1e-5, dy)
        self.assertEqual(loss, (out * dy).sum())
        self.assertEqual(grads["gn.weight"], gw)
        self.assertEqual(grads["gn.bias"], gb)


if __name__ == "__main__":
    run_tests()
