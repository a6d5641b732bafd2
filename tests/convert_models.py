"""Test architectures whose group norms stock conversion used to miss, and their
references (shared by tests/test_convert*.py, tests/test_checkpoint.py and
torch_compile_tests/test_convert_compiled.py).

- ``GroupNormAct``: an ``nn.GroupNorm`` subclass that fuses its activation in its own
  forward (``F.group_norm`` then SiLU), as model libraries' norm-act layers do;
- ``PlainSubclass``: a subclass that keeps ``nn.GroupNorm``'s forward;
- ``ScaleShiftNorm``: a module with its own ``[C]`` parameters that calls
  ``torch.group_norm`` directly;
- ``AdaGroupNorm``: a conditional norm: ``F.group_norm`` without affine parameters,
  then a scale and shift computed from the input (diffusion code's adaptive norm);
- a stock ``nn.GroupNorm``.
"""


import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.samples import per_example_model_grads as float64_per_example_grads  # noqa: F401  (the float64 truth)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm fused with SiLU, in its own forward."""

    def __init__(self, num_channels, num_groups):
        super().__init__(num_groups, num_channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class PlainSubclass(nn.GroupNorm):
    """A subclass that changes only the constructor."""

    def __init__(self, num_channels):
        super().__init__(2, num_channels, eps=1e-6)


class ScaleShiftNorm(nn.Module):
    """Its own [C] weight and bias, through ``torch.group_norm`` called directly."""

    def __init__(self, channels, groups):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return torch.group_norm(x, self.groups, self.weight, self.bias, 1e-5)


class AdaGroupNorm(nn.Module):
    """Scale and shift from a pooled embedding, after an affine-free group norm."""

    def __init__(self, channels, groups):
        super().__init__()
        self.groups = groups
        self.proj = nn.Linear(channels, 2 * channels)

    def forward(self, x):
        scale, shift = self.proj(x.mean((2, 3))).chunk(2, dim=1)
        return F.group_norm(x, self.groups) * (1 + scale[..., None, None]) + shift[..., None, None]


class Net(nn.Module):
    """Every kind of group norm above, between convolutions, to a 3-class head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act_norm = GroupNormAct(8, 4)
        self.plain = PlainSubclass(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.scale_shift = ScaleShiftNorm(8, 2)
        self.ada = AdaGroupNorm(8, 4)
        self.stock = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.plain(self.act_norm(self.stem(x)))
        x = self.stock(self.ada(self.scale_shift(self.conv(x))))
        return self.head(x.mean((2, 3)))


# The parameters that call_for_per_sample_grads samples in Net: every group norm's own.
NORM_PARAMS = [f"{m}.{p}" for m in ("act_norm", "plain", "scale_shift", "stock") for p in ("weight", "bias")]


def make_net():
    """A Net with non-trivial norm parameters (not the ones and zeros of a fresh norm)."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in NORM_PARAMS:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return net


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def func_per_example_grads(model, x, y):
    """``{name: Tensor[N, *shape]}`` by ``vmap(grad)`` over ``model`` in its own dtype:
    for an unconverted model, stock PyTorch's own per-sample result."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def count_persample_calls(model, *args):
    """How many ``persample::group_norm`` calls ``model(*args)`` makes, and how many
    ATen group norms (``aten::native_group_norm``), by a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"persample": 0, "aten": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().startswith("persample::group_norm"):
                counts["persample"] += 1
            elif func.name().startswith("aten::native_group_norm"):
                counts["aten"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(*args)
    return counts
