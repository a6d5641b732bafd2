"""``python -m persample``: a short self-check and demo.

Computes per-sample GroupNorm gradients three ways (eager, ``torch.compile``, and
``torch.func.vmap(grad)``), checks each against a per-example loop over stock
``F.group_norm`` in float64, and prints the largest error.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import persample


def _model(channels=8, groups=2):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1),
        persample.nn.GroupNorm(groups, channels),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(channels, 4),
    )


def _loss(model, params, x, y):
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="sum")


def per_sample_expanded(model, x, y, loss_fn=_loss):
    """Per-sample GroupNorm grads through ``[N, C]`` expanded weight/bias leaves."""
    params = dict(model.named_parameters())
    leaves = {
        k: p.detach().expand(len(x), -1).requires_grad_()
        for k, p in params.items()
        if k.startswith("1.")
    }
    loss_fn(model, {**params, **leaves}, x, y).backward()
    return {k: v.grad for k, v in leaves.items()}


def per_sample_vmap(model, x, y):
    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, xi, yi):
        return _loss(model, p, xi.unsqueeze(0), yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {k: v for k, v in grads.items() if k.startswith("1.")}


def reference(model, x, y):
    """Per-example loop in float64 over a stock nn.GroupNorm copy of the model."""
    ref = _model().double()
    ref.load_state_dict(model.state_dict())
    ref[1] = torch.nn.GroupNorm(2, 8).double()
    ref[1].load_state_dict(model[1].state_dict())
    out = {"1.weight": [], "1.bias": []}
    for xi, yi in zip(x.double(), y):
        ref.zero_grad()
        _loss(ref, dict(ref.named_parameters()), xi[None], yi[None]).backward()
        out["1.weight"].append(ref[1].weight.grad.clone())
        out["1.bias"].append(ref[1].bias.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def _max_error(got, ref):
    return max((got[k].double() - ref[k]).abs().max().item() for k in ref)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m persample", description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    torch.manual_seed(args.seed)
    model = _model()
    x, y = torch.randn(args.batch_size, 3, 12, 12), torch.randint(0, 4, (args.batch_size,))
    ref = reference(model, x, y)
    print(f"persample {persample.__version__}, torch {torch.__version__}")
    print(f"per-sample GroupNorm grads for a batch of {len(x)}, vs a float64 per-example loop:")
    checks = [("eager, [N, C] expanded weights", per_sample_expanded),
              ("torch.func.vmap(grad), eager", per_sample_vmap)]
    if not args.no_compile:
        compiled = torch.compile(_loss, fullgraph=True)
        checks.append(
            ("torch.compile(fullgraph=True)", lambda *a: per_sample_expanded(*a, loss_fn=compiled))
        )
    worst = 0.0
    for name, fn in checks:
        start = time.perf_counter()
        err = _max_error(fn(model, x, y), ref)
        worst = max(worst, err)
        print(f"  {name:<34} max abs error {err:.2e}   ({time.perf_counter() - start:.1f} s)")
    ok = worst < 1e-4
    print("self-check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
