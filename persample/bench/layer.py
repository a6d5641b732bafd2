"""``python -m persample.bench``, the default suite: one GroupNorm layer's per-sample
gradients, against every peer.

For every shape it times one forward+backward of each method, interleaved round by
round in one process (the order rotates each round, so that caches and the allocator
treat the methods alike), and prints the median time and the median same-round ratio
to plain ``nn.GroupNorm``, which computes no per-sample gradients and is the floor.
All other methods produce the ``[N, C]`` per-sample weight and bias gradients.
"""

import ctypes
import json
import math
import platform
import statistics

import torch

from ..ops.group_norm import eager
from . import methods as M
from .timing import time_interleaved

SHAPES = [  # (N, C, H, W, G), channels_last: the BRIEF's table, plus channels_last
    ((64, 64, 32, 32, 32), False),
    ((256, 32, 16, 16, 8), False),
    ((32, 256, 8, 8, 32), False),
    ((8, 128, 64, 64, 32), False),
    ((64, 64, 32, 32, 32), True),
]
QUICK_SHAPES = [((32, 256, 8, 8, 32), False), ((16, 64, 16, 16, 32), True)]


def _steady_allocator():
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    By default glibc maps big tensors with mmap and unmaps them on free, so each step
    pays page faults whose number depends on the allocation order, not on the method:
    repeated runs of one method then differ by 2-3x. Fixed thresholds make every method
    reuse memory, as a tuned allocator (jemalloc, tcmalloc) would.
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


def run_shape(shape, channels_last, rounds, device, wanted):
    # Each shape compiles afresh; dynamo's per-function recompile limit would otherwise
    # be reached across shapes.
    torch._dynamo.reset()
    case = M.Case(shape, channels_last, device)
    steps, skipped = {}, {}
    for name in wanted:
        try:
            steps[name] = M.METHODS[name](case)
        except M.Unavailable as why:
            skipped[name] = str(why)
    for name, step in list(steps.items()):  # warm-up: compiles, caches
        try:
            step()
            step()
        except Exception as e:  # noqa: BLE001  (a peer's own bug must not end the run)
            if name == "plain":
                raise
            del steps[name]
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    times = time_interleaved(steps, rounds, device)
    plain = times["plain"]
    return {
        "shape": list(shape),
        "channels_last": channels_last,
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        # Medians of same-round pairs, which cancel slow drift in machine load.
        "ratio_to_plain": {
            k: statistics.median(a / b for a, b in zip(v, plain)) for k, v in times.items()
        },
        "skipped": skipped,
    }


def _gmean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def _names(rows):
    """Every measured method, in the order the rows give them."""
    return list(dict.fromkeys(n for r in rows for n in r["ratio_to_plain"]))


def summary(rows):
    """Geometric means over shapes of each method's ratio to plain, for the methods that
    ran on every shape (a mean over fewer shapes would not compare)."""
    return {n: _gmean([r["ratio_to_plain"][n] for r in rows]) for n in _names(rows)
            if all(n in r["ratio_to_plain"] for r in rows)}


def report(rows, header):
    print(header)
    names = _names(rows)
    print("per-sample forward+backward: median ms (ratio to plain nn.GroupNorm)")
    print(f"{'N,C,H,W,G':<16}{'layout':<7}" + "".join(f"{n:>24}" for n in names))
    for row in rows:
        cells = "".join(
            f"{row['ms'][n]:>15.3f} ({row['ratio_to_plain'][n]:>5.2f})" if n in row["ms"]
            else f"{'-':>24}" for n in names
        )
        layout = "NHWC" if row["channels_last"] else "NCHW"
        print(f"{','.join(map(str, row['shape'])):<16}{layout:<7}{cells}")
    means = summary(rows)
    print("geometric mean of ratio to plain: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()))
    if "expanded_weights" in means:
        print(f"persample speed-up over ExpandedWeights: "
              f"{means['expanded_weights'] / means['persample']:.2f}x")
    for row in rows:
        for name, why in row["skipped"].items():
            print(f"skipped {name} at {','.join(map(str, row['shape']))}"
                  f"{' NHWC' if row['channels_last'] else ''}: {why}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    names = _names(rows)
    labels = [",".join(map(str, r["shape"])) + (" NHWC" if r["channels_last"] else "") for r in rows]
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))],
               [r["ratio_to_plain"].get(name, 0) for r in rows], width, label=name, color=colors[i % 20])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([0.5, 0.75, 1, 1.5, 2, 3, 4, 6]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("time / plain nn.GroupNorm (log scale)")
    ax.set_title("per-sample GroupNorm gradients, forward+backward (lower is better)")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args, parser):
    """The suite, from ``persample.bench``'s parsed arguments (``methods``, ``rounds``,
    ``quick``, ``device``, ``json``, ``plot``)."""
    device = torch.device(args.device)
    wanted = args.methods.split(",") if args.methods else list(M.METHODS)
    unknown = set(wanted) - set(M.METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if "plain" not in wanted:
        wanted.insert(0, "plain")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds = args.rounds or (10 if args.quick else 40)
    steady = _steady_allocator()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    cpp = "built" if eager.LIBRARY else "not built (Python kernels)"
    header = (f"torch {torch.__version__} | device {device} ({name}) | "
              f"threads {torch.get_num_threads()} | rounds {rounds} | glibc allocator pinned {steady} | "
              f"C++ eager path {cpp}")
    torch.manual_seed(0)
    rows = [run_shape(s, cl, rounds, device, wanted)
            for s, cl in (QUICK_SHAPES if args.quick else SHAPES)]
    report(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "geomean_ratio_to_plain": summary(rows)}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
