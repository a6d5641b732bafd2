"""Random invalid calls (a valid call from tests/strategies.py with one thing broken):
each raises the same exception type and message in eager, through the public API and
under FakeTensorMode, and the eager message under torch.compile. None may pass, crash
or hang."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.exc import TorchRuntimeError
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import persample
from samples import group_norm_backward_op, group_norm_op
from strategies import BF16, F32, F64, calls, examples

BAD_GROUPS = ("zero", "negative", "huge", "int64_overflow", "not_a_divisor")
BAD_EPS = (-1e-5, -1.0, math.nan, -math.inf)
BAD_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)


@st.composite
def bad_groups(draw, c):
    kind = draw(st.sampled_from(BAD_GROUPS))
    if kind == "not_a_divisor":
        return draw(st.integers(2, 2 * c + 2).filter(lambda g: c % g))
    return {"zero": 0, "negative": -draw(st.integers(1, 5)), "huge": 2**40,
            "int64_overflow": 2**63}[kind]


@st.composite
def bad_param(draw, n, c, dtype):
    """A weight or bias that must be refused for an [n, c, *] input of ``dtype``."""
    kind = draw(st.sampled_from(["rank0", "rank3", "short", "long", "wrong_n", "dtype", "device"]))
    if kind == "wrong_n":
        return torch.randn(n + draw(st.integers(1, 3)), c).to(dtype)
    if kind == "dtype":
        wrong = [d for d in (F64, F32, torch.float16, torch.int64, torch.complex64, torch.bool)
                 if d != dtype and not (dtype in (BF16, torch.float16) and d == F32)]
        return torch.randn(c).to(draw(st.sampled_from(wrong)))
    if kind == "device":
        return torch.randn(c, dtype=dtype, device="meta")
    shape = {"rank0": (), "rank3": (n, c, 1), "short": (c - 1,) if c > 1 else (c + 2,),
             "long": (c + 1,)}[kind]
    return torch.randn(shape).to(dtype)


@st.composite
def bad_forward_calls(draw):
    """``(input, num_groups, weight, bias, eps)`` with exactly one thing wrong."""
    call = draw(calls(dtypes=(F64, F32, BF16)))
    x, w, b = call.x, call.weight, call.bias
    groups, eps = call.groups, call.eps
    n, c = x.shape[:2]
    what = draw(st.sampled_from(["groups", "eps", "input_dtype", "input_rank", "weight", "bias"]))
    if what == "groups":
        groups = draw(bad_groups(c))
    elif what == "eps":
        eps = draw(st.sampled_from(BAD_EPS))
    elif what == "input_dtype":
        x = x.to(draw(st.sampled_from(BAD_DTYPES)))
    elif what == "input_rank":
        x = x.flatten() if draw(st.booleans()) else x.sum()
    elif what == "weight":
        w = draw(bad_param(n, c, x.dtype))
    else:
        b = draw(bad_param(n, c, x.dtype))
    return x, groups, w, b, eps


@st.composite
def bad_backward_calls(draw):
    """``group_norm_backward``'s arguments with exactly one thing wrong."""
    call = draw(calls(dtypes=(F64, F32, BF16)))
    x, w, groups, eps = call.x, call.weight, call.groups, call.eps
    _, mean, rstd = group_norm_op(x, groups, w, None, eps)
    go = call.grad_out
    n, c = x.shape[:2]
    what = draw(st.sampled_from(["grad_out_shape", "grad_out_dtype", "mean_shape", "rstd_dtype",
                                 "groups", "eps", "weight"]))
    if what == "grad_out_shape":
        go = torch.randn(*x.shape[:-1], x.shape[-1] + 1).to(x.dtype)
    elif what == "grad_out_dtype":
        go = go.to(draw(st.sampled_from([d for d in (F64, F32, torch.float16) if d != x.dtype])))
    elif what == "mean_shape":
        mean = torch.zeros(n + 1, groups, dtype=mean.dtype)
    elif what == "rstd_dtype":
        rstd = rstd.to(F64 if rstd.dtype != F64 else F32)
    elif what == "groups":
        groups = draw(bad_groups(c))
    elif what == "eps":
        eps = draw(st.sampled_from(BAD_EPS))
    else:
        w = draw(bad_param(n, c, x.dtype))
    return go, x, mean, rstd, w, groups, [True, True, True], eps


def outcome(fn, args):
    """``(exception type, message)`` of a call that must fail."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return type(e), str(e)
    pytest.fail(f"an invalid call was accepted: {args!r}")


def fake_outcome(fn, args):
    def fake(t):
        return mode.from_tensor(t) if isinstance(t, torch.Tensor) else t

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        return outcome(fn, tree_map(fake, args))


@examples(60)
@given(args=bad_forward_calls())
def test_forward_errors_match(args):
    eager = outcome(group_norm_op, args)
    assert fake_outcome(group_norm_op, args) == eager
    assert outcome(lambda *a: persample.group_norm(*a), args) == eager
    if eager[1].startswith("persample."):
        assert eager[0] is RuntimeError


@examples(40)
@given(args=bad_backward_calls())
def test_backward_errors_match(args):
    eager = outcome(group_norm_backward_op, args)
    assert fake_outcome(group_norm_backward_op, args) == eager
    if eager[1].startswith("persample."):
        assert eager[0] is RuntimeError


@examples(5, long_share=0.02)
@given(args=bad_forward_calls())
def test_compiled_errors_match(args):
    x, groups, w, b, eps = args
    eager = outcome(group_norm_op, args)
    if not eager[1].startswith("persample."):
        return  # refused by the dispatcher's argument parsing, before any of our checks
    torch._dynamo.reset()

    def fn(x, w, b):
        return persample.group_norm(x, groups, w, b, eps)

    with pytest.raises(TorchRuntimeError) as caught:
        torch.compile(fn, backend="eager", fullgraph=True)(x, w, b)
    assert eager[1] in str(caught.value)
