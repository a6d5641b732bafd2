"""Property-based tests: random GroupNorm problems (tests/strategies.py) against the
float64 per-example loop over stock ``torch.group_norm``, on every path a call can take.

float64 must match tightly. In lower precisions (fp32 included) the error of each
result may be at most twice stock ATen's error on the same per-example problem in the
same dtype, plus a few units in the last place; stock's error is measured here, on the
same rounded inputs.
"""

import contextlib
import itertools
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import persample
from persample.ops.group_norm import eager
import error_model
from error_model import check_close, check_statistics
from samples import group_norm_backward_op, group_norm_op, reference, stock_loop
from strategies import F32, F64, arrange, calls, examples, layouts

MASKS = [list(m) for m in itertools.product((False, True), repeat=3)]
PATHS = [
    pytest.param("cpp", marks=pytest.mark.skipif(eager.LIBRARY is None, reason="C++ library not loaded")),
    "python",
]


@contextlib.contextmanager
def kernel_path(path):
    """``cpp``: as installed (the C++ library serves what it handles). ``python``: the
    public op's Python kernels alone, as without the library."""
    if path == "python":
        with mock.patch.multiple(eager, _op=None, _cpu_backward=None, _cpu_forward=None):
            yield
    else:
        yield


def canonical(t):
    """A dense contiguous copy with canonical strides: stock ATen crashes, or reads the
    wrong layout, when input and grad_out look like different memory formats, which
    ``contiguous()`` allows for tensors with size-1 dims."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def significant_strides(t):
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def output_scale(call, rstd):
    """For fp16/bf16 input: |x| * rstd * |weight|, the size of ``x * (rstd * weight)``.
    The op keeps fp32 statistics, so it runs ATen's mixed-dtype kernels (as stock does
    for fp32 parameters), which normalise as ``x * scale + shift`` in fp32; where a
    group is one element or nearly constant, rstd is huge and so is that rounding, while
    stock's all-fp16 path, the comparison when parameters are absent, avoids it."""
    if call.x.dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    w = 1.0 if call.weight is None else max(1.0, call.weight.abs().max().item())
    return call.x.abs().max().item() * rstd.abs().max().item() * w


def grad_input_scale(call, rstd):
    return error_model.grad_input_scale(call.grad_out, rstd, call.weight)


def stock_per_example(call):
    return stock_loop(call.x, call.groups, call.weight, call.bias, call.eps, call.grad_out)


def stock_param_sums(call, stock_rows):
    """Stock's batch-summed gradient of each ``[C]`` parameter: from one full-batch
    ``torch.group_norm`` (fp32 sums, one rounding) when both parameters are ``[C]`` or
    absent; else the per-example rows summed exactly, then rounded."""
    if all(p is None or p.dim() == 1 for p in (call.weight, call.bias)):
        x = canonical(call.x)
        leaves = [None if p is None else p.detach().clone().requires_grad_() for p in (call.weight, call.bias)]
        wanted = [p for p in leaves if p is not None]
        if not wanted:
            return [None, None]
        # Ones for an absent weight: torch 2.13's backward fails with a bias and no
        # weight ("tensor does not have a device"; fixed in 2.14).
        weight = leaves[0] if leaves[0] is not None else torch.ones_like(leaves[1])
        y = torch.group_norm(x, call.groups, weight, leaves[1], call.eps)
        grads = iter(torch.autograd.grad(y, wanted, canonical(call.grad_out)))
        return [None if p is None else next(grads) for p in leaves]
    return [None if p is None else rows.to(F64).sum(0).to(rows.dtype)
            for p, rows in zip((call.weight, call.bias), stock_rows)]


