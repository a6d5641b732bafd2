"""Bad calls of the row norms (``persample::layer_norm``, ``layer_norm_backward``,
``rms_norm``, ``rms_norm_backward``, ``persample.layer_norm`` / ``rms_norm`` and the
modules ``persample.nn.LayerNorm`` / ``RMSNorm``) raise a RuntimeError whose full text
names the problem, the same text in eager, under FakeTensorMode (inputs converted with
``mode.from_tensor``: the fake impls of meta/row_norm.py run the kernels' checks) and on
meta tensors (which dispatch to the same fake impls). Compiled calls are in
torch_compile_tests/test_row_norm_compiled.py (TestCompiledErrors); the group_norm
counterpart of this file is tests/test_errors.py.

Messages are written out in full (not built from ops/row_norm/checks.py), so that a
changed or garbled message fails here. ``{device}`` in a message stands for the device
of the call's tensors (cpu in eager and fake, meta on meta tensors).
"""

import contextlib
import math
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map

import persample
from row_samples import BF16, F16, F32, F64, layer_norm_backward_op, layer_norm_op, rms_norm_backward_op, rms_norm_op

OPS = {"layer_norm": layer_norm_op, "rms_norm": rms_norm_op}
BACKWARD_OPS = {"layer_norm": layer_norm_backward_op, "rms_norm": rms_norm_backward_op}
PUBLIC = {"layer_norm": persample.layer_norm, "rms_norm": persample.rms_norm}
MODES = ("eager", "fake", "meta")


def t(*shape, dtype=F32, device="cpu"):
    return torch.randn(shape, dtype=F64).to(device=device, dtype=dtype)


def ints(*shape, dtype=torch.int64):
    return torch.ones(shape, dtype=dtype)


