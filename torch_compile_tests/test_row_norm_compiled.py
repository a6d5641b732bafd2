"""torch.compile(fullgraph=True) of the row norms, ``persample.layer_norm`` and
``persample.rms_norm``: the recorded forward and backward graphs, the functions with
shared and per-sample weights, a token model's persample.nn.LayerNorm/RMSNorm over
changing batch sizes, ``call_for_per_sample_grads`` on it, torch.func's ``vmap(grad)``
eager and compiled, and error messages. Float32, against float64 per-example loops over
the stock layers, within the error model's bounds (tests/error_model.py).

Inductor compiles are the cost here (seconds per graph on two cores): only the model
tests use it; the function-level tests run AOTAutograd's graphs eagerly."""

import copy
import re
import warnings

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch._dynamo.exc import TorchRuntimeError
from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend, normalize_gm
from torch._inductor.utils import run_and_get_code
from torch.func import functional_call, grad, vmap
from torch.testing._internal.common_utils import TestCase, run_tests

import persample
from tests.error_model import F64, assert_all_track_stock, check_close, grad_input_scale
from torch_compile_tests.models import loss_fn, per_example_grads

N_CLASSES, TOKENS, WIDTH = 3, 5, 8
# Automatic dynamic shapes: a static graph for the first size, a dynamic one for the
# second, reused for the third.
BATCH_SIZES = (4, 6, 9)
FRAMES_PER_SIZE = [1, 2, 2]
NORM_PARAMS = ("ln.weight", "ln.bias", "rms.weight")


class TokenNet(torch.nn.Module):
    """A pre-norm residual block on ``[N, T, D]`` token sequences: an embedding
    Linear, ``h + mlp(LayerNorm(h))``, RMSNorm, the mean over tokens and a Linear head,
    giving ``[N, N_CLASSES]`` logits."""

    def __init__(self, layer_norm=persample.nn.LayerNorm, rms_norm=persample.nn.RMSNorm):
        super().__init__()
        self.embed = torch.nn.Linear(WIDTH, WIDTH)
        self.ln = layer_norm(WIDTH)
        self.mlp = torch.nn.Linear(WIDTH, WIDTH)
        self.rms = rms_norm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, N_CLASSES)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(self.ln(h))
        return self.head(self.rms(h).mean(1))


def make_models():
    """A persample TokenNet and its stock twin (nn.LayerNorm, nn.RMSNorm), same parameters."""
    model = TokenNet()
    with torch.no_grad():
        # The norms start at weight 1, bias 0, which would hide a weight/bias mix-up.
        for name in NORM_PARAMS:
            p = model.get_parameter(name)
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    stock = TokenNet(torch.nn.LayerNorm, torch.nn.RMSNorm)
    stock.load_state_dict(model.state_dict())
    return model, stock


def batch(n):
    return torch.randn(n, TOKENS, WIDTH), torch.randint(0, N_CLASSES, (n,))


def reference_grads(stock, x, y, names=NORM_PARAMS):
    """Per-example gradients ``{name: Tensor[N, *shape]}`` by stock's float32 loop, and
    by the same loop in float64 (the reference)."""
    return (
        per_example_grads(stock, x, y, names),
        per_example_grads(copy.deepcopy(stock).double(), x.double(), y, names),
    )


