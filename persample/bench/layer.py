"""``python -m persample.bench [--op group_norm|layer_norm|rms_norm]``, the layer suite:
one norm layer's per-sample gradients, against every peer.

For every case (a shape, with a layout or a dtype) it times one forward+backward of each
method of the op's table (persample.bench.methods), interleaved round by round in one
process (the order rotates each round, so that caches and the allocator treat the
methods alike), and prints the median time and the median same-round ratio to plain
``nn.GroupNorm`` / ``nn.LayerNorm`` / ``nn.RMSNorm``, which computes no per-sample
gradients and is the floor. All other methods produce the ``[N, C]`` (or ``[N, D]``)
per-sample weight and bias gradients.
"""

import ctypes
import json
import math
import platform
import statistics

import torch

from ..ops.shared import backends
from . import methods as M
from .cases import CASES
from .timing import time_interleaved

BF16 = torch.bfloat16
# (case arguments...) per op: the GroupNorm suite's are the BRIEF's table plus
# channels_last; the row norms' are transformer shapes (N samples, T tokens, width D).
_ROW_SHAPES = [(16, 128, 768), (8, 512, 1024), (64, 64, 384)]
SHAPES = {
    "group_norm": [
        ((64, 64, 32, 32, 32), False),
        ((256, 32, 16, 16, 8), False),
        ((32, 256, 8, 8, 32), False),
        ((8, 128, 64, 64, 32), False),
        ((64, 64, 32, 32, 32), True),
    ],
    "layer_norm": [(s, dtype) for dtype in (torch.float32, BF16) for s in _ROW_SHAPES],
    "rms_norm": [(s, dtype) for dtype in (torch.float32, BF16) for s in _ROW_SHAPES],
}
_ROW_QUICK = [((4, 32, 64), torch.float32), ((2, 64, 128), BF16)]
QUICK_SHAPES = {
    "group_norm": [((32, 256, 8, 8, 32), False), ((16, 64, 16, 16, 32), True)],
    "layer_norm": _ROW_QUICK,
    "rms_norm": _ROW_QUICK,
}


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


def run_case(op, spec, rounds, device, wanted, table=None):
    """Build, warm up (compile) and time every ``wanted`` method of ``table`` (default
    the op's, ``METHODS[op]``) on the case ``CASES[op](*spec, device)``: one JSON row."""
    table = M.METHODS[op] if table is None else table
    # Each case compiles afresh; dynamo's per-function recompile limit would otherwise
    # be reached across cases.
    torch._dynamo.reset()
    case = CASES[op](*spec, device)
    steps, skipped = {}, {}
    for name in wanted:
        try:
            steps[name] = table[name](case)
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
    # Same-round pairs, which cancel slow drift in machine load.
    ratios = {k: [a / b for a, b in zip(v, times["plain"])] for k, v in times.items()}
    return {
        **case.describe(),
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio_to_plain": {k: statistics.median(r) for k, r in ratios.items()},
        "ratio_range": {k: [min(r), max(r)] for k, r in ratios.items()},
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


def summary_by_dtype(rows):
    """``{dtype: summary}`` over the rows of each dtype, for suites that have several
    (the row norms: fp32 and bf16 are different questions), else empty."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows if "dtype" in r))
    if len(dtypes) < 2:
        return {}
    return {d: summary([r for r in rows if r.get("dtype") == d]) for d in dtypes}


_PEERS = ("expanded_weights", "opacus_stock", "func_stock")


def _means_line(means):
    line = ", ".join(f"{n} {v:.3f}" for n, v in means.items())
    ups = [f"{peer} {means[peer] / means['persample']:.2f}x" for peer in _PEERS
           if peer in means and "persample" in means]
    return line + (f"\n    persample speed-up over: {', '.join(ups)}" if ups else "")


def report(rows, header, op="group_norm"):
    print(header)
    names, case = _names(rows), CASES[op]
    print(f"per-sample forward+backward: median ms (ratio to plain {case.plain_name})")
    print(f"{case.columns:<24}" + "".join(f"{n:>24}" for n in names))
    for row in rows:
        cells = "".join(
            f"{row['ms'][n]:>15.3f} ({row['ratio_to_plain'][n]:>5.2f})" if n in row["ms"]
            else f"{'-':>24}" for n in names
        )
        print(f"{case.label(row):<24}{cells}")
    print("geometric mean of ratio to plain: " + _means_line(summary(rows)))
    for dtype, means in summary_by_dtype(rows).items():
        print(f"  {dtype}: " + _means_line(means))
    by_reason = {}
    for row in rows:
        for name, why in row["skipped"].items():
            by_reason.setdefault((name, why), []).append(case.label(row))
    for (name, why), labels in by_reason.items():
        print(f"skipped {name} at {'; '.join(labels)}: {why}")


def plot(rows, path, op="group_norm"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    names, case = _names(rows), CASES[op]
    labels = [case.label(r) for r in rows]
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
    ax.set_ylabel(f"time / plain {case.plain_name} (log scale)")
    ax.set_title(f"per-sample {case.plain_name.removeprefix('nn.')} gradients, forward+backward (lower is better)")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args, parser):
    """The suite, from ``persample.bench``'s parsed arguments (``op``, ``methods``,
    ``rounds``, ``quick``, ``device``, ``json``, ``plot``)."""
    device, op = torch.device(args.device), args.op
    table = M.METHODS[op]
    wanted = args.methods.split(",") if args.methods else list(table)
    unknown = set(wanted) - set(table)
    if unknown:
        parser.error(f"unknown methods for --op {op}: {', '.join(sorted(unknown))}")
    if "plain" not in wanted:
        wanted.insert(0, "plain")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds = args.rounds or (10 if args.quick else 40)
    steady = _steady_allocator()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    cpp = "built" if backends.LIBRARY else "not built (Python kernels)"
    header = (f"torch {torch.__version__} | op {op} | device {device} ({name}) | "
              f"threads {torch.get_num_threads()} | rounds {rounds} | glibc allocator pinned {steady} | "
              f"C++ eager path {cpp}")
    torch.manual_seed(0)
    rows = [run_case(op, spec, rounds, device, wanted) for spec in (QUICK_SHAPES if args.quick else SHAPES)[op]]
    report(rows, header, op)
    if args.json:
        result = {"header": header, "op": op, "rows": rows, "geomean_ratio_to_plain": summary(rows)}
        by_dtype = summary_by_dtype(rows)
        if by_dtype:
            result["geomean_ratio_to_plain_by_dtype"] = by_dtype
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(rows, args.plot, op)
