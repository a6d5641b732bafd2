"""The DP-SGD steps that ``python -m persample.bench --model`` times, one per method.

Each factory takes a :class:`Workload` (a model of :mod:`persample.models`, a synthetic
batch and its loss) and returns a zero-argument step that runs one whole DP-SGD step
on a private copy of the model: per-sample gradients of every parameter, per-sample
clipping to ``MAX_GRAD_NORM``, the sum, Gaussian noise and the SGD update (Opacus's
``DPOptimizer`` where Opacus runs the step). ``step.parameters()`` gives the trained
parameters, so that tests can check that every method applies the same update.
"""

import copy

import torch
import torch.nn.functional as F

import persample

from .. import models
from .demo import clip_factors
from ..grad_sample import call_for_per_sample_grads, per_sample_layers
from .methods import Unavailable

MAX_GRAD_NORM, NOISE_MULTIPLIER, LR = 1.0, 1.0, 0.1
BACKEND = "inductor"  # of every torch.compile here; tests of the plumbing use a cheaper one
# name -> (model factory, kwargs, image size); tests swap in small versions.
MODELS = {
    "wrn16-4": (models.WideResNet, {}, 32),
    "unet": (models.DiffusionUNet, {}, 32),
    "vit": (models.VisionTransformer, {}, 32),
}
# Stock norm classes (persample's subclass them): the layers whose parameters the
# "_norms_only" methods train and whose time the profile counts.
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)


class Workload:
    """A stock model, a synthetic batch and the loss of its training step.

    ``inputs`` (tuple of Tensor[N, ...]) go to the model, ``targets`` to
    ``loss(output, *targets, reduction=...)``, whose ``"none"`` reduction gives Tensor[N].
    """

    def __init__(self, name, batch_size, device):
        factory, kwargs, size = MODELS[name]
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.name, self.n, self.device = name, batch_size, device
        self.model = factory(**kwargs).to(device)
        x = models.synthetic_images(batch_size, size, generator=g)
        if name == "unet":
            self.inputs, self.targets = _split(models.noisy_batch(x.clamp(-1, 1), generator=g), 2)
            self.loss = models.noise_prediction_loss
        else:
            self.inputs, self.targets = (x,), (models.synthetic_labels(batch_size, generator=g),)
            self.loss = _cross_entropy
        self.inputs = tuple(t.to(device) for t in self.inputs)
        self.targets = tuple(t.to(device) for t in self.targets)

    def copy(self, persample_norm):
        model = copy.deepcopy(self.model)
        return persample.convert_norms(model) if persample_norm else model

    def batch_loss(self, model, reduction="mean"):
        return self.loss(model(*self.inputs), *self.targets, reduction=reduction)


def _split(tensors, k):
    return tuple(tensors[:k]), tuple(tensors[k:])


def _cross_entropy(logits, y, reduction="mean"):
    return F.cross_entropy(logits, y, reduction=reduction)


