"""Property-based tests of the row norms, ``persample.layer_norm`` / ``rms_norm`` and
their ops: random problems (drawn here) against the float64 per-example loop over stock
``F.layer_norm`` / ``F.rms_norm`` (tests/row_samples.py), by the error model
(tests/error_model.py via ``row_samples.check_results``: at most twice stock's own
error on the same per-example problem in the same dtype, plus a few ulps), on both
kernel paths (the C++ library's and the ATen formulas').

A problem: normalized_shape of rank 1-3 with size-1 dims, 0-2 middle dims (an empty one
too), N from 1, every layout of ``row_samples.make_input``, absent / shared /
per-sample / expanded parameters, fp64, fp32, bf16, fp16, and fp16/bf16 input with
fp32 parameters, means away from zero. tests/test_properties.py is the group_norm
counterpart; the example counts and the (derandomized) profile are tests/strategies.py's.
"""

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import persample
from persample.ops.shared import backends
from row_samples import (
    BF16, F16, F32, F64, check_backward_masks, check_results, check_statistics, kernel_path,
    layer_norm_backward_op,
    layer_norm_op, make_input, make_param, reference, reference_stats, rms_norm_backward_op,
    rms_norm_op, stock_loop,
)
from strategies import describe, examples  # also loads the "persample" hypothesis profile

PATHS = [
    pytest.param("cpp", marks=pytest.mark.skipif(backends.LIBRARY is None, reason="C++ library not loaded")),
    "python",
]
LAYOUTS = ("contiguous", "batch_inner", "transposed", "sliced", "expanded")
PARAM_KINDS = (None, "shared", "per_sample", "expanded")
# (input dtype, parameter dtype): fp32 parameters are allowed with fp16/bf16 input.
DTYPES = ((F64, F64), (F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, F32))
LAYER_NORM_MASKS = [list(m) for m in itertools.product((True, False), repeat=3)]
RMS_NORM_MASKS = [list(m) for m in itertools.product((True, False), repeat=2)]


@dataclasses.dataclass
class RowCall:
    """One row-norm problem: a forward call, plus the gradient the backward gets."""

    rms: bool
    x: torch.Tensor
    normalized_shape: list
    weight: torch.Tensor
    bias: torch.Tensor  # None for rms_norm
    eps: float  # None: rms_norm's default
    grad_out: torch.Tensor
    requires_grad: tuple  # (x, weight, bias)

    def __repr__(self):
        desc = describe
        return (f"RowCall({'rms_norm' if self.rms else 'layer_norm'}, x={desc(self.x)}, "
                f"ns={self.normalized_shape}, weight={desc(self.weight)}, bias={desc(self.bias)}, "
                f"eps={self.eps}, grad_out={desc(self.grad_out)}, requires_grad={self.requires_grad})")

    def _repr_pretty_(self, printer, cycle):  # hypothesis prints failing examples with it
        printer.text(repr(self))


@st.composite
def row_calls(draw):
    """A valid :class:`RowCall`, every size from 1 up (a middle dim from 0), total size
    kept small."""
    rms = draw(st.booleans(), label="rms_norm")
    k = draw(st.integers(1, 3))
    ns = draw(st.lists(st.integers(1, {1: 6, 2: 4, 3: 3}[k]), min_size=k, max_size=k))
    middle = draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=0, max_size=2))
    n = draw(st.integers(1, 3))
    shape = (n, *middle, *ns)
    dtype, param_dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    # A mean away from zero makes the centring (and fp32 statistics) matter.
    mean = draw(st.sampled_from([0.0, 0.0, 3.0, -50.0]))
    # eps = 0 needs a row statistic that cannot be zero: fp32/fp64 rows of >= 2 values
    # (a row of one has zero variance; fp16/bf16 values may round to equal ones), not
    # copies of one value ("expanded" is stride 0 along dim 1: a normalised dim when
    # there is no middle dim).
    zero_ok = dtype in (F32, F64) and math.prod(ns) >= 2 and (layout != "expanded" or middle)
    eps_choices = ([None] if rms else []) + [1e-5, 1e-3, 0.5] + ([0.0] if zero_ok else [])
    eps = draw(st.sampled_from(eps_choices))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = make_input(shape, layout, gen=gen, dtype=dtype)
    # Shift the stored values (a view's base), so that the layout stays as drawn.
    (x if x._base is None else x._base).add_(mean)
    grad_out = make_input(shape, draw(st.sampled_from(LAYOUTS)), gen=gen, dtype=dtype)
    kw = dict(gen=gen, dtype=param_dtype)
    weight = make_param(draw(st.sampled_from(PARAM_KINDS)), n, ns, **kw)
    bias = None if rms else make_param(draw(st.sampled_from(PARAM_KINDS)), n, ns, weight=False, **kw)
    requires_grad = (draw(st.booleans()), weight is not None and draw(st.booleans()),
                     bias is not None and draw(st.booleans()))
    return RowCall(rms, x, ns, weight, bias, eps, grad_out, requires_grad)


