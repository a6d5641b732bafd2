"""Benchmark: per-sample GroupNorm gradients against plain GroupNorm and ExpandedWeights.

Run ``python -m persample.bench``. For every shape it times forward+backward of each
method, interleaving the methods round by round in one process so that drift in
machine load hits them alike, and prints the medians and ratios to plain
``nn.GroupNorm``, which computes no per-sample gradients and is the floor.
"""

import argparse
import ctypes
import math
import statistics
import time

import torch

import persample

# The BRIEF's shapes (N, C, H, W, G), plus channels_last.
SHAPES = [
    ((64, 64, 32, 32, 32), False),
    ((256, 32, 16, 16, 8), False),
    ((32, 256, 8, 8, 32), False),
    ((8, 128, 64, 64, 32), False),
    ((64, 64, 32, 32, 32), True),
]
QUICK_SHAPES = [((32, 256, 8, 8, 32), False), ((16, 64, 16, 16, 32), True)]


def _plain(gn, x, dy):
    gn(x).backward(dy)


def _persample(gn, x, dy):
    n = x.shape[0]
    w = gn.weight.detach().expand(n, -1).requires_grad_()
    b = gn.bias.detach().expand(n, -1).requires_grad_()
    persample.group_norm(x, gn.num_groups, w, b, gn.eps).backward(dy)
    return w.grad, b.grad


def _expanded_weights(gn, x, dy):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    call_for_per_sample_grads(gn)(x).backward(dy)
    grads = gn.weight.grad_sample, gn.bias.grad_sample
    gn.weight.grad_sample = gn.bias.grad_sample = None
    return grads


METHODS = {"plain": _plain, "persample": _persample, "expanded_weights": _expanded_weights}


def _inputs(shape, channels_last, device):
    n, c, h, w, g = shape
    x = torch.randn(n, c, h, w, device=device)
    dy = torch.randn_like(x)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    gn = torch.nn.GroupNorm(g, c).to(device)
    return gn, x.requires_grad_(), dy


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_methods(methods, args, rounds, device):
    """Per-round seconds of each method, interleaved round by round."""
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn(*args)
    names = list(methods)
    for r in range(rounds):
        # Rotate the order, so that each method follows each other equally often
        # (caches and the allocator carry state from one method to the next).
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = methods[name]
            args[1].grad = None
            _sync(device)
            start = time.perf_counter()
            fn(*args)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def run(shapes, rounds, device):
    rows = []
    for shape, channels_last in shapes:
        gn, x, dy = _inputs(shape, channels_last, device)
        times = time_methods(METHODS, (gn, x, dy), rounds, device)
        rows.append(
            {
                "shape": shape,
                "channels_last": channels_last,
                "seconds": {name: statistics.median(t) for name, t in times.items()},
                # Ratios are medians of same-round pairs, which cancels slow drift.
                "ratio_to_plain": {
                    name: statistics.median(a / b for a, b in zip(t, times["plain"]))
                    for name, t in times.items()
                },
            }
        )
    return rows


def report(rows):
    print(f"{'N,C,H,W,G':<18}{'layout':<9}{'plain ms':>9}{'persample ms':>13}"
          f"{'EW ms':>8}{'ps/plain':>10}{'EW/ps':>8}")
    ratios, speedups = [], []
    for row in rows:
        s, r = row["seconds"], row["ratio_to_plain"]
        ratio, speedup = r["persample"], r["expanded_weights"] / r["persample"]
        ratios.append(ratio)
        speedups.append(speedup)
        print(f"{','.join(map(str, row['shape'])):<18}{'NHWC' if row['channels_last'] else 'NCHW':<9}"
              f"{s['plain'] * 1e3:>9.3f}{s['persample'] * 1e3:>13.3f}"
              f"{s['expanded_weights'] * 1e3:>8.3f}{ratio:>10.3f}{speedup:>8.2f}")
    gmean = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
    print(f"geometric mean: persample/plain = {gmean(ratios):.3f}, "
          f"speed-up over ExpandedWeights = {gmean(speedups):.2f}x")


def _steady_allocator():
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    By default glibc maps big tensors with mmap and unmaps them on free, so each step
    pays page faults whose count depends on allocation order, not on the method timed:
    repeated runs of the same method then differ by 2-3x. Fixing the thresholds makes
    every method reuse memory, as a tuned allocator (jemalloc, tcmalloc) would.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # glibc's largest mmap threshold is 32 MiB; mallopt takes a C int.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
            libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        )
    except (OSError, AttributeError):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m persample.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per method")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    rounds = args.rounds or (20 if args.quick else 100)
    steady = _steady_allocator()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"rounds {rounds}, glibc allocator pinned: {steady}")
    report(run(QUICK_SHAPES if args.quick else SHAPES, rounds, device))


if __name__ == "__main__":
    main()