class LossCriterion(torch.nn.Module):
    """The workload's loss as the criterion Opacus's ghost clipping wants: a module with a
    ``reduction`` attribute that it sets to "none" for per-example losses."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.reduction = loss, "mean"

    def forward(self, output, *targets):
        return self.loss(output, *targets, reduction=self.reduction)


def _with_parameters(step, named):
    """The step, with ``step.parameters()``: ``{name: Tensor}`` of the model it trains
    (the tests compare the updates of every method)."""
    step.parameters = lambda: {k: v.detach() for k, v in named()}
    return step


def nonprivate(w, compiled=True):
    """The floor: a plain SGD step on the batch-mean loss (stock norms)."""
    model = w.copy(False)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        w.batch_loss(compiled).backward()
        optimizer.step()

    return _with_parameters(step, model.named_parameters)


def _opacus(w, persample_norm, ghost):
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise Unavailable("opacus is not installed (pip install 'persample[opacus]')") from e
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    import persample.opacus  # noqa: F401  (registers the persample sampler)

    model = w.copy(persample_norm)
    dp = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
              expected_batch_size=w.n, loss_reduction="mean")
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    if ghost:
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", max_grad_norm=MAX_GRAD_NORM,
                                                   use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(sgd, **dp)
        criterion = DPLossFastGradientClipping(gsm, optimizer, LossCriterion(w.loss), "mean")
    else:
        gsm = GradSampleModule(model, loss_reduction="mean")
        optimizer = DPOptimizer(sgd, **dp)

    def step():
        optimizer.zero_grad(set_to_none=True)  # drops grad_sample too
        if ghost:
            criterion(gsm(*w.inputs), *w.targets).backward()  # both of ghost clipping's passes
        else:
            w.batch_loss(gsm).backward()
        optimizer.step()  # clip, sum, noise, update

    return _with_parameters(step, model.named_parameters)


def dp_sgd_step(model, loss, n, n_inputs, *, compiled, trained=None):
    """``step(params, *inputs, *targets) -> new params``: a whole DP-SGD step through
    ``torch.func.vmap(grad)``, as ``python -m persample`` runs it; the first ``n_inputs``
    batch tensors go to the model, the rest to ``loss``. ``trained`` (names) restricts
    the step to those parameters; the others stay fixed."""

    def step(params, *batch):
        train = {k: v for k, v in params.items() if trained is None or k in trained}
        fixed = {k: v for k, v in params.items() if k not in train}

        def example_loss(p, *example):
            inputs, targets = _split([e[None] for e in example], n_inputs)
            return loss(torch.func.functional_call(model, {**fixed, **p}, tuple(inputs)), *targets,
                        reduction="sum")

        per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None,) + (0,) * len(batch))
        grads = per_example(train, *batch)
        factors = clip_factors(grads.values(), MAX_GRAD_NORM)
        return {k: p - LR * (torch.einsum("n,n...->...", factors, grads[k])
                             + torch.randn_like(p) * (NOISE_MULTIPLIER * MAX_GRAD_NORM)) / n
                for k, p in train.items()}

    return torch.compile(step, fullgraph=True, backend=BACKEND) if compiled else step


def _func(w, persample_norm, compiled, norms_only=False):
    model = w.copy(persample_norm)
    trained = norm_parameter_names(model) if norms_only else None
    step = dp_sgd_step(model, w.loss, w.n, len(w.inputs), compiled=compiled, trained=trained)
    state = {k: v.detach().clone() for k, v in model.named_parameters()}

    def run():
        state.update(step(state, *w.inputs, *w.targets))

    return _with_parameters(run, state.items)


def norm_parameter_names(model):
    """The names of the weights and biases of ``model``'s norm layers (:data:`NORMS`)."""
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, NORMS)
            for p in ("weight", "bias") if getattr(m, p) is not None}


def grad_sample_norms_only(w):
    """``persample.call_for_per_sample_grads`` around the compiled model: DP fine-tuning of
    the norm parameters alone (the others frozen), the one full DP step it serves."""
    model = w.copy(True)
    params = [p for layer in per_sample_layers(model) for k in ("weight", "bias")
              if (p := getattr(layer, k, None)) is not None]
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    wrapped = call_for_per_sample_grads(compiled, loss_reduction="sum")

    def step():
        w.loss(wrapped(*w.inputs), *w.targets, reduction="sum").backward()
        grads = [p.grad_sample for p in params]
        factors = clip_factors(grads, MAX_GRAD_NORM)
        with torch.no_grad():
            for p, g in zip(params, grads):
                noise = torch.randn_like(p) * (NOISE_MULTIPLIER * MAX_GRAD_NORM)
                p.sub_((factors @ g + noise) * (LR / w.n))
                p.grad = p.grad_sample = None

    return _with_parameters(step, model.named_parameters)


METHODS = {
    "nonprivate_compiled": nonprivate,
    "nonprivate_eager": lambda w: nonprivate(w, compiled=False),
    "opacus_stock": lambda w: _opacus(w, False, False),
    "opacus_persample": lambda w: _opacus(w, True, False),
    "opacus_ghost_stock": lambda w: _opacus(w, False, True),
    "opacus_ghost_persample": lambda w: _opacus(w, True, True),
    "func_stock": lambda w: _func(w, False, False),
    "func_persample": lambda w: _func(w, True, False),
    "func_stock_compiled": lambda w: _func(w, False, True),
    "func_persample_compiled": lambda w: _func(w, True, True),
    "grad_sample_norms_only": grad_sample_norms_only,
    "func_stock_compiled_norms_only": lambda w: _func(w, False, True, norms_only=True),
}
# Not a whole-model step, so not run unless asked for (--methods).
_NORMS_ONLY = ("persample.call_for_per_sample_grads covers norm parameters only; a whole-model DP step "
               "needs every parameter's per-sample gradient (--methods "
               "grad_sample_norms_only,func_stock_compiled_norms_only "
               "times DP fine-tuning of the norm parameters alone, the one full step it serves)")
OPT_IN = {"grad_sample_norms_only": _NORMS_ONLY, "func_stock_compiled_norms_only": _NORMS_ONLY}
