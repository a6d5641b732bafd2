"""torch.compile of persample.group_norm: full graphs, dynamic batch sizes, the
recorded forward/backward graphs, error messages and torch.func transforms."""

import re
import warnings

import torch
from torch._dynamo.exc import TorchRuntimeError
from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend, normalize_gm
from torch.func import functional_call, grad, vmap
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from torch_compile_tests.models import (
    batch,
    loss_fn,
    make_models,
    per_example_grads,
    per_sample_leaves,
)

# Automatic dynamic shapes: the first size compiles a static graph and the second a
# dynamic one, which the last two must reuse: frame counts 1, 2, 2, 2.
BATCH_SIZES = (4, 6, 9, 13)
FRAMES_PER_SIZE = [1, 2, 2, 2]


class TestCompiledModel(TestCase):
    """The small conv + GroupNorm model under inductor with fullgraph=True, so that any
    graph break fails the test."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def test_per_sample_grads_over_batch_sizes(self):
        # float64, so that compiled, eager and the per-example loop agree to 1e-7.
        model, stock = make_models(torch.float64)

        def loss(x, y, w, b):
            return loss_fn(functional_call(model, {"gn.weight": w, "gn.bias": b}, (x,)), y)

        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(loss, backend=counter, fullgraph=True)
        frames = []
        for n in BATCH_SIZES:
            x, y = batch(n, torch.float64)
            expected = per_example_grads(stock, x, y)
            for fn in (compiled, loss):
                w, b = per_sample_leaves(model.gn, n)
                fn(x, y, w, b).backward()
                self.assertEqual(w.grad, expected["gn.weight"])
                self.assertEqual(b.grad, expected["gn.bias"])
            frames.append(counter.frame_count)
        self.assertEqual(frames, FRAMES_PER_SIZE)

    def test_shared_params_grads_over_batch_sizes(self):
        model, stock = make_models(torch.float64)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        frames = []
        for n in BATCH_SIZES:
            x, y = batch(n, torch.float64)
            model.zero_grad()
            stock.zero_grad()
            out = compiled(x)
            expected = stock(x)
            self.assertEqual(out, expected)
            loss_fn(out, y).backward()
            loss_fn(expected, y).backward()
            # Every parameter: conv's gradient flows through group_norm's grad_input.
            self.assertEqual(
                {k: p.grad for k, p in model.named_parameters()},
                {k: p.grad for k, p in stock.named_parameters()},
            )
            frames.append(counter.frame_count)
        self.assertEqual(frames, FRAMES_PER_SIZE)


class TestCompiledGraphs(TestCase):
    """What AOTAutograd hands the backend: the persample ops, opaque, in both graphs.
    The snapshots are identical on torch 2.13.0 and 2.14.1."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def _graphs(self, x, w, b):
        backend = AotEagerAndRecordGraphs()

        def f(x, w, b):
            return persample.group_norm(x, 2, w, b).sum()

        with warnings.catch_warnings():
            # torch's own recording backend returns an unboxed function; not ours to fix.
            warnings.filterwarnings("ignore", "Your compiler for AOTAutograd", UserWarning)
            torch.compile(f, backend=backend, fullgraph=True, dynamic=False)(x, w, b).backward()
        self.assertEqual((len(backend.fw_graphs), len(backend.bw_graphs)), (1, 1))
        return (
            normalize_gm(backend.fw_graphs[0].print_readable(print_output=False)),
            normalize_gm(backend.bw_graphs[0].print_readable(print_output=False)),
        )

    def test_shared_weight_graphs(self):
        x = torch.randn(2, 4, 3, requires_grad=True)
        w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        fw, bw = self._graphs(x, w, b)
        self.assertExpectedInline(
            fw,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 4, 3]", primals_2: "f32[4]", primals_3: "f32[4]"):
        group_norm = torch.ops.persample.group_norm.default(primals_1, 2, primals_2, primals_3);  primals_3 = None
        getitem: "f32[2, 4, 3]" = group_norm[0]
        getitem_1: "f32[2, 2]" = group_norm[1]
        getitem_2: "f32[2, 2]" = group_norm[2];  group_norm = None

        sum_1: "f32[]" = torch.ops.aten.sum.default(getitem);  getitem = None
        return (sum_1, primals_1, primals_2, getitem_1, getitem_2)
