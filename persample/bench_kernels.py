"""``python -m persample.bench --device cuda --kernels``: the kernel-bound CUDA suite.

At the main suite's shapes a GPU step is mostly host time (BRIEF: 65 us of GPU work in
a 0.4 ms step on an H200), which says nothing about kernels. These shapes, from DP
U-Nets and ResNets, are 64-268 MB per fp32 tensor. For each, in fp32 and bf16,
contiguous and channels_last, it times one forward+backward of:

- ``plain``: ``nn.GroupNorm``, no per-sample gradients (the non-private layer);
- ``persample``: ``persample.group_norm`` with ``[N, C]`` weight and bias leaves, whose
  gradients are the per-sample ones (the public op's Triton kernels at these sizes);
- ``expanded_weights``: torch's ExpandedWeights, the per-sample peer;
- ``copy``: a device-to-device copy of one input-sized tensor, the bandwidth ceiling.

Timing uses CUDA events, the methods interleaved round by round in a rotating order,
with a synchronisation before each step, so a step's host time counts where it leaves
the GPU idle. Ratios are medians of same-round ratios, with their range over rounds.
Bandwidth is reported on the 5-pass floor (read x, write y; read x and dy, write dx):
``5 * tensor bytes / time``, as a fraction of the copy's ``2 * tensor bytes / time``.

It then measures the routing crossover (ops/eager.py ``TRITON_MIN_NUMEL``): fp32
``persample.group_norm`` through the C++ eager path (ATen's kernels) against the public
op (Triton's), over a range of sizes.
"""

import math
import statistics

import torch

import persample

from .ops import cuda, eager

SHAPES = [(128, 128, 64, 64, 32), (256, 256, 32, 32, 32), (64, 512, 32, 32, 32), (512, 64, 32, 32, 16)]
DTYPES = (torch.float32, torch.bfloat16)
CROSSOVER = [(n, 64, 32, 32, 32) for n in (2, 8, 32, 64, 128, 256, 512, 1024)]
GOALS = {  # the goals, as (summary key, minimum)
    "speed-up over plain, contiguous (geomean)": ("plain_contiguous", 1.5),
    "speed-up over plain, channels_last (geomean)": ("plain_channels_last", 2.0),
    "copy bandwidth fraction where a group fits on chip (min)": ("bandwidth_fused_min", 0.7),
    "speed-up over ExpandedWeights (geomean)": ("expanded_weights", 3.0),
}


def gmean(values):
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_interleaved(steps, rounds):
    """Milliseconds per round of each step, by CUDA events, interleaved in a rotating
    order."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        events = []
        for name in names[r % len(names):] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            steps[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return times


def ratios(times, numerator, denominator):
    """Same-round ratios ``numerator / denominator``: median and range."""
    return _stats([a / b for a, b in zip(times[numerator], times[denominator])])


class Case:
    """Input, output gradient and a stock layer, on the GPU."""

    def __init__(self, shape, dtype, channels_last, device="cuda"):
        n, c, h, w, self.groups = shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.dy = torch.randn_like(self.x)
        self.x.requires_grad_()
        self.stock = torch.nn.GroupNorm(self.groups, c).to(device, dtype)
        with torch.no_grad():
            self.stock.weight.normal_()
            self.stock.bias.normal_()
        self.bytes = self.x.numel() * self.x.element_size()

    def backward(self, y):
        self.x.grad = None
        y.backward(self.dy)
        self.stock.zero_grad(set_to_none=True)

    def steps(self):
        """Zero-argument steps, by method name."""
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        n = self.x.shape[0]
        leaves = [p.detach().expand(n, -1) for p in (self.stock.weight, self.stock.bias)]
        copy_dst = torch.empty_like(self.x)
        expanded = call_for_per_sample_grads(self.stock)

        def persample_step():
            w, b = (p.requires_grad_() for p in (leaves[0].detach(), leaves[1].detach()))
            self.backward(persample.group_norm(self.x, self.groups, w, b))

        def expanded_step():
            self.backward(expanded(self.x))
            self.stock.weight.grad_sample = self.stock.bias.grad_sample = None

        return {
            "plain": lambda: self.backward(self.stock(self.x)),
            "persample": persample_step,
            "expanded_weights": expanded_step,
            "copy": lambda: copy_dst.copy_(self.x.detach()),
        }


def run_case(shape, dtype, channels_last, rounds):
    case = Case(shape, dtype, channels_last)
    steps, skipped = case.steps(), {}
    for name, step in list(steps.items()):  # warm-up: Triton compiles, caches
        try:
            step()
            step()
        except Exception as e:  # noqa: BLE001  (a peer's own bug must not end the run)
            if name in ("plain", "persample", "copy"):
                raise
            del steps[name]
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    times = time_interleaved(steps, rounds)
    n, c, h, w, g = shape
    row = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last, "mb_per_tensor": case.bytes / 2**20,
        "fused": cuda.triton_launch().Plan(c // g, h * w).fused,
        "ms": {k: statistics.median(v) for k, v in times.items()},
        "plain_over_persample": ratios(times, "plain", "persample"),
        # 5 passes of the tensor at the persample step's speed, over the copy's 2.
        "bandwidth_fraction": _stats([2.5 * cp / ps for cp, ps in zip(times["copy"], times["persample"])]),
        "copy_gbps": 2 * case.bytes / statistics.median(times["copy"]) / 1e6,
        "skipped": skipped,
    }
    if "expanded_weights" in times:
        row["expanded_weights_over_persample"] = ratios(times, "expanded_weights", "persample")
    del case, steps
    torch.cuda.empty_cache()
    return row


def summary(rows):
    """Geometric means (and the bandwidth minimum) that the goals are stated in."""
    def med(row, key):
        return row[key]["median"]

    contiguous = [r for r in rows if not r["channels_last"]]
    channels_last = [r for r in rows if r["channels_last"]]
    fused = [med(r, "bandwidth_fraction") for r in rows if r["fused"]]
    ew = [med(r, "expanded_weights_over_persample") for r in rows if "expanded_weights_over_persample" in r]
    return {
        "plain_contiguous": gmean(med(r, "plain_over_persample") for r in contiguous),
        "plain_channels_last": gmean(med(r, "plain_over_persample") for r in channels_last),
        "bandwidth_fused_min": min(fused) if fused else float("nan"),
        "bandwidth_fused_gmean": gmean(fused),
        "expanded_weights": gmean(ew),
        "expanded_weights_cases": len(ew),
    }


def goals(means):
    """``{goal: (measured, minimum, met)}``."""
    return {text: (means[key], low, means[key] >= low) for text, (key, low) in GOALS.items()}


def crossover_point(rows):
    """The smallest size (elements) from which the public op (Triton) beats the C++
    path at every measured size, or None; ``rows`` are sorted by size."""
    point = None
    for row in reversed(rows):
        if row["cpp_over_triton"]["median"] <= 1.0:
            break
        point = row["numel"]
    return point


def run_crossover(rounds):
    """The C++ eager path against the public op, fp32 contiguous, over CROSSOVER."""
    if eager.LIBRARY is None:
        return {"skipped": "the C++ library is not built"}
    rows = []
    for shape in CROSSOVER:
        case = Case(shape, torch.float32, False)
        step = case.steps()["persample"]
        steps = {"cpp": _routed(float("inf"), step), "triton": _routed(0, step)}
        for s in steps.values():
            s()
            s()
        times = time_interleaved(steps, rounds)
        rows.append({"shape": list(shape), "numel": case.x.numel(),
                     "ms": {k: statistics.median(v) for k, v in times.items()},
                     "cpp_over_triton": ratios(times, "cpp", "triton")})
        del case, step, steps
        torch.cuda.empty_cache()
    return {"rows": rows, "crossover_numel": crossover_point(rows),
            "current_threshold": eager.TRITON_MIN_NUMEL}


def _routed(min_numel, step):
    """``step`` with ops/eager.py's routing threshold set to ``min_numel``."""
    def run():
        saved, eager.TRITON_MIN_NUMEL = eager.TRITON_MIN_NUMEL, min_numel
        try:
            step()
        finally:
            eager.TRITON_MIN_NUMEL = saved
    return run