def stock_row_loop(name, x, w, b, dy, dtype):
    """``(out, grad_input, grad_weight, grad_bias)`` of stock ``F.layer_norm`` /
    ``F.rms_norm`` called on one sample at a time in ``dtype``; parameter gradients
    ``[N, WIDTH]``, one row per sample, whether ``w`` and ``b`` are shared or not."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().to(dtype).requires_grad_()
        ps = [None if p is None else (p[i] if p.dim() == 2 else p).detach().to(dtype).requires_grad_() for p in (w, b)]
        if name == "layer_norm":
            out = F.layer_norm(xi, (WIDTH,), ps[0], ps[1])
        else:
            out = F.rms_norm(xi, (WIDTH,), ps[0])
        leaves = [t for t in (xi, *ps) if t is not None]
        grads = iter(torch.autograd.grad(out, leaves, dy[i : i + 1].to(dtype)))
        rows.append([out.detach(), *(None if t is None else next(grads) for t in (xi, *ps))])
    return [None if r[0] is None else torch.cat(r) if j < 2 else torch.stack(r) for j, r in enumerate(zip(*rows))]


def _row_norm(name, x, w, b):
    """``persample.layer_norm`` or ``persample.rms_norm`` over the last dim of ``x``."""
    if name == "layer_norm":
        return persample.layer_norm(x, x.shape[-1], w, b)
    return persample.rms_norm(x, x.shape[-1], w)


def _record(fn, *args):
    """``fn(*args)`` compiled with fullgraph through AOTAutograd, whose graphs then run
    eagerly; the output and the recording backend."""
    backend = AotEagerAndRecordGraphs()
    with warnings.catch_warnings():
        # torch's own recording backend returns an unboxed function; not ours to fix.
        warnings.filterwarnings("ignore", "Your compiler for AOTAutograd", UserWarning)
        out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return out, backend


def _readable(graph):
    return normalize_gm(graph.print_readable(print_output=False))


class TestCompiledGraphs(TestCase):
    """What AOTAutograd hands the backend: the persample ops, opaque, in both graphs.
    The snapshots are identical on torch 2.13.0 and 2.14.1."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def _graphs(self, name, x, w, b):
        out, backend = _record(lambda x, w, b: _row_norm(name, x, w, b).sum(), x, w, b)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Your compiler for AOTAutograd", UserWarning)
            out.backward()
        self.assertEqual((len(backend.fw_graphs), len(backend.bw_graphs)), (1, 1))
        return _readable(backend.fw_graphs[0]), _readable(backend.bw_graphs[0])

    def test_layer_norm_shared_params_graphs(self):
        x = torch.randn(2, 3, 4, requires_grad=True)
        w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        fw, bw = self._graphs("layer_norm", x, w, b)
        self.assertExpectedInline(fw, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 3, 4]", primals_2: "f32[4]", primals_3: "f32[4]"):
        layer_norm = torch.ops.persample.layer_norm.default(primals_1, [4], primals_2, primals_3);  primals_3 = None
        getitem: "f32[2, 3, 4]" = layer_norm[0]
        getitem_1: "f32[2, 3, 1]" = layer_norm[1]
        getitem_2: "f32[2, 3, 1]" = layer_norm[2];  layer_norm = None

        sum_1: "f32[]" = torch.ops.aten.sum.default(getitem);  getitem = None
        return (sum_1, primals_1, primals_2, getitem_1, getitem_2)
""")
        # Per-sample rows [N, D] from the backward op; a shared [D] weight gets their sum.
        self.assertExpectedInline(bw, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 3, 4]", primals_2: "f32[4]", getitem_1: "f32[2, 3, 1]", getitem_2: "f32[2, 3, 1]", tangents_1: "f32[]"):
        expand: "f32[2, 3, 4]" = torch.ops.aten.expand.default(tangents_1, [2, 3, 4]);  tangents_1 = None

        layer_norm_backward = torch.ops.persample.layer_norm_backward.default(expand, primals_1, [4], getitem_1, getitem_2, primals_2, [True, True, True]);  expand = primals_1 = getitem_1 = getitem_2 = primals_2 = None
        getitem_3: "f32[2, 3, 4]" = layer_norm_backward[0]
        getitem_4: "f32[2, 4]" = layer_norm_backward[1]
        getitem_5: "f32[2, 4]" = layer_norm_backward[2];  layer_norm_backward = None
        sum_2: "f32[4]" = torch.ops.aten.sum.dim_IntList(getitem_4, [0]);  getitem_4 = None
        sum_3: "f32[4]" = torch.ops.aten.sum.dim_IntList(getitem_5, [0]);  getitem_5 = None
        return (getitem_3, sum_2, sum_3)
""")

    def test_rms_norm_per_sample_weight_graphs(self):
        # x needs no gradient: output_mask skips grad_input.
        x = torch.randn(2, 3, 4)
        w = torch.randn(2, 4, requires_grad=True)
        fw, bw = self._graphs("rms_norm", x, w, None)
        self.assertExpectedInline(fw, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 3, 4]", primals_2: "f32[2, 4]"):
        rms_norm = torch.ops.persample.rms_norm.default(primals_1, [4], primals_2)
        getitem: "f32[2, 3, 4]" = rms_norm[0]
        getitem_1: "f32[2, 3, 1]" = rms_norm[1];  rms_norm = None

        sum_1: "f32[]" = torch.ops.aten.sum.default(getitem);  getitem = None
        return (sum_1, primals_1, primals_2, getitem_1)