# Forward cases for both ops: name -> (kwargs factory, message after "persample.<op>: ").
# A factory builds CPU tensors (one of them on meta for an *_on_meta case); the mode
# converts them. rms_norm takes no bias; its eps defaults to None.
FORWARD = {
    "empty_normalized_shape": (
        lambda: dict(x=t(2, 5), ns=[]),
        "normalized_shape must name at least one dim, got []",
    ),
    "no_sample_dim": (
        lambda: dict(x=t(5), ns=[5]),
        "expected input of shape [N, *, *normalized_shape] with a sample dim 0 outside the "
        "normalised dims (rank >= 2), got shape (5,) for normalized_shape=[5]",
    ),
    "rank_below_normalized_shape": (
        lambda: dict(x=t(4, 5), ns=[3, 4, 5]),
        "expected input of shape [N, *, *normalized_shape] with a sample dim 0 outside the "
        "normalised dims (rank >= 4), got shape (4, 5) for normalized_shape=[3, 4, 5]",
    ),
    "0d_input": (
        lambda: dict(x=t(), ns=[1]),
        "expected input of shape [N, *, *normalized_shape] with a sample dim 0 outside the "
        "normalised dims (rank >= 2), got shape () for normalized_shape=[1]",
    ),
    "integer_input": (
        lambda: dict(x=ints(2, 3, 5), ns=[5]),
        "expected a floating-point input, got torch.int64",
    ),
    "bool_input": (
        lambda: dict(x=ints(2, 5, dtype=torch.bool), ns=[5]),
        "expected a floating-point input, got torch.bool",
    ),
    "complex_input": (
        lambda: dict(x=torch.randn(2, 5, dtype=torch.complex64), ns=[5]),
        "expected a floating-point input, got torch.complex64",
    ),
    "trailing_size": (
        lambda: dict(x=t(2, 3, 5), ns=[4]),
        "input shape (2, 3, 5) does not end with normalized_shape=[4]",
    ),
    "inner_trailing_size": (
        lambda: dict(x=t(2, 3, 5), ns=[4, 5]),
        "input shape (2, 3, 5) does not end with normalized_shape=[4, 5]",
    ),
    "negative_normalized_size": (  # no -1 wildcard, as in stock
        lambda: dict(x=t(2, 5), ns=[-1]),
        "input shape (2, 5) does not end with normalized_shape=[-1]",
    ),
    "negative_eps": (lambda: dict(x=t(2, 5), ns=[5], eps=-1e-5), "eps must be >= 0, got -1e-05"),
    "nan_eps": (lambda: dict(x=t(2, 5), ns=[5], eps=math.nan), "eps must be >= 0, got nan"),
    "minus_inf_eps": (lambda: dict(x=t(2, 5), ns=[5], eps=-math.inf), "eps must be >= 0, got -inf"),
    "0d_weight": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t()),
        "weight must be Tensor[5] (shared) or Tensor[N, 5] (per-sample), got a tensor of shape ()",
    ),
    "weight_with_middle_dim": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(2, 3, 5)),
        "weight must be Tensor[5] (shared) or Tensor[N, 5] (per-sample), got a tensor of shape (2, 3, 5)",
    ),
    "weight_of_last_dim_only": (
        lambda: dict(x=t(2, 4, 5), ns=[4, 5], weight=t(5)),
        "weight must be Tensor[4, 5] (shared) or Tensor[N, 4, 5] (per-sample), got a tensor of shape (5,)",
    ),
    "short_weight": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(4)),
        "weight of shape (4,) does not end with normalized_shape=[5]",
    ),
    "per_sample_weight_short_rows": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(2, 4)),
        "weight of shape (2, 4) does not end with normalized_shape=[5]",
    ),
    "per_sample_weight_wrong_n": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(3, 5)),
        "per-sample weight has N=3 rows but input has batch size N=2",
    ),
    "expanded_weight_wrong_n": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(5).expand(4, 5)),
        "per-sample weight has N=4 rows but input has batch size N=2",
    ),
    "weight_on_meta": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(5, device="meta")),
        "weight is on meta but input is on cpu",
    ),
    "float64_weight": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(5, dtype=F64)),
        "weight has dtype torch.float64, expected torch.float32",
    ),
    "float32_weight_for_float64_input": (
        lambda: dict(x=t(2, 3, 5, dtype=F64), ns=[5], weight=t(2, 5)),
        "weight has dtype torch.float32, expected torch.float64",
    ),
    "float16_weight_for_float32_input": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(5, dtype=F16)),
        "weight has dtype torch.float16, expected torch.float32",
    ),
    "bfloat16_weight_for_float16_input": (
        lambda: dict(x=t(2, 3, 5, dtype=F16), ns=[5], weight=t(5, dtype=BF16)),
        "weight has dtype torch.bfloat16, expected torch.float16 or torch.float32",
    ),
    "float64_weight_for_bfloat16_input": (
        lambda: dict(x=t(2, 3, 5, dtype=BF16), ns=[5], weight=t(2, 5, dtype=F64)),
        "weight has dtype torch.float64, expected torch.bfloat16 or torch.float32",
    ),
    "integer_weight": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=ints(5)),
        "weight has dtype torch.int64, expected torch.float32",
    ),
}

# layer_norm's bias goes through the same checks as its weight, under its own name.
BIAS = {
    "0d_bias": (
        lambda: dict(x=t(2, 3, 5), ns=[5], bias=t()),
        "bias must be Tensor[5] (shared) or Tensor[N, 5] (per-sample), got a tensor of shape ()",
    ),
    "per_sample_bias_wrong_n": (
        lambda: dict(x=t(2, 3, 5), ns=[5], weight=t(2, 5), bias=t(1, 5)),
        "per-sample bias has N=1 rows but input has batch size N=2",
    ),
    "short_bias": (
        lambda: dict(x=t(2, 4, 5), ns=[4, 5], bias=t(3, 5)),
        "bias of shape (3, 5) does not end with normalized_shape=[4, 5]",
    ),
    "bias_on_meta": (
        lambda: dict(x=t(2, 3, 5), ns=[5], bias=t(5, device="meta")),
        "bias is on meta but input is on cpu",
    ),
    "float64_bias_for_bfloat16_input": (
        lambda: dict(x=t(2, 3, 5, dtype=BF16), ns=[5], weight=t(5), bias=t(5, dtype=F64)),
        "bias has dtype torch.float64, expected torch.bfloat16 or torch.float32",
    ),
}


def forward_args(op, x, ns, weight=None, bias=None, eps="default"):
    if op == "layer_norm":
        return (x, ns, weight, bias, 1e-5 if eps == "default" else eps)
    assert bias is None
    return (x, ns, weight, None if eps == "default" else eps)


def stats_shape(x, ns):
    k = len(ns)
    return (*x.shape[: x.dim() - k], *(1,) * k) if x.dim() > k else (1,)


