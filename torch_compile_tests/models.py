"""The tiny model that the compile, export and AOTInductor tests share, a one-example
loss over ``persample.group_norm`` for the torch.func tests, and the per-example loops
that serve as ground truth for per-sample gradients."""

import torch
import torch.nn.functional as F

import persample

N_CLASSES = 4
IMAGE = (3, 8, 8)


class SmallNet(torch.nn.Module):
    """Conv2d(3, 8, 3) -> GroupNorm(2, 8) -> ReLU -> Linear, on ``[N, 3, 8, 8]`` images."""

    def __init__(self, norm=persample.nn.GroupNorm):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.gn = norm(2, 8)
        self.fc = torch.nn.Linear(8 * 6 * 6, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.gn(self.conv(x))).flatten(1))


def make_models(dtype=torch.float32):
    """A persample SmallNet and a stock ``nn.GroupNorm`` twin with the same parameters."""
    model = SmallNet().to(dtype)
    with torch.no_grad():
        # GroupNorm starts at weight 1, bias 0, which would hide a weight/bias mix-up.
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.normal_()
    stock = SmallNet(norm=torch.nn.GroupNorm).to(dtype)
    stock.load_state_dict(model.state_dict())
    return model, stock


def batch(n, dtype=torch.float32):
    return torch.randn(n, *IMAGE, dtype=dtype), torch.randint(0, N_CLASSES, (n,))


def loss_fn(logits, y):
    # "sum", so that a per-sample gradient is that sample's own loss gradient, with no
    # 1/N factor that would differ between the batched and the one-sample calls.
    return F.cross_entropy(logits, y, reduction="sum")


def per_example_grads(stock, x, y, names=("gn.weight", "gn.bias")):
    """``{name: Tensor[N, *param.shape]}``, by one stock forward and backward per sample."""
    params = dict(stock.named_parameters())
    rows = [
        torch.autograd.grad(loss_fn(stock(x[i : i + 1]), y[i : i + 1]), [params[k] for k in names])
        for i in range(x.shape[0])
    ]
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(names)}


def per_sample_leaves(gn, n):
    """``[N, C]`` weight and bias leaves holding ``gn``'s values, whose ``.grad`` is per sample."""
    return tuple(p.detach().expand(n, -1).requires_grad_() for p in (gn.weight, gn.bias))


def per_sample_loss(weight, bias, x, target):
    # One example: x [C, H, W] -> the batch of one that GroupNorm expects.
    y = persample.group_norm(x[None], 2, weight, bias)
    return F.mse_loss(y, target[None], reduction="sum")


def stock_loop(weight, bias, x, target, dtype=torch.float64):
    """Per-example gradients of :func:`per_sample_loss` over stock GroupNorm, in ``dtype``."""
    grads = []
    for xi, ti in zip(x.to(dtype), target.to(dtype)):
        w, b = weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
        loss = F.mse_loss(F.group_norm(xi[None], 2, w, b), ti[None], reduction="sum")
        grads.append(torch.autograd.grad(loss, (w, b)))
    return tuple(torch.stack(g) for g in zip(*grads))