""")
        # No reduction: the [N, D] gradient is the backward op's own output.
        self.assertExpectedInline(bw, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[2, 3, 4]", primals_2: "f32[2, 4]", getitem_1: "f32[2, 3, 1]", tangents_1: "f32[]"):
        expand: "f32[2, 3, 4]" = torch.ops.aten.expand.default(tangents_1, [2, 3, 4]);  tangents_1 = None

        rms_norm_backward = torch.ops.persample.rms_norm_backward.default(expand, primals_1, [4], getitem_1, primals_2, [False, True]);  expand = primals_1 = getitem_1 = primals_2 = None
        getitem_3: "f32[2, 4]" = rms_norm_backward[1];  rms_norm_backward = None
        return (None, getitem_3)
""")


class TestCompiledFunctions(TestCase):
    """The public functions compiled with shared and per-sample parameters: output and
    gradients against eager and the float64 per-example loop."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def test_shared_and_per_sample_params(self):
        g = torch.Generator().manual_seed(0)
        x, dy = (torch.randn(3, 2, TOKENS, WIDTH, generator=g) for _ in range(2))
        params = {
            "shared": (torch.rand(WIDTH, generator=g) + 0.5, torch.randn(WIDTH, generator=g)),
            "per_sample": (torch.rand(3, WIDTH, generator=g) + 0.5, torch.randn(3, WIDTH, generator=g)),
        }
        for name in ("layer_norm", "rms_norm"):
            for kind, (w0, b0) in params.items():
                with self.subTest(name=name, params=kind):
                    torch._dynamo.reset()
                    b0 = b0 if name == "layer_norm" else None
                    leaves = [t if t is None else t.clone().requires_grad_() for t in (x, w0, b0)]
                    out, _ = _record(lambda x, w, b: _row_norm(name, x, w, b), *leaves)
                    got = [out, *torch.autograd.grad(out, [t for t in leaves if t is not None], dy)]
                    eager_leaves = [t if t is None else t.clone().requires_grad_() for t in (x, w0, b0)]
                    eager = _row_norm(name, *eager_leaves)
                    # The recorded graphs run the eager kernels: the same numbers.
                    self.assertEqual(got, [eager, *torch.autograd.grad(eager, [t for t in eager_leaves if t is not None], dy)])
                    want = stock_row_loop(name, x, w0, b0, dy, F64)
                    stock = stock_row_loop(name, x, w0, b0, dy, torch.float32)
                    self._check(got, want, stock, x, dy, w0, kind)

    def _check(self, got, want, stock, x, dy, w, kind):
        check_close(got[0], want[0], stock[0], "output")
        rstd = (x.double().var(-1, unbiased=False) + 1e-5).rsqrt()
        check_close(got[1], want[1], stock[1], "grad_input", grad_input_scale(dy, rstd, w))
        for what, g, e, s in zip(("grad_weight", "grad_bias"), got[2:], want[2:], stock[2:]):
            if kind == "shared":  # stock's rows summed exactly, then rounded
                e, s = e.sum(0), s.to(F64).sum(0).to(s.dtype)
            check_close(g, e, s, what)


class TestCompiledModel(TestCase):
    """TokenNet under inductor with fullgraph=True (a graph break fails the test)."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()
        torch.manual_seed(0)

    def test_shared_params_over_batch_sizes(self):
        model, stock = make_models()
        eager = copy.deepcopy(model)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        frames = []
        for n in BATCH_SIZES:
            x, y = batch(n)
            want = copy.deepcopy(stock).double()
            results = {}
            for name, fn, m, inputs in (("compiled", compiled, model, x), ("eager", eager, eager, x),
                                        ("stock", stock, stock, x), ("float64", want, want, x.double())):
                m.zero_grad()
                out = fn(inputs)
                loss_fn(out, y).backward()
                # Every parameter: the Linears' gradients flow through the norms' grad_input.
                results[name] = {"out": out, **{k: p.grad for k, p in m.named_parameters()}}
            for peer in ("eager", "stock"):
                assert_all_track_stock(results["compiled"], results[peer], results["float64"], f"N={n} vs {peer}: ")
            frames.append(counter.frame_count)
        self.assertEqual(frames, FRAMES_PER_SIZE)

    def test_call_for_per_sample_grads(self):
        model, stock = make_models()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        frames = []
        for n in BATCH_SIZES:
            x, y = batch(n)
            model.zero_grad()
            loss_fn(persample.call_for_per_sample_grads(compiled)(x), y).backward()
            stock_rows, want = reference_grads(stock, x, y)
            got = {k: model.get_parameter(k).grad_sample for k in NORM_PARAMS}
            assert_all_track_stock(got, stock_rows, want, f"N={n} grad_sample ")
            sums = {k: model.get_parameter(k).grad for k in NORM_PARAMS}
            assert_all_track_stock(sums, {k: g.sum(0) for k, g in stock_rows.items()},
                                   {k: g.sum(0) for k, g in want.items()}, f"N={n} grad ")
            self.assertFalse(hasattr(model.embed.weight, "grad_sample"))
            frames.append(counter.frame_count)
        # One static graph, one dynamic recompile, then reuse: never a graph per batch.
        self.assertEqual(frames, FRAMES_PER_SIZE)