@pytest.mark.parametrize("path", PATHS)
@examples(50)
@given(call=calls())
def test_autograd_matches_reference(path, call):
    leaves = [None if t is None else t.detach().requires_grad_(r)
              for t, r in zip((call.x, call.weight, call.bias), call.requires_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with kernel_path(path):
        y = persample.group_norm(leaves[0], call.groups, leaves[1], leaves[2], call.eps)
        grads = iter(torch.autograd.grad(y, wanted, call.grad_out) if wanted else ())
    grads = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    ref = reference(call.x, call.groups, call.weight, call.bias, call.eps, call.grad_out)
    stock = stock_per_example(call)
    check_close(y, ref[0], stock[0], "output", output_scale(call, stock_rstd(call)))
    stock_y = torch.group_norm(call.x, call.groups, None, None, call.eps)
    assert significant_strides(y) == significant_strides(stock_y), "output layout"
    if grads[0] is not None:
        check_close(grads[0], ref[1], stock[1], "grad_input", grad_input_scale(call, stock_rstd(call)))
        assert significant_strides(grads[0]) == significant_strides(stock_grad_input(call)), "grad_input layout"
    sums = stock_param_sums(call, stock[2:])
    for name, p, g, rows, stock_rows, stock_sum in zip(
        ("weight", "bias"), leaves[1:], grads[1:], ref[2:], stock[2:], sums
    ):
        if g is None:
            continue
        assert g.dtype == p.dtype and g.shape == p.shape, name
        if p.dim() == 2:
            check_close(g, rows, stock_rows, f"per-sample grad_{name}")
        else:
            check_close(g, rows.sum(0), stock_sum, f"summed grad_{name}")


def stock_rstd(call):
    n, c = call.x.shape[:2]
    return (call.x.to(F64).reshape(n, call.groups, -1).var(-1, unbiased=False) + call.eps).rsqrt()


def stock_grad_input(call):
    """Stock's grad_input for this input (its layout is what is compared)."""
    x = call.x.detach().requires_grad_()
    y = torch.group_norm(x, call.groups, None, None, call.eps)
    return torch.autograd.grad(y, x, torch.ones_like(y))[0]


@pytest.mark.parametrize("path", PATHS)
@examples(50)
@given(call=calls())
def test_ops_match_reference_and_fakes(path, call):
    x, w, b, go = (None if t is None else t.detach() for t in (call.x, call.weight, call.bias, call.grad_out))
    with kernel_path(path):
        fwd = group_norm_op(x, call.groups, w, b, call.eps)
        bwd = [group_norm_backward_op(go, x, fwd[1], fwd[2], w, call.groups, m, call.eps) for m in MASKS]
    ref = reference(x, call.groups, w, b, call.eps, go)
    stock = stock_per_example(call)
    check_close(fwd[0], ref[0], stock[0], "output", output_scale(call, fwd[2]))
    check_statistics(call.x, call.groups, call.eps, fwd[1], fwd[2])
    for mask, grads in zip(MASKS, bwd):
        for name, wanted, g, want, stock_g in zip(
            ("grad_input", "grad_weight", "grad_bias"), mask, grads, ref[1:], stock[1:]
        ):
            if wanted:
                scale = grad_input_scale(call, fwd[2]) if name == "grad_input" else 0.0
                check_close(g, want, stock_g, f"{name} with output_mask {mask}", scale)
            else:
                assert g.shape == (0,), f"masked {name} with output_mask {mask}"
    check_fakes(call, fwd, bwd)


def check_fakes(call, fwd, bwd):
    """The fake implementations' shapes, dtypes and significant strides (sizes > 1), on
    fake copies of the same tensors, against the kernels' results."""
    real = [None if t is None else t.detach()
            for t in (call.x, call.weight, call.bias, call.grad_out, fwd[1], fwd[2])]
    with FakeTensorMode() as mode:
        x, w, b, go, mean, rstd = (None if t is None else mode.from_tensor(t) for t in real)
        fake_fwd = group_norm_op(x, call.groups, w, b, call.eps)
        fake_bwd = [group_norm_backward_op(go, x, mean, rstd, w, call.groups, m, call.eps) for m in MASKS]
    for real, fake in zip((*fwd, *itertools.chain(*bwd)), (*fake_fwd, *itertools.chain(*fake_bwd))):
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
        assert significant_strides(fake) == significant_strides(real), (fake.stride(), real.stride())


@examples(4, long_share=0.02)
@given(call=calls(dtypes=(F64, F32)), backend=st.sampled_from(["aot_eager", "inductor"]))
def test_compiled_matches_reference(call, backend):
    torch._dynamo.reset()  # a fresh graph per example: no recompile limit, no stale guards

    def fn(x, w, b):
        return persample.group_norm(x, call.groups, w, b, call.eps)

    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point())
              for t in (call.x, call.weight, call.bias)]
    y = torch.compile(fn, backend=backend, fullgraph=True)(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, call.grad_out)
    ref = reference(call.x, call.groups, call.weight, call.bias, call.eps, call.grad_out)
    stock = stock_per_example(call)
    check_close(y, ref[0], stock[0], f"{backend} output")
    check_close(grads[0], ref[1], stock[1], f"{backend} grad_input",
                grad_input_scale(call, stock_rstd(call)))
    sums = stock_param_sums(call, stock[2:])
    params = [(p, rows, s_rows, s_sum) for p, rows, s_rows, s_sum
              in zip(leaves[1:], ref[2:], stock[2:], sums) if p is not None]
    for g, (p, rows, stock_rows, stock_sum) in zip(grads[1:], params):
        if p.dim() == 2:
            check_close(g, rows, stock_rows, f"{backend} per-sample parameter grad")
        else:
            check_close(g, rows.sum(0), stock_sum, f"{backend} summed parameter grad")


@examples(20)
@given(call=calls(dtypes=(F64, F32)), data=st.data())
def test_vmap_matches_loop(call, data):
    """vmap over a leading dim in a random layout, each item a random call: the vmap
    rules fold it into N, and must equal a loop over the items of the op itself (which
    the properties above check against the reference)."""
    b = data.draw(st.integers(1, 3), label="vmapped size")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    def batched(t):
        shape = (b, *t.shape)
        layout = data.draw(layouts(len(shape)), label="layout")
        return arrange(shape, layout, lambda s: torch.randn(s, generator=gen, dtype=F64).to(t.dtype))

    x, go = batched(call.x), batched(call.grad_out)
    w = call.weight if call.weight is None or data.draw(st.booleans()) else batched(call.weight)
    mask = data.draw(st.sampled_from(MASKS), label="output_mask")
    w_dim = None if w is call.weight else 0

    def forward(x, w):
        return group_norm_op(x, call.groups, w, call.bias, call.eps)

    def backward(go, x, mean, rstd, w):
        return group_norm_backward_op(go, x, mean, rstd, w, call.groups, mask, call.eps)

    # NaN in both agrees: a stride-0 vmapped input with eps = 0 has zero variance.
    tol = dict(rtol=1e-5, atol=1e-5) if call.x.dtype == F32 else {}
    tol["equal_nan"] = True
    got = torch.func.vmap(forward, in_dims=(0, w_dim))(x, w)
    want = [torch.stack(o) for o in zip(*(forward(x[i], w if w_dim is None else w[i]) for i in range(b)))]
    torch.testing.assert_close(list(got), want, **tol)
    got = torch.func.vmap(backward, in_dims=(0, 0, 0, 0, w_dim))(go, x, got[1], got[2], w)
    items = [backward(go[i], x[i], want[1][i], want[2][i], w if w_dim is None else w[i]) for i in range(b)]
    # A masked output is an unbatched empty placeholder, which vmap expands over B.
    torch.testing.assert_close(list(got), [torch.stack(o) for o in zip(*items)], **tol)
