"""ONNX export of persample models with torch.onnx.export(..., dynamo=True) and no extra
arguments, run in onnxruntime against eager: ranks 3-5, shared and per-sample
parameters, a dynamic batch, an ExportedProgram holding both ops."""

import importlib.util
import unittest

import numpy as np
import torch
from torch.export import Dim
from torch.testing._internal.common_utils import TestCase, run_tests

import persample  # noqa: F401  (registers the ops and their ONNX decomposition)
from torch_compile_tests.test_core_aten import Norms, norms_inputs

ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
MISSING = [name for name in ONNX_EXTRA if importlib.util.find_spec(name) is None]


def run_onnx(program, args):
    """Outputs of ``program`` (a torch.onnx.ONNXProgram) run by onnxruntime on CPU."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(program.model_proto)
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feeds)]


class ForwardAndBackward(torch.nn.Module):
    """Both ops called directly: output, grad_input and per-sample parameter gradients."""

    def forward(self, x, w, b, dy):
        out, mean, rstd = torch.ops.persample.group_norm(x, 2, w, b, 1e-5)
        grads = torch.ops.persample.group_norm_backward(dy, x, mean, rstd, w, 2, [True, True, True])
        return (out, *grads)


@unittest.skipIf(MISSING, f"needs the onnx extra ({', '.join(ONNX_EXTRA)}); missing: {MISSING}")
class TestOnnx(TestCase):
    def assert_standard_onnx(self, program):
        # Translated to standard ONNX operators, no custom domain left.
        self.assertEqual({node.domain for node in program.model_proto.graph.node}, {""})

    def test_layers_ranks_params_and_dynamic_batch(self):
        model = Norms().eval()
        batch = Dim("batch", min=2)
        program = torch.onnx.export(
            model, norms_inputs(4), dynamo=True, dynamic_shapes=[{0: batch}] * 5, verbose=False
        )
        self.assert_standard_onnx(program)
        for n in (2, 5):  # neither is the example batch size
            args = norms_inputs(n)
            with torch.no_grad():
                self.assertEqual(run_onnx(program, args), list(model(*args)))
        # Only the ONNX export decomposes: torch.export still keeps the op.
        ep = torch.export.export(model, norms_inputs(4))
        self.assertIn("torch.ops.persample.group_norm.default", ep.graph_module.code)

    def test_exported_program_with_both_ops(self):
        module = ForwardAndBackward()

        def inputs(n):
            x = torch.randn(n, 6, 2, 3, 2)
            return x, torch.rand(n, 6) + 0.5, torch.randn(n, 6), torch.randn_like(x)

        batch = Dim("batch", min=2)
        ep = torch.export.export(module, inputs(4), dynamic_shapes=[{0: batch}] * 4)
        self.assertIn("torch.ops.persample.group_norm_backward.default", ep.graph_module.code)
        program = torch.onnx.export(ep, dynamo=True, verbose=False)
        self.assert_standard_onnx(program)
        args = inputs(3)
        self.assertEqual(run_onnx(program, args), list(module(*args)))


if __name__ == "__main__":
    run_tests()