class TestTorchFunc(TestCase):
    """``vmap(grad)`` over ``functional_call``: every parameter's per-sample gradient,
    eager and compiled, against the float64 per-example loop. Eager, the ops run (their
    vmap rules fold the vmapped dim into N); compiled, the row norms lower to stock's
    (``persample.ops.functional.aten_row_norm``), which inductor fuses."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()
        torch.manual_seed(0)

    def test_vmap_grad_eager_and_compiled(self):
        model, stock = make_models()
        params = {k: p.detach() for k, p in model.named_parameters()}

        def loss(params, x, y):
            return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        x, y = batch(5)
        stock_rows, want = reference_grads(stock, x, y, tuple(params))
        with _Calls() as calls:
            eager = per_sample(params, x, y)
        assert_all_track_stock(eager, stock_rows, want, "eager ")
        for op in ("layer_norm", "rms_norm", "layer_norm_backward", "rms_norm_backward"):
            self.assertIn(f"persample.{op}.default", calls)
        compiled = torch.compile(per_sample, fullgraph=True)
        got, (code, *_) = run_and_get_code(compiled, params, x, y)
        assert_all_track_stock(got, stock_rows, want, "compiled ")
        self.assertNotIn("persample", code)

    def test_lowering_with_per_sample_params(self):
        """Compiled ``grad`` with ``[N, D]`` parameters: the lowering applies them to
        stock's output; output and per-sample gradients as the ops give them eagerly."""
        x = torch.randn(4, 3, WIDTH) * 2 + 1
        w, b = torch.rand(4, WIDTH) + 0.5, torch.randn(4, WIDTH)
        r = torch.randn(4, 3, WIDTH)

        def loss(w, b):
            return (persample.layer_norm(x, WIDTH, w, b) * r).sum() + (persample.rms_norm(x, WIDTH, w) * r).sum()

        backend = AotEagerAndRecordGraphs()
        got = torch.compile(grad(loss, argnums=(0, 1)), fullgraph=True, backend=backend)(w, b)
        self.assertNotIn("persample", backend.graphs[0].code)
        leaves = [t.clone().requires_grad_() for t in (w, b)]
        want = torch.autograd.grad(loss(*leaves), leaves)  # the ops, eagerly
        ref = [t.double().requires_grad_() for t in (w, b)]
        x64, r64 = x.double(), r.double()
        ref_loss = (F.layer_norm(x64, [WIDTH]) * ref[0][:, None] + ref[1][:, None]).mul(r64).sum() + \
            (F.rms_norm(x64, [WIDTH], eps=torch.finfo(torch.float32).eps) * ref[0][:, None]).mul(r64).sum()
        truth = torch.autograd.grad(ref_loss, ref)
        for name, g, op_g, t in zip(("weight", "bias"), got, want, truth):
            self.assertEqual(g.shape, (4, WIDTH))
            check_close(g, t, op_g, f"lowered per-sample grad_{name}")