""",
        )
        # The backward op gives per-sample rows; a shared [C] weight gets their sum.
        self.assertExpectedInline(
            bw,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 4, 3]", primals_2: "f32[4]", getitem_1: "f32[2, 2]", getitem_2: "f32[2, 2]", tangents_1: "f32[]"):
        expand: "f32[2, 4, 3]" = torch.ops.aten.expand.default(tangents_1, [2, 4, 3]);  tangents_1 = None

        group_norm_backward = torch.ops.persample.group_norm_backward.default(expand, primals_1, getitem_1, getitem_2, primals_2, 2, [True, True, True]);  expand = primals_1 = getitem_1 = getitem_2 = primals_2 = None
        getitem_3: "f32[2, 4, 3]" = group_norm_backward[0]
        getitem_4: "f32[2, 4]" = group_norm_backward[1]
        getitem_5: "f32[2, 4]" = group_norm_backward[2];  group_norm_backward = None
        sum_2: "f32[4]" = torch.ops.aten.sum.dim_IntList(getitem_4, [0]);  getitem_4 = None
        sum_3: "f32[4]" = torch.ops.aten.sum.dim_IntList(getitem_5, [0]);  getitem_5 = None
        return (getitem_3, sum_2, sum_3)
""",
        )

    def test_per_sample_weight_graphs(self):
        # x needs no gradient: output_mask skips grad_input, as in the last layer of a
        # DP-SGD model that only wants parameter gradients.
        x = torch.randn(2, 4, 3)
        w, b = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
        fw, bw = self._graphs(x, w, b)
        self.assertExpectedInline(
            fw,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 4, 3]", primals_2: "f32[2, 4]", primals_3: "f32[2, 4]"):
        group_norm = torch.ops.persample.group_norm.default(primals_1, 2, primals_2, primals_3);  primals_3 = None
        getitem: "f32[2, 4, 3]" = group_norm[0]
        getitem_1: "f32[2, 2]" = group_norm[1]
        getitem_2: "f32[2, 2]" = group_norm[2];  group_norm = None

        sum_1: "f32[]" = torch.ops.aten.sum.default(getitem);  getitem = None
        return (sum_1, primals_1, primals_2, getitem_1, getitem_2)
""",
        )
        # No reduction: the [N, C] gradients are the backward op's own outputs.
        self.assertExpectedInline(
            bw,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 4, 3]", primals_2: "f32[2, 4]", getitem_1: "f32[2, 2]", getitem_2: "f32[2, 2]", tangents_1: "f32[]"):
        expand: "f32[2, 4, 3]" = torch.ops.aten.expand.default(tangents_1, [2, 4, 3]);  tangents_1 = None

        group_norm_backward = torch.ops.persample.group_norm_backward.default(expand, primals_1, getitem_1, getitem_2, primals_2, 2, [False, True, True]);  expand = primals_1 = getitem_1 = getitem_2 = primals_2 = None
        getitem_4: "f32[2, 4]" = group_norm_backward[1]
        getitem_5: "f32[2, 4]" = group_norm_backward[2];  group_norm_backward = None
        return (None, getitem_4, getitem_5)
""",
        )


def _group_norm(x, w, eps):
    return persample.group_norm(x, 2, w, None, eps)


BAD_CALLS = {
    "channels not divisible": (torch.randn(4, 5, 3), None, 1e-5),
    "per-sample weight with wrong N": (torch.randn(4, 6, 3), torch.randn(3, 6), 1e-5),
    "integer input": (torch.ones(4, 6, 3, dtype=torch.int64), None, 1e-5),
    "negative eps": (torch.randn(4, 6, 3), None, -1.0),
}


class TestCompiledErrors(TestCase):
    """The fake impl runs the kernels' checks, so dynamo's fake-tensor trace fails with
    the eager message, wrapped in TorchRuntimeError (a RuntimeError). That wrapper shows
    the call was refused while tracing: had the fake impl let it through, the real
    kernel would raise the same text unwrapped. Tracing fails before any backend runs,
    so backend="eager" takes the same path as inductor without its compile time."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def _eager_message(self, *args):
        with self.assertRaises(RuntimeError) as caught:
            _group_norm(*args)
        self.assertTrue(str(caught.exception).startswith("persample.group_norm: "))
        return str(caught.exception)

    def test_bad_inputs_match_eager_message(self):
        for name, args in BAD_CALLS.items():
            with self.subTest(name):
                torch._dynamo.reset()
                message = self._eager_message(*args)
                compiled = torch.compile(_group_norm, backend="eager", fullgraph=True)
                with self.assertRaisesRegex(TorchRuntimeError, re.escape(message)):
                    compiled(*args)

    # Under dynamic shapes a message must name the sizes, not symbols ("N=s15").
    def test_bad_input_after_dynamic_recompile_names_sizes(self):
        compiled = torch.compile(_group_norm, backend="eager", fullgraph=True)
        for n in (4, 5):  # the second size makes N dynamic
            compiled(torch.randn(n, 6, 3), torch.randn(n, 6), 1e-5)
        args = (torch.randn(5, 6, 3), torch.randn(3, 6), 1e-5)
        message = self._eager_message(*args)
        with self.assertRaisesRegex(TorchRuntimeError, re.escape(message)):
            compiled(*args)


class TestCompiledTorchFunc(TestCase):
    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def test_vmap_grad_matches_eager_and_per_example_loop(self):
        model, stock = make_models(torch.float64)
        params = {k: p.detach() for k, p in model.named_parameters()}

        def loss(params, x, y):
            return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        x, y = batch(5, torch.float64)
        compiled = torch.compile(per_sample, fullgraph=True)(params, x, y)
        self.assertEqual(compiled, per_sample(params, x, y))
        self.assertEqual(compiled, per_example_grads(stock, x, y, names=tuple(params)))


if __name__ == "__main__":
    run_tests()
