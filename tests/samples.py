"""Sample inputs and an independent float64 reference, shared by the tests."""

import copy

import torch
import torch.nn.functional as F

import persample  # noqa: F401  (registers the ops)

group_norm_op = torch.ops.persample.group_norm.default
group_norm_backward_op = torch.ops.persample.group_norm_backward.default

CL = torch.channels_last
CL3 = torch.channels_last_3d

# (input shape, num_groups, memory format, weight kind, bias kind, eps).
# Kinds: None, "shared" [C], "per_sample" [N, C], "expanded" ([C].expand(N, C), stride 0).
CASES = (
    ((3, 6), 3, None, "shared", "shared", 1e-5),
    ((3, 6, 7), 1, None, "per_sample", "per_sample", 1e-5),
    ((3, 6, 7), 6, None, None, None, 1e-3),
    ((2, 4, 3, 5), 2, None, "per_sample", "shared", 1e-5),
    ((2, 4, 3, 5), 2, CL, "per_sample", "per_sample", 1e-5),
    ((2, 4, 3, 5), 4, CL, "shared", None, 1e-5),
    ((2, 6, 2, 3, 2), 3, None, "shared", "per_sample", 1e-5),
    ((2, 6, 2, 3, 2), 2, CL3, "per_sample", "per_sample", 1e-5),
    ((3, 6, 7), 2, None, "expanded", "expanded", 1e-5),
    ((2, 4, 3, 5), 1, CL, "expanded", "per_sample", 1e-5),
    ((3, 4, 5), 2, None, "per_sample", None, 0.0),
    ((3, 4, 5), 4, None, None, "shared", 1e-5),
    ((2, 4, 3, 5), 2, CL, "per_sample", None, 1e-5),
    ((2, 6, 2, 3, 2), 3, CL3, None, "per_sample", 1e-5),
)