class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops dispatched while active."""

    def __enter__(self):
        self.calls = []
        super().__enter__()
        return self.calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _bad_layer_norm(x, w, eps):
    return persample.layer_norm(x, WIDTH, w, None, eps)


def _bad_rms_norm(x, w, eps):
    return persample.rms_norm(x, WIDTH, w, eps)


BAD_CALLS = {
    "no sample dim": (_bad_layer_norm, (torch.randn(WIDTH), None, 1e-5)),
    "wrong trailing size": (_bad_rms_norm, (torch.randn(2, 3, WIDTH + 1), None, None)),
    "per-sample weight with wrong N": (_bad_layer_norm, (torch.randn(4, 3, WIDTH), torch.randn(3, WIDTH), 1e-5)),
    "integer input": (_bad_rms_norm, (torch.ones(2, 3, WIDTH, dtype=torch.int64), None, None)),
    "negative eps": (_bad_rms_norm, (torch.randn(2, 3, WIDTH), None, -1.0)),
}


class TestCompiledErrors(TestCase):
    """Dynamo's fake-tensor trace runs the fake impls' checks: the eager message,
    wrapped in TorchRuntimeError, which shows the call was refused while tracing.
    backend="eager": tracing fails before any backend runs."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()

    def _eager_message(self, fn, args):
        with self.assertRaises(RuntimeError) as caught:
            fn(*args)
        self.assertRegex(str(caught.exception), r"^persample\.(layer|rms)_norm: ")
        return str(caught.exception)

    def test_bad_inputs_match_eager_message(self):
        for name, (fn, args) in BAD_CALLS.items():
            with self.subTest(name):
                torch._dynamo.reset()
                message = self._eager_message(fn, args)
                with self.assertRaisesRegex(TorchRuntimeError, re.escape(message)):
                    torch.compile(fn, backend="eager", fullgraph=True)(*args)

    def test_bad_input_after_dynamic_recompile_names_sizes(self):
        compiled = torch.compile(_bad_rms_norm, backend="eager", fullgraph=True)
        for n in (4, 5):  # the second size makes N dynamic
            compiled(torch.randn(n, 3, WIDTH), torch.randn(n, WIDTH), None)
        args = (torch.randn(5, 3, WIDTH), torch.randn(3, WIDTH), None)
        message = self._eager_message(_bad_rms_norm, args)
        self.assertIn("N=3 rows but input has batch size N=5", message)
        with self.assertRaisesRegex(TorchRuntimeError, re.escape(message)):
            compiled(*args)


if __name__ == "__main__":
    run_tests()