def backward_kwargs(x=None, ns=(5,), grad_out=None, mean=None, rstd=None, weight=None, eps="default"):
    """A backward call on a [2, 3, 5] float32 input normalised over [5], statistics
    [2, 3, 1] float32, with what the case passes changed."""
    x = t(2, 3, 5) if x is None else x
    ns = list(ns)
    s = stats_shape(x, ns)
    return dict(
        x=x, ns=ns, eps=eps, weight=weight,
        grad_out=torch.zeros_like(x) if grad_out is None else grad_out,
        mean=t(*s) if mean is None else mean,
        rstd=t(*s) if rstd is None else rstd,
    )


def backward_args(op, x, ns, grad_out, mean, rstd, weight, eps, mask=None):
    if op == "layer_norm":
        return (grad_out, x, ns, mean, rstd, weight, mask or [True] * 3, 1e-5 if eps == "default" else eps)
    return (grad_out, x, ns, rstd, weight, mask or [True] * 2, None if eps == "default" else eps)


# Backward cases for both ops: name -> (factory, message after "persample.<op>_backward: ").
BACKWARD = {
    "empty_normalized_shape": (
        lambda: backward_kwargs(ns=()),
        "normalized_shape must name at least one dim, got []",
    ),
    "no_sample_dim": (
        lambda: backward_kwargs(x=t(5)),
        "expected input of shape [N, *, *normalized_shape] with a sample dim 0 outside the "
        "normalised dims (rank >= 2), got shape (5,) for normalized_shape=[5]",
    ),
    "integer_input": (
        lambda: backward_kwargs(x=ints(2, 3, 5)),
        "expected a floating-point input, got torch.int64",
    ),
    "trailing_size": (
        lambda: backward_kwargs(x=t(2, 3, 4)),
        "input shape (2, 3, 4) does not end with normalized_shape=[5]",
    ),
    "negative_eps": (lambda: backward_kwargs(eps=-1.0), "eps must be >= 0, got -1.0"),
    "nan_eps": (lambda: backward_kwargs(eps=math.nan), "eps must be >= 0, got nan"),
    "grad_out_shape": (
        lambda: backward_kwargs(grad_out=t(2, 3, 4)),
        "grad_out shape (2, 3, 4) does not match input shape (2, 3, 5)",
    ),
    "broadcastable_grad_out": (  # refused, not broadcast
        lambda: backward_kwargs(grad_out=t(1, 3, 5)),
        "grad_out shape (1, 3, 5) does not match input shape (2, 3, 5)",
    ),
    "grad_out_dtype": (
        lambda: backward_kwargs(grad_out=t(2, 3, 5, dtype=F64)),
        "grad_out (torch.float64, {device}) must match input (torch.float32, {device})",
    ),
    "grad_out_on_meta": (
        lambda: backward_kwargs(grad_out=t(2, 3, 5, device="meta")),
        "grad_out (torch.float32, meta) must match input (torch.float32, cpu)",
    ),
    "rstd_shape": (
        lambda: backward_kwargs(rstd=t(2, 3, 2)),
        "rstd must have shape [2, 3, 1], got (2, 3, 2)",
    ),
    "rstd_without_kept_dims": (  # [N, M], not ATen's [N, M, 1]
        lambda: backward_kwargs(rstd=t(2, 3)),
        "rstd must have shape [2, 3, 1], got (2, 3)",
    ),
    "rstd_dtype": (
        lambda: backward_kwargs(rstd=t(2, 3, 1, dtype=F64)),
        "rstd must be torch.float32 on {device}, got torch.float64 on {device}",
    ),
    "bfloat16_rstd_for_bfloat16_input": (  # the statistics of fp16/bf16 input are fp32
        lambda: backward_kwargs(x=t(2, 3, 5, dtype=BF16), rstd=t(2, 3, 1, dtype=BF16)),
        "rstd must be torch.float32 on {device}, got torch.bfloat16 on {device}",
    ),
    "rstd_on_meta": (
        lambda: backward_kwargs(rstd=t(2, 3, 1, device="meta")),
        "rstd must be torch.float32 on cpu, got torch.float32 on meta",
    ),
    "weight_with_middle_dim": (
        lambda: backward_kwargs(weight=t(2, 3, 5)),
        "weight must be Tensor[5] (shared) or Tensor[N, 5] (per-sample), got a tensor of shape (2, 3, 5)",
    ),
    "short_weight": (
        lambda: backward_kwargs(weight=t(4)),
        "weight of shape (4,) does not end with normalized_shape=[5]",
    ),
    "per_sample_weight_wrong_n": (
        lambda: backward_kwargs(weight=t(3, 5)),
        "per-sample weight has N=3 rows but input has batch size N=2",
    ),
    "float64_weight": (
        lambda: backward_kwargs(weight=t(5, dtype=F64)),
        "weight has dtype torch.float64, expected torch.float32",
    ),
    "weight_on_meta": (
        lambda: backward_kwargs(weight=t(5, device="meta")),
        "weight is on meta but input is on cpu",
    ),
}