def public(call, x, w, b):
    if call.rms:
        return persample.rms_norm(x, call.normalized_shape, w, call.eps)
    return persample.layer_norm(x, call.normalized_shape, w, b, call.eps)


def expected(call):
    """``(reference, stock)``: the float64 loop and stock's loop in the call's dtypes."""
    args = (call.x, call.normalized_shape, call.weight, call.bias, call.eps, call.grad_out, call.rms)
    return reference(*args), stock_loop(*args)


@pytest.mark.parametrize("path", PATHS)
@examples(40)
@given(call=row_calls())
def test_autograd_matches_reference(path, call):
    """The public functions under autograd: output, grad_input, and the gradients of
    the parameters that require grad (per-sample rows of ``[N, *ns]`` ones, batch sums
    of shared ones)."""
    leaves = [None if t is None else t.detach().requires_grad_(r)
              for t, r in zip((call.x, call.weight, call.bias), call.requires_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with kernel_path(path):
        y = public(call, *leaves)
        grads = iter(torch.autograd.grad(y, wanted, call.grad_out) if wanted else ())
    grads = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    assert y.shape == call.x.shape and y.dtype == call.x.dtype and y.is_contiguous()
    if grads[0] is not None:
        assert grads[0].shape == call.x.shape and grads[0].dtype == call.x.dtype
    ref, stock = expected(call)
    rstd = reference_stats(call.x, call.normalized_shape, call.eps, call.rms)[-1]
    check_results((y, *grads), (call.weight, call.bias), call.normalized_shape, ref, stock, "", rstd, call.grad_out)


@pytest.mark.parametrize("path", PATHS)
@examples(40)
@given(call=row_calls())
def test_ops_match_reference_and_fakes(path, call):
    """The forward op's output and statistics; the backward op under every output mask
    (per-sample ``[N, *ns]`` parameter gradients in the accumulation dtype, masked ones
    empty); and the fake impls' shapes, dtypes and strides on fake copies."""
    x, ns, w, b, go = call.x, call.normalized_shape, call.weight, call.bias, call.grad_out
    masks = RMS_NORM_MASKS if call.rms else LAYER_NORM_MASKS
    with kernel_path(path):
        fwd = forward_op(call, x, w, b)
        bwd = [backward_op(call, go, x, fwd[1:], w, m) for m in masks]
    ref, stock = expected(call)
    check_results((fwd[0], None), (w, b), ns, ref, stock, "op ")
    check_statistics(x, ns, call.eps, fwd[1:], call.rms)
    check_backward_masks(x, ns, masks, bwd, ref, stock, "", fwd[-1], go)
    check_fakes(call, fwd, bwd, masks)


def forward_op(call, x, w, b):
    if call.rms:
        return rms_norm_op(x, call.normalized_shape, w, call.eps)
    return layer_norm_op(x, call.normalized_shape, w, b, call.eps)


def backward_op(call, go, x, stats, w, mask):
    if call.rms:
        return rms_norm_backward_op(go, x, call.normalized_shape, *stats, w, mask, call.eps)
    return layer_norm_backward_op(go, x, call.normalized_shape, *stats, w, mask, call.eps)


def check_fakes(call, fwd, bwd, masks):
    """The fake impls on fake copies of the same tensors: the kernels' shapes, dtypes
    and strides (both contiguous, so every stride of a dim of size > 1)."""
    real = (call.x, call.weight, call.bias, call.grad_out, *fwd[1:])
    with FakeTensorMode() as mode:
        x, w, b, go, *stats = (None if t is None else mode.from_tensor(t) for t in real)
        fake_fwd = forward_op(call, x, w, b)
        fake_bwd = [backward_op(call, go, x, stats, w, m) for m in masks]
    for got, fake in zip((*fwd, *itertools.chain(*bwd)), (*fake_fwd, *itertools.chain(*fake_bwd))):
        assert (fake.shape, fake.dtype) == (got.shape, got.dtype)
        assert [s for s, d in zip(fake.stride(), fake.shape) if d > 1] == \
            [s for s, d in zip(got.stride(), got.shape) if d > 1], (fake.stride(), got.stride())
