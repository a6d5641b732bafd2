"""The methods that the layer suite (``python -m persample.bench --op ...``) times.

Each factory takes a case (persample.bench.cases: one norm layer, its input and output
gradient) and returns a zero-argument step that runs one forward+backward. Every step
but ``plain`` (the non-private floor, which returns None) returns the per-sample
gradients of the layer's parameters, ``[N, *param.shape]`` each, in the case's
``param_names`` order, so that tests can check them. The factories are the same for
every op (only the case differs); :data:`METHODS` holds one table per op.
"""

import torch

from ..grad_sample import call_for_per_sample_grads

BACKEND = "inductor"  # of every torch.compile here; tests of the plumbing use a cheaper one


class Unavailable(Exception):
    """A method that cannot run here (a missing optional package, a peer without a rule
    for this layer)."""


def _params(layer, names):
    return [getattr(layer, k) for k in names]


def plain(case):
    return lambda: case.backward(case.stock(case.x))


def persample_eager(case, fn=None):
    """persample's function on ``[N, *param.shape]`` per-sample leaves."""
    fn = fn or case.functional

    def step():
        leaves = case.leaves()
        case.backward(fn(case.x, *leaves))
        return tuple(leaf.grad for leaf in leaves)

    return step


def persample_compiled(case):
    return persample_eager(case, torch.compile(case.functional, fullgraph=True, backend=BACKEND))


def persample_grad_sample(case):
    """The model-level API: ``p.grad_sample`` of a persample layer."""
    layer = case.persample_copy()
    wrapped = call_for_per_sample_grads(layer)

    def step():
        case.backward(wrapped(case.x))
        return tuple(p.grad_sample for p in _params(layer, case.param_names))

    return step


def expanded_weights(case):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads as ew

    layer = case.stock_copy()
    params = _params(layer, case.param_names)

    def step():
        case.backward(ew(layer)(case.x))
        grads = tuple(p.grad_sample for p in params)
        for p in params:
            p.grad_sample = None
        return grads

    try:
        step()
    except RuntimeError as e:
        # ExpandedWeights refuses a function it has no rule for (RMSNorm in torch <= 2.14).
        if "cannot handle function" not in str(e):
            raise
        raise Unavailable(f"torch {torch.__version__}'s ExpandedWeights has no rule for "
                          f"{type(layer).__name__} ({e})") from e
    return step


def _opacus(case, layer):
    """Opacus hooks mode (GradSampleModule) around ``layer``: Opacus's own sampler for a
    stock layer, ``persample.opacus``'s for a persample one."""
    try:
        from opacus import GradSampleModule
    except ImportError as e:
        raise Unavailable("opacus is not installed (pip install 'persample[opacus]')") from e
    import persample.opacus  # noqa: F401  (registers the persample samplers)

    # The steps backpropagate dy, a sum over the batch; Opacus's default, "mean", would
    # scale the per-sample gradients by N.
    gsm = GradSampleModule(layer, loss_reduction="sum")
    params = _params(layer, case.param_names)

    def step():
        case.backward(gsm(case.x))
        grads = tuple(p.grad_sample for p in params)
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample
        return grads

    return step


def _func(case, layer, compiled):
    """``torch.func.vmap(grad)`` over single examples, of the parameters only."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, dyi):
        return (torch.func.functional_call(layer, p, (xi[None],)) * dyi[None]).sum()

    fn = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend=BACKEND)
    x = case.x.detach()

    def step():
        grads = fn(params, x, case.dy)
        return tuple(grads[k] for k in case.param_names)

    return step


TABLE = {
    "plain": plain,
    "persample": persample_eager,
    "persample_compiled": persample_compiled,
    "persample_grad_sample": persample_grad_sample,
    "expanded_weights": expanded_weights,
    "opacus_stock": lambda case: _opacus(case, case.stock_copy()),
    "opacus_persample": lambda case: _opacus(case, case.persample_copy()),
    "func_stock": lambda case: _func(case, case.stock_copy(), False),
    "func_persample": lambda case: _func(case, case.persample_copy(), False),
    "func_stock_compiled": lambda case: _func(case, case.stock_copy(), True),
    "func_persample_compiled": lambda case: _func(case, case.persample_copy(), True),
}
# One table per op (``--op``), each its own dict, so that a test or a new peer can change
# one op's methods alone. Every op runs every method today: a peer without a rule for a
# layer says so at build time (Unavailable) and is reported as skipped.
METHODS = {op: dict(TABLE) for op in ("group_norm", "layer_norm", "rms_norm")}