# layer_norm_backward's mean, checked as rstd is.
MEAN = {
    "mean_shape": (
        lambda: backward_kwargs(mean=t(3, 3, 1)),
        "mean must have shape [2, 3, 1], got (3, 3, 1)",
    ),
    "mean_dtype": (
        lambda: backward_kwargs(mean=t(2, 3, 1, dtype=F16)),
        "mean must be torch.float32 on {device}, got torch.float16 on {device}",
    ),
    "mean_on_meta": (
        lambda: backward_kwargs(mean=t(2, 3, 1, device="meta")),
        "mean must be torch.float32 on cpu, got torch.float32 on meta",
    ),
}


def on_meta(name):
    """Whether a case can run on meta tensors: not the *_on_meta ones, whose point is a
    meta tensor among CPU ones (on meta, every tensor is)."""
    return not name.endswith("_on_meta")


def params(*tables):
    """``(op, case, mode)`` for every case of ``tables`` (``{op: table}``) and mode."""
    return [
        pytest.param(op, name, mode, id=f"{op}-{name}-{mode}")
        for op, table in tables
        for name in table
        for mode in MODES
        if mode != "meta" or on_meta(name)
    ]


@contextlib.contextmanager
def converted(mode, args):
    """``args`` (and, for ``fake``, the mode they must run under) as the mode wants."""
    if mode == "eager":
        yield args
    elif mode == "fake":
        with FakeTensorMode() as fake:
            args = tree_map(lambda a: fake.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)
            assert all(isinstance(a, FakeTensor) for a in tree_leaves(args) if isinstance(a, torch.Tensor))
            yield args
    else:
        yield tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, args)


def outcome(fn, args, mode):
    """The exception ``fn(*args)`` raises in ``mode``; None if it is accepted."""
    with converted(mode, args) as args:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  (the type is what is checked)
            return e
    return None


def check_raises(fn, args, mode, message):
    """``fn(*args)`` in ``mode`` raises exactly a RuntimeError with exactly ``message``."""
    message = message.replace("{device}", "meta" if mode == "meta" else "cpu")
    e = outcome(fn, args, mode)
    assert type(e) is RuntimeError, f"expected RuntimeError({message!r}), got {e!r}"
    assert str(e) == message


def requiring_grad(args):
    # The public functions' differentiable path: the op's Autograd kernel runs first.
    return tree_map(
        lambda a: a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a,
        args,
    )


FORWARD_CASES = params(("layer_norm", FORWARD), ("layer_norm", BIAS), ("rms_norm", FORWARD))
BACKWARD_CASES = params(("layer_norm", BACKWARD), ("layer_norm", MEAN), ("rms_norm", BACKWARD))


@pytest.mark.parametrize("op,case,mode", FORWARD_CASES)
def test_forward_op(op, case, mode):
    make, message = {**FORWARD, **BIAS}[case]
    check_raises(OPS[op], forward_args(op, **make()), mode, f"persample.{op}: {message}")


@pytest.mark.parametrize("op,case,mode", FORWARD_CASES)
def test_public_function(op, case, mode):
    make, message = {**FORWARD, **BIAS}[case]
    args = requiring_grad(forward_args(op, **make()))
    check_raises(PUBLIC[op], args, mode, f"persample.{op}: {message}")