# Tolerances between two persample computations in the same dtype (the fast path and the
# public op, a decomposition and the op); against the float64 reference, tests use the
# error model of tests/error_model.py.
TOL = {
    torch.float64: dict(atol=1e-7, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
}

# Cycled over the backward samples.
MASKS = (
    [True, True, True],
    [True, False, False],
    [False, True, True],
    [False, True, False],
    [False, False, True],
    [True, True, False],
)


def make_input(
    shape, memory_format=None, *, device="cpu", dtype=torch.float32, requires_grad=False
):
    x = torch.randn(shape, device=device, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def make_param(kind, n, c, *, device="cpu", dtype=torch.float32, requires_grad=False):
    if kind is None:
        return None
    shape = {"shared": (c,), "per_sample": (n, c), "expanded": (c,)}[kind]
    # Away from zero, so that a wrong scale is visible in every channel.
    p = torch.rand(shape, device=device, dtype=dtype) + 0.5
    if kind == "expanded":
        p = p.expand(n, c)
    return p.requires_grad_(requires_grad)


def sample_inputs(device, *, requires_grad, dtype=torch.float32, param_dtype=None):
    """Yields ``(input, num_groups, weight, bias, eps)`` for ``persample::group_norm``."""
    param_dtype = param_dtype or dtype
    for shape, groups, fmt, w_kind, b_kind, eps in CASES:
        n, c = shape[:2]
        x = make_input(shape, fmt, device=device, dtype=dtype, requires_grad=requires_grad)
        kw = dict(device=device, dtype=param_dtype, requires_grad=requires_grad)
        yield x, groups, make_param(w_kind, n, c, **kw), make_param(b_kind, n, c, **kw), eps


def backward_sample_inputs(device, *, requires_grad, dtype=torch.float32):
    """Yields ``(grad_out, input, mean, rstd, weight, num_groups, output_mask)``."""
    samples = sample_inputs(device, requires_grad=False, dtype=dtype)
    for i, (x, groups, w, b, eps) in enumerate(samples):
        # The statistics do not depend on the affine parameters.
        out, mean, rstd = group_norm_op(x, groups, None, None, eps)
        # Every third sample gets the stride-0 grad_out that ``y.sum().backward()`` makes.
        grad_out = torch.randn_like(out)
        if i % 3 == 0:
            grad_out = torch.randn((), device=device, dtype=dtype).expand_as(out)
        yield (
            grad_out.requires_grad_(requires_grad),
            x.requires_grad_(requires_grad),
            mean,
            rstd,
            None if w is None else w.requires_grad_(requires_grad),
            groups,
            MASKS[i % len(MASKS)],
        )


def _leaf(p, i, c, fill):
    """Sample ``i``'s float64 row of a parameter, as a fresh leaf; ``fill`` if absent."""
    row = torch.full((c,), fill, dtype=torch.float64) if p is None else p if p.dim() == 1 else p[i]
    return row.detach().to("cpu", torch.float64).clone().requires_grad_()


def _canonical(t):
    return t.detach().to("cpu", torch.float64).clone(memory_format=torch.contiguous_format)


def reference(x, num_groups, weight, bias, eps, grad_out):
    """Per-example loop over stock ``torch.group_norm`` in float64, on CPU.

    ``torch.group_norm`` rather than ``F.group_norm``: the latter refuses a group of a
    single element when N = 1 (a BatchNorm-style check), which the ops compute.

    Returns ``(out, grad_input, grad_weight, grad_bias)``; the parameter gradients are
    per-sample ``[N, C]`` (an absent weight counts as ones, an absent bias as zeros).
    """
    c = x.shape[1]
    outs, grads = [], []
    for i in range(x.shape[0]):
        # Canonical contiguous strides (clone, not contiguous(), which keeps the strides
        # of size-1 dims): stock CPU backward crashes, or reads the wrong layout, when
        # input and grad_out look like different memory formats (upstream bug).
        xi = _canonical(x[i : i + 1]).requires_grad_()
        wi, bi = _leaf(weight, i, c, 1.0), _leaf(bias, i, c, 0.0)
        yi = torch.group_norm(xi, num_groups, wi, bi, eps)
        gi = _canonical(grad_out[i : i + 1])
        outs.append(yi.detach())
        grads.append(torch.autograd.grad(yi, (xi, wi, bi), gi))
    gx, gw, gb = zip(*grads)
    return torch.cat(outs), torch.cat(gx), torch.stack(gw), torch.stack(gb)


def stock_loop(x, num_groups, weight, bias, eps, grad_out):
    """Stock ``torch.group_norm`` in the call's own dtypes, one example at a time with its
    own parameter rows: ``(out, grad_input, grad_weight rows, grad_bias rows)``, the
    scale of the error model's tolerances (tests/error_model.py). The output comes from
    the call's own parameters (an absent one takes another code path); the gradients
    from ones and zeros for absent ones, as the ops define them."""
    c = x.shape[1]
    p = weight if weight is not None else bias
    dtype = x.dtype if p is None else p.dtype
    outs = []
    for i in range(x.shape[0]):
        # Canonical strides, as in reference().
        xi = x[i : i + 1].detach().clone(memory_format=torch.contiguous_format).requires_grad_()
        own = [None if p is None else p[i] if p.dim() == 2 else p for p in (weight, bias)]
        wi, bi = (
            (torch.full((c,), fill, dtype=dtype, device=x.device) if p is None else p).detach().clone().requires_grad_()
            for p, fill in zip(own, (1.0, 0.0))
        )
        yi = torch.group_norm(xi, num_groups, wi, bi, eps)
        gi = grad_out[i : i + 1].detach().clone(memory_format=torch.contiguous_format)
        grads = torch.autograd.grad(yi, (xi, wi, bi), gi)
        if any(p is None for p in own):
            yi = torch.group_norm(xi, num_groups, *own, eps)
        outs.append((yi.detach(), *grads))
    y, gx, gw, gb = zip(*outs)
    return torch.cat(y), torch.cat(gx), torch.stack(gw), torch.stack(gb)


def expected_param_grad(p, per_sample_grad):
    """What autograd should give a parameter: per-sample rows for [N, C], the sum for [C]."""
    return per_sample_grad if p.dim() == 2 else per_sample_grad.sum(0)


def opcheck_samples(test, op, make_samples, device, *, requires_grad):
    """``torch.library.opcheck`` with all its default checks, one subTest per sample."""
    for i, args in enumerate(make_samples(device, requires_grad=requires_grad)):
        with test.subTest(sample=i):
            torch.library.opcheck(op, args)


def per_example_model_grads(model, x, y):
    """``{param name: Tensor[N, *shape]}``: each example's own cross-entropy gradient, by
    a float64 loop over single examples on a copy of ``model``."""
    ref = copy.deepcopy(model).double()
    out = {k: [] for k, _ in ref.named_parameters()}
    for xi, yi in zip(x.double(), y):
        ref.zero_grad()
        F.cross_entropy(ref(xi[None]), yi[None]).backward()
        for k, p in ref.named_parameters():
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}
