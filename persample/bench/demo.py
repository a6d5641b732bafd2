"""DP-SGD on scikit-learn's bundled digits with a GroupNorm CNN, through persample.

The private step — per-sample gradients of every parameter with
``torch.func.vmap(grad)`` over a model whose GroupNorm layers are
``persample.nn.GroupNorm``, per-sample clipping to ``max_grad_norm``, the sum, Gaussian
noise and the SGD update — runs as one ``torch.compile(fullgraph=True)`` graph. (Eagerly,
``--no-compile``, and in the check before training, the layers run the persample ops;
compiled under ``vmap(grad)`` they lower to ATen's GroupNorm on the per-sample view,
which inductor fuses: see ``persample.ops.functional.use_aten``.) Batches are Poisson-sampled, so their size
varies; they are padded to one fixed size with a mask, so no batch recompiles.
Privacy is accounted with Opacus's RDP accountant.
"""

import math
import time

import torch
import torch.nn.functional as F

import persample

DELTA = 1e-5


def load_digits(device, seed):
    """The 1,797 8x8 digits that ship inside scikit-learn (no download), 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        persample.nn.GroupNorm(4, 16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
        persample.nn.GroupNorm(4, 32),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def per_sample_grads(model, params, x, y):
    """``{name: Tensor[N, *param.shape]}``, the gradient of each example's own loss."""

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def clip_factors(per_sample, max_grad_norm):
    """Tensor[N]: each example's clipping factor, from its whole gradient's norm over the
    ``[N, ...]`` per-sample gradients ``per_sample`` (an iterable)."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample], 1).norm(dim=1)
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clip(grads, max_grad_norm):
    """Per-sample clipping: scale each example's whole gradient to norm <= max_grad_norm."""
    factors = clip_factors(grads.values(), max_grad_norm)
    return {k: g * factors.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}


def clipped_sum(model, params, x, y, mask, max_grad_norm):
    """Sum over the real (``mask`` = 1) examples of their clipped gradients."""
    clipped = clip(per_sample_grads(model, params, x, y), max_grad_norm)
    return {k: torch.einsum("n,n...->...", mask, g) for k, g in clipped.items()}


def private_step(model, params, x, y, mask, carry, *, lr, noise_multiplier, max_grad_norm,
                 expected_batch):
    """One DP-SGD step on a padded batch; ``carry`` holds clipped sums of earlier chunks
    of the same batch (zeros unless the batch overflowed the padding)."""
    sums = clipped_sum(model, params, x, y, mask, max_grad_norm)
    new = {}
    for name, p in params.items():
        noise = torch.randn_like(p) * (noise_multiplier * max_grad_norm)
        new[name] = p - lr * (sums[name] + carry[name] + noise) / expected_batch
    return new


def capacity(expected_batch):
    """Padded batch size: a Poisson batch exceeds it with probability < 1e-7 per step.

    vmap over a batch whose size changes recompiles under torch.compile (dynamo
    specialises vmap's batch size), so Poisson batches are padded to one fixed size,
    with a mask that zeroes the padding's contribution.
    """
    return int(expected_batch + 6 * math.sqrt(expected_batch) + 8) // 8 * 8


def padded_chunks(x, y, size):
    """The batch as chunks of exactly ``size`` rows (the last one padded), with masks."""
    for start in range(0, max(len(x), 1), size):
        xb, yb = x[start:start + size], y[start:start + size]
        pad = size - len(xb)
        mask = torch.ones(size, device=x.device)
        if pad:
            mask[len(xb):] = 0
            xb = torch.cat([xb, xb.new_zeros((pad, *xb.shape[1:]))])
            yb = torch.cat([yb, yb.new_zeros(pad)])
        yield xb, yb, mask