@pytest.mark.parametrize("op,case,mode", BACKWARD_CASES)
def test_backward_op(op, case, mode):
    make, message = {**BACKWARD, **MEAN}[case]
    check_raises(BACKWARD_OPS[op], backward_args(op, **make()), mode, f"persample.{op}_backward: {message}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
def test_backward_output_mask_length(op, mode):
    """An output_mask of the wrong length is refused, naming it, in every mode: the
    schemas' ``bool[3]`` / ``bool[2]`` do not bound the length of a list passed from
    Python (a short one made eager raise an IndexError and the fake impl return too few
    outputs; a long one was accepted)."""
    grads = "grad_input, grad_weight, grad_bias" if op == "layer_norm" else "grad_input, grad_weight"
    n = 3 if op == "layer_norm" else 2
    for mask in ([True] * (n - 1), [True] * (n + 1)):
        check_raises(BACKWARD_OPS[op], backward_args(op, **backward_kwargs(), mask=mask), mode,
                     f"persample.{op}_backward: output_mask must have {n} entries ({grads}), got {len(mask)}")


# Modules: (module factory, input factory, message, per-sample parameter overrides).
MODULES = {
    "layer_norm_no_sample_dim": (
        lambda: persample.nn.LayerNorm(5), lambda: t(5), None,
        "persample.layer_norm: expected input of shape [N, *, *normalized_shape] with a sample dim 0 "
        "outside the normalised dims (rank >= 2), got shape (5,) for normalized_shape=[5]",
    ),
    "layer_norm_trailing_size": (
        lambda: persample.nn.LayerNorm([4, 5]), lambda: t(2, 3, 5), None,
        "persample.layer_norm: input shape (2, 3, 5) does not end with normalized_shape=[4, 5]",
    ),
    "layer_norm_float64_input": (
        lambda: persample.nn.LayerNorm(5), lambda: t(2, 5, dtype=F64), None,
        "persample.layer_norm: weight has dtype torch.float32, expected torch.float64",
    ),
    "layer_norm_integer_input": (
        lambda: persample.nn.LayerNorm(5, elementwise_affine=False), lambda: ints(2, 5), None,
        "persample.layer_norm: expected a floating-point input, got torch.int64",
    ),
    "layer_norm_negative_eps": (
        lambda: persample.nn.LayerNorm(5, eps=-1.0), lambda: t(2, 5), None,
        "persample.layer_norm: eps must be >= 0, got -1.0",
    ),
    "layer_norm_per_sample_bias_wrong_n": (
        lambda: persample.nn.LayerNorm(5), lambda: t(2, 4, 5), {"bias": lambda: t(3, 5)},
        "persample.layer_norm: per-sample bias has N=3 rows but input has batch size N=2",
    ),
    "rms_norm_no_sample_dim": (
        lambda: persample.nn.RMSNorm([4, 5]), lambda: t(4, 5), None,
        "persample.rms_norm: expected input of shape [N, *, *normalized_shape] with a sample dim 0 "
        "outside the normalised dims (rank >= 3), got shape (4, 5) for normalized_shape=[4, 5]",
    ),
    "rms_norm_trailing_size": (
        lambda: persample.nn.RMSNorm(5), lambda: t(2, 3, 6), None,
        "persample.rms_norm: input shape (2, 3, 6) does not end with normalized_shape=[5]",
    ),
    "rms_norm_float64_input": (
        lambda: persample.nn.RMSNorm(5), lambda: t(2, 5, dtype=F64), None,
        "persample.rms_norm: weight has dtype torch.float32, expected torch.float64",
    ),
    "rms_norm_negative_eps": (
        lambda: persample.nn.RMSNorm(5, eps=-1.0), lambda: t(2, 5), None,
        "persample.rms_norm: eps must be >= 0, got -1.0",
    ),
    "rms_norm_per_sample_weight_wrong_n": (
        lambda: persample.nn.RMSNorm(5), lambda: t(2, 4, 5), {"weight": lambda: t(1, 5)},
        "persample.rms_norm: per-sample weight has N=1 rows but input has batch size N=2",
    ),
}


@pytest.mark.parametrize("case", MODULES)
@pytest.mark.parametrize("mode", MODES)
def test_module(case, mode):
    """The module's forward through ``functional_call`` (its own parameters, which
    require grad, with the case's per-sample ones swapped in), converted as the mode
    wants, so that a fake or meta module raises as the eager one does."""
    make_module, make_input, overrides, message = MODULES[case]
    module = make_module()
    state = dict(module.named_parameters())
    state.update({name: make().requires_grad_() for name, make in (overrides or {}).items()})

    def call(state, x):
        return torch.func.functional_call(module, state, (x,))

    check_raises(call, (state, make_input()), mode, message)