def report(result):
    print(result["header"])
    print("per case: median ms; plain/persample and ExpandedWeights/persample (speed-ups, "
          "range over rounds); bandwidth on the 5-pass floor / copy bandwidth")
    for r in result["rows"]:
        label = f"{','.join(map(str, r['shape']))} {r['dtype']} {'NHWC' if r['channels_last'] else 'NCHW'}"
        ms = " ".join(f"{k} {v:.3f}" for k, v in r["ms"].items())
        ew = r.get("expanded_weights_over_persample")
        ew_text = f"{ew['median']:.2f}x [{ew['min']:.2f}-{ew['max']:.2f}]" if ew else "skipped"
        p, bw = r["plain_over_persample"], r["bandwidth_fraction"]
        print(f"{label:<28} {ms} | plain/persample {p['median']:.2f}x [{p['min']:.2f}-{p['max']:.2f}]"
              f" | EW/persample {ew_text} | bandwidth {bw['median']:.0%} of copy"
              f" ({r['copy_gbps']:.0f} GB/s){'' if r['fused'] else ' (split)'}")
        for name, why in r["skipped"].items():
            print(f"    skipped {name}: {why}")
    for text, (value, low, met) in goals(result["summary"]).items():
        print(f"goal {text}: {value:.2f} (>= {low}) {'met' if met else 'NOT met'}")
    cross = result["crossover"]
    if "skipped" in cross:
        print(f"routing crossover: skipped ({cross['skipped']})")
        return
    for r in cross["rows"]:
        c = r["cpp_over_triton"]
        print(f"routing {','.join(map(str, r['shape']))} ({r['numel']} elements): C++ path "
              f"{r['ms']['cpp']:.3f} ms, Triton {r['ms']['triton']:.3f} ms, C++/Triton "
              f"{c['median']:.2f} [{c['min']:.2f}-{c['max']:.2f}]")
    print(f"routing crossover: Triton wins from {cross['crossover_numel']} elements on "
          f"(TRITON_MIN_NUMEL is {cross['current_threshold']})")


def main(args, parser):
    """The suite, from ``persample.bench``'s parsed arguments (``--rounds``, ``--json``)."""
    if args.device != "cuda" or not torch.cuda.is_available():
        parser.error("--kernels measures CUDA kernels: run it with --device cuda on a machine "
                     "with a GPU")
    if cuda.triton_launch() is None:
        parser.error("--kernels measures the Triton kernels: triton is not installed (or "
                     "PERSAMPLE_DISABLE_TRITON=1)")
    import json

    import triton

    rounds = args.rounds or 20
    header = (f"torch {torch.__version__} | triton {triton.__version__} | "
              f"{torch.cuda.get_device_name()} | rounds {rounds} | ON_CHIP_ELEMENTS "
              f"{cuda.triton_launch().ON_CHIP_ELEMENTS} | TRITON_MIN_NUMEL "
              f"{eager.TRITON_MIN_NUMEL} | C++ eager path {'built' if eager.LIBRARY else 'not built'}")
    torch.manual_seed(0)
    rows = [run_case(shape, dtype, cl, rounds)
            for shape in SHAPES for dtype in DTYPES for cl in (False, True)]
    result = {"header": header, "rows": rows, "summary": summary(rows),
              "crossover": run_crossover(rounds)}
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
