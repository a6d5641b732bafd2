"""The methods that ``persample.bench`` times. Each factory takes a :class:`Case` and
returns a zero-argument step that runs one forward+backward and yields per-sample
weight and bias gradients (except ``plain``, the non-private floor)."""

import copy

import torch

import persample

from ..grad_sample import call_for_per_sample_grads


class Unavailable(Exception):
    """A method that cannot run here (a missing optional package)."""


class Case:
    def __init__(self, shape, channels_last, device):
        n, c, h, w, g = shape
        self.n, self.groups = n, g
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt)
        self.dy = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt)
        self.x.requires_grad_()
        self.stock = torch.nn.GroupNorm(g, c).to(device)
        with torch.no_grad():
            self.stock.weight.normal_()
            self.stock.bias.normal_()

    def stock_copy(self):
        """A private copy of the layer: Opacus leaves hooks on the modules it wraps."""
        return copy.deepcopy(self.stock)

    def persample_copy(self):
        return persample.convert_group_norm(copy.deepcopy(self.stock))

    def backward(self, y):
        self.x.grad = None
        y.backward(self.dy)

    def leaves(self):
        """``[N, C]`` per-sample views of the layer's parameters, as autograd leaves."""
        return tuple(p.detach().expand(self.n, -1).requires_grad_()
                     for p in (self.stock.weight, self.stock.bias))


def plain(case):
    return lambda: case.backward(case.stock(case.x))


def persample_eager(case, fn=persample.group_norm):
    def step():
        w, b = case.leaves()
        case.backward(fn(case.x, case.groups, w, b))
        return w.grad, b.grad

    return step


def persample_compiled(case):
    return persample_eager(case, torch.compile(persample.group_norm, fullgraph=True))


def persample_grad_sample(case):
    """The model-level API: p.grad_sample for a persample.nn.GroupNorm."""
    wrapped = call_for_per_sample_grads(case.persample_copy())
    return lambda: case.backward(wrapped(case.x))


def expanded_weights(case):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads as ew

    layer = case.stock_copy()

    def step():
        case.backward(ew(layer)(case.x))
        layer.weight.grad_sample = layer.bias.grad_sample = None

    return step


def _opacus(case, layer):
    """Opacus hooks mode (GradSampleModule) around ``layer``."""
    try:
        from opacus import GradSampleModule
    except ImportError as e:
        raise Unavailable("opacus is not installed (pip install 'persample[opacus]')") from e
    import persample.opacus  # noqa: F401  (registers the persample sampler)

    gsm = GradSampleModule(layer)

    def step():
        case.backward(gsm(case.x))
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample

    return step


def _func(case, layer, compiled):
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, dyi):
        return (torch.func.functional_call(layer, p, (xi[None],)) * dyi[None]).sum()

    fn = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    x = case.x.detach()
    return lambda: fn(params, x, case.dy)


METHODS = {
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
