"""Model-level per-sample gradients: ``p.grad_sample`` for persample norm parameters.

The same convention as ExpandedWeights (``call_for_per_sample_grads``) and Opacus: after
the backward pass every parameter ``p`` of a :class:`persample.nn.GroupNorm`,
:class:`~persample.nn.LayerNorm` or :class:`~persample.nn.RMSNorm` holds
``p.grad_sample`` of shape ``[N, *p.shape]``, and ``p.grad`` as usual.

It works by attaching, for the duration of one call, zero ``[N, *p.shape]`` leaf tensors
to each layer; the layer adds them to its parameters. Their gradients are the per-sample
gradients, computed by the norm's backward op (``persample::group_norm_backward``, ...),
and hooks on those leaves
copy them to ``grad_sample``. Everything happens outside the model, so the model can be
``torch.compile(fullgraph=True)``-ed: it sees the leaves as ordinary tensor inputs (no
graph break, no compiled autograd), and a changing batch size triggers at most the one
recompile that makes the batch dimension dynamic.
"""

import torch
import torch.utils._pytree as pytree

from .nn import PerSampleNorm

__all__ = ["call_for_per_sample_grads", "per_sample_layers", "sampled_parameters"]


def per_sample_layers(module):
    """The persample norm layers of ``module`` (compiled or not) that have parameters."""
    return [m for m in module.modules() if isinstance(m, PerSampleNorm) and _norm_params(m)]


def _norm_params(layer):
    return [name for name in ("weight", "bias") if getattr(layer, name, None) is not None]


def _batch_size(args, kwargs, batch_first):
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            return arg.shape[0 if batch_first else 1]
    raise ValueError(
        "call_for_per_sample_grads: no tensor argument to infer the batch size from; "
        "pass batch_size="
    )


def _hook(param, scale):
    def store(grad):
        grad = grad.detach() * scale if scale != 1 else grad.detach()
        old = getattr(param, "grad_sample", None)
        # Several backward passes over the same batch accumulate, as p.grad does.
        param.grad_sample = grad if old is None or old.shape != grad.shape else old + grad

    return store


def call_for_per_sample_grads(module, *, batch_size=None, loss_reduction="sum", batch_first=True):
    """Wrap ``module`` so that a backward pass fills ``p.grad_sample`` for its
    persample norm parameters.

    Mirrors ``torch.nn.utils._per_sample_grad.call_for_per_sample_grads``. Call the
    result like the module; run the backward pass on a loss computed from its output.

    Args:
        module (nn.Module): a model holding persample norm layers (use
            :func:`persample.convert_norms` for stock norms), or the
            ``torch.compile``-d model.
        batch_size (int, optional): N; by default dim 0 (or 1, see ``batch_first``) of
            the first tensor argument.
        loss_reduction (str): ``"sum"`` if the loss sums over the batch, ``"mean"`` if it
            averages; with ``"mean"``, ``grad_sample`` is multiplied by N, so that it
            holds each example's own gradient (the Opacus and ExpandedWeights rule).
        batch_first (bool): whether the batch is dim 0 of the inputs.

    Returns:
        Callable: ``wrapper(*args, **kwargs)`` returning ``module(*args, **kwargs)``.

    Example:
        >>> model = persample.convert_group_norm(make_model())
        >>> compiled = torch.compile(model, fullgraph=True)
        >>> loss = F.cross_entropy(call_for_per_sample_grads(compiled, loss_reduction="mean")(x), y)
        >>> loss.backward()
        >>> model.gn.weight.grad_sample.shape  # [N, C]
    """
    if loss_reduction not in ("sum", "mean"):
        raise ValueError(f'loss_reduction must be "sum" or "mean", got {loss_reduction!r}')
    targets = sampled_parameters(module)
    if not targets:
        raise ValueError(
            "call_for_per_sample_grads: the module has no persample norm layer "
            "(persample.nn.GroupNorm, LayerNorm, RMSNorm) with parameters, nor a routed "
            "norm with parameters; convert the model with persample.convert_norms first"
        )

    routed = [m for m in module.modules() if getattr(m, "_persample_original", None) is not None]

    def wrapper(*args, **kwargs):
        n = batch_size if batch_size is not None else _batch_size(args, kwargs, batch_first)
        scale = n if loss_reduction == "mean" else 1
        # Every routed module learns that a call is sampled (an empty dict if it has no
        # parameter), so that it refuses a parameter it cannot sample (persample/convert.py).
        attached = {layer: {} for layer in routed}
        for layer, name in targets:
            param = getattr(layer, name)
            param.grad_sample = None
            # A plain tensor even for FSDP2's sharded DTensor parameter: the layer adds it
            # to the unsharded (plain) parameter that fully_shard swaps in for the forward.
            leaf = torch.zeros((n, *param.shape), dtype=param.dtype, device=param.device, requires_grad=True)
            leaf.register_hook(_hook(param, scale))
            attached.setdefault(layer, {})[name] = leaf
        for layer, samples in attached.items():
            _attach(layer, samples)
        try:
            out = module(*args, **kwargs)
        finally:
            for layer in attached:
                _attach(layer, None, park=False)
        _unpark_after_backward(out, list(attached))
        return out

    return wrapper


def sampled_parameters(module):
    """``[(layer, name)]``: the parameters that :func:`call_for_per_sample_grads`
    samples: the weight and bias of the persample norm layers, and
    the trainable direct parameters of modules whose group norms are routed to
    persample (``persample.convert``), e.g. a GroupNorm subclass's weight and bias."""
    out = []
    for layer in module.modules():
        if isinstance(layer, PerSampleNorm):
            out += [(layer, name) for name in _norm_params(layer)]
        elif getattr(layer, "_persample_original", None) is not None:
            out += [(layer, k) for k, p in layer.named_parameters(recurse=False) if p.requires_grad]
    return out


def _attach(layer, samples, park=True):
    """Give ``layer`` its leaves for this call (None: the call is over); with ``park``,
    also keep them for a recomputation in the backward pass (persample/leaves.py)."""
    if isinstance(layer, PerSampleNorm):
        layer._weight_sample = samples and samples.get("weight")
        layer._bias_sample = samples and samples.get("bias")
        parked = samples and (layer._weight_sample, layer._bias_sample)
    else:
        layer._persample_leaves = parked = samples
    if park:
        layer.__dict__["_persample_parked"] = parked


def _unpark_after_backward(out, layers):
    """Drop the parked leaves once the backward pass through ``out`` has finished."""

    def unpark():
        for layer in layers:
            layer.__dict__.pop("_persample_parked", None)

    def on_backward(_):
        # Runs when the backward pass reaches ``out``; the callback runs at its end,
        # after every recomputation (the engine's own end-of-pass hook).
        torch.autograd.Variable._execution_engine.queue_callback(unpark)

    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        unpark()
    for t in tensors:
        t.register_hook(on_backward)