def per_example_reference(model, params, x, y):
    """Per-sample gradients by a float64 loop over examples with stock nn.GroupNorm."""
    ref = make_model().double()
    for i, layer in enumerate(ref):
        if isinstance(layer, persample.nn.GroupNorm):
            ref[i] = torch.nn.GroupNorm(layer.num_groups, layer.num_channels).double()
    ref.load_state_dict({k: v.double() for k, v in params.items()})
    ref.to(x.device)
    out = {k: [] for k in params}
    for xi, yi in zip(x.double(), y):
        ref.zero_grad()
        F.cross_entropy(ref(xi[None]), yi[None]).backward()
        for k, p in ref.named_parameters():
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def accuracy(model, params, x, y):
    with torch.no_grad():
        return (torch.func.functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()


def train(args):
    from opacus.accountants import RDPAccountant
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits(device, args.seed)
    model = make_model().to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n_train = len(x_train)
    q = args.batch_size / n_train
    steps_per_epoch = max(1, round(1 / q))
    print(f"persample {persample.__version__} | torch {torch.__version__} | device {device} | "
          f"threads {torch.get_num_threads()}")
    print(f"digits: {n_train} train / {len(x_test)} test; Poisson sampling rate {q:.4f} "
          f"(expected batch {args.batch_size}), {steps_per_epoch} steps/epoch")

    # Verify the per-sample gradients on one batch before training.
    check = per_sample_grads(model, params, x_train[:32], y_train[:32])
    ref = per_example_reference(model, params, x_train[:32], y_train[:32])
    err = max((check[k].double() - ref[k]).abs().max().item() for k in ref)
    print(f"per-sample gradients vs a float64 per-example loop, all parameters: max abs error {err:.2e}")
    if not err < 1e-4:
        raise SystemExit("per-sample gradient check failed")

    size = capacity(args.batch_size)
    hyper = dict(noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm)
    step = lambda *a: private_step(model, *a, lr=args.lr, expected_batch=args.batch_size, **hyper)  # noqa: E731
    partial = lambda *a: clipped_sum(model, *a, args.max_grad_norm)  # noqa: E731
    compiles = None
    if not args.no_compile:
        from torch._dynamo.testing import CompileCounterWithBackend

        compiles = CompileCounterWithBackend("inductor")
        step = torch.compile(step, fullgraph=True, backend=compiles)
        partial = torch.compile(partial, fullgraph=True, backend=compiles)

    accountant = RDPAccountant()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    compile_seconds, steps, train_seconds = 0.0, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", unit="step")
        for _ in range(steps_per_epoch):
            mask = torch.rand(n_train, generator=generator, device=device) < q
            chunks = list(padded_chunks(x_train[mask], y_train[mask], size))
            before = compiles.frame_count if compiles else 0
            start = time.perf_counter()
            carry = {k: torch.zeros_like(v) for k, v in params.items()}
            for xb, yb, mb in chunks[:-1]:  # only when the batch overflows the padding
                carry = {k: carry[k] + s for k, s in partial(params, xb, yb, mb).items()}
            params = step(params, *chunks[-1], carry)
            elapsed = time.perf_counter() - start
            if compiles and compiles.frame_count != before:
                compile_seconds += elapsed
            else:
                train_seconds += elapsed
            accountant.step(noise_multiplier=args.noise_multiplier, sample_rate=q)
            steps += 1
            bar.update()
        acc = accuracy(model, params, x_test, y_test)
        bar.set_postfix_str(f"test acc {acc:.3f}, eps {accountant.get_epsilon(DELTA):.2f}")
        bar.close()
    eps = accountant.get_epsilon(DELTA)
    acc = accuracy(model, params, x_test, y_test)
    print(f"test accuracy {acc:.4f} | epsilon {eps:.2f} at delta {DELTA:g} | "
          f"{steps / max(train_seconds, 1e-9):.1f} steps/s | compile time {compile_seconds:.1f} s"
          + (f" ({compiles.frame_count} graph(s))" if compiles else " (eager)"))
    return {"accuracy": acc, "epsilon": eps, "steps": steps, "compile_seconds": compile_seconds,
            "graphs": compiles.frame_count if compiles else 0}


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m persample", description=__doc__)
    p.add_argument("--epochs", type=_positive(int), default=12)
    p.add_argument("--batch-size", type=_positive(int), default=128, help="expected (Poisson) batch size")
    p.add_argument("--noise-multiplier", type=_positive(float), default=1.3)
    p.add_argument("--max-grad-norm", type=_positive(float), default=1.0)
    p.add_argument("--lr", type=_positive(float), default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run the private step eagerly")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        import opacus  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        p.error(f"{e.name} is missing: pip install 'persample[demo]'")
    train(args)
