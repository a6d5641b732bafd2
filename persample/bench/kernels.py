"""``python -m persample.bench --device cuda --kernels``: the kernel-bound CUDA suite.

At the main suite's shapes a GPU step is mostly host time (BRIEF: 65 us of GPU work in
a 0.4 ms step on an H200), which says nothing about kernels. These shapes, from DP
U-Nets and ResNets, are 16-268 MB per fp32 tensor; two more take the split kernels (too
few groups to fill the GPU) and groups of 64K elements. For each, in fp32 and bf16,
contiguous and channels_last:

- **kernel-only**: one forward+backward's kernels back to back, replayed from a CUDA
  graph and timed by ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
  repetition, median):
  persample's Triton launches, ATen's ``native_group_norm`` and its backward (what
  ``nn.GroupNorm`` launches, layout conversions included), and a device-to-device copy
  of one tensor, the bandwidth ceiling. Bandwidth is on the 5-pass floor (read x,
  write y; read x and dy, write dx): ``5 * bytes / time`` against the copy's
  ``2 * bytes / time``. Rounds rotate the order; ratios are medians of same-round
  ratios, with their range.
- **end-to-end step** (ops, autograd and host time, a synchronisation before each):
  ``nn.GroupNorm`` (plain, no per-sample gradients), ``persample.group_norm`` with
  ``[N, C]`` weight and bias leaves, and torch's ExpandedWeights.

``--check`` first runs a float64 correctness sweep on the GPU (persample.bench.gpu_check);
``--tune`` then times the geometry knobs of ops/group_norm/triton_launch.py (persample.bench.tune).
"""

import math
import statistics

import torch

import persample

from ..ops.group_norm import cuda

SHAPES = [(128, 128, 64, 64, 32), (256, 256, 32, 32, 32), (64, 512, 32, 32, 32),
          (512, 64, 32, 32, 16), (2, 64, 128, 128, 32), (8, 512, 64, 64, 32)]
DTYPES = (torch.float32, torch.bfloat16)
GOALS = {  # the goals, as (summary key, minimum)
    "speed-up over plain, contiguous (geomean, end-to-end)": ("plain_contiguous", 1.5),
    "speed-up over plain, channels_last (geomean, end-to-end)": ("plain_channels_last", 2.0),
    "copy bandwidth fraction, kernel-only, where a group fits on chip (min)": ("bandwidth_on_chip_min", 0.7),
    "speed-up over ExpandedWeights (geomean, end-to-end)": ("expanded_weights", 3.0),
}


def gmean(values):
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(times, numerator, denominator):
    """Same-round ratios ``numerator / denominator``: median and range."""
    return _stats([a / b for a, b in zip(times[numerator], times[denominator])])


def graphed(step):
    """``step`` captured in a CUDA graph: its replay runs the kernels back to back, with
    no host time between launches (which would otherwise dominate small problems)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def kernel_times(steps, rounds, rep_ms=25):
    """Median ms of each zero-argument step's CUDA-graph replay by ``do_bench`` (which
    flushes L2 before each repetition), ``rounds`` times, in an order that rotates each
    round."""
    from triton.testing import do_bench

    names = list(steps)
    replays = {name: graphed(steps[name]) for name in names}
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(do_bench(replays[name], warmup=5, rep=rep_ms, return_mode="median"))
    return times


def step_times(steps, rounds):
    """Milliseconds per round of each step, by CUDA events around it (host time
    included: a synchronisation before each), interleaved in a rotating order."""
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


class Case:
    """Input, output gradient, parameters and a stock layer, on the GPU."""

    def __init__(self, shape, dtype, channels_last, device="cuda"):
        n, c, h, w, self.groups = shape
        self.shape = shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.dy = torch.randn_like(self.x)
        self.stock = torch.nn.GroupNorm(self.groups, c).to(device, dtype)
        with torch.no_grad():
            self.stock.weight.normal_()
            self.stock.bias.normal_()
        self.weight = self.stock.weight.detach().expand(n, -1)  # [N, C] per-sample
        self.bytes = self.x.numel() * self.x.element_size()

    def kernel_steps(self):
        """The kernels alone: persample's Triton launches, ATen's, a copy."""
        launch = cuda.triton_launch()
        x, dy, g, w, b = self.x, self.dy, self.groups, self.weight, self.stock.bias.detach()
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        _, mean, rstd = launch.forward(x, g, w, b, 1e-5)
        sw = self.stock.weight.detach()
        # ATen's CUDA kernels take contiguous input: nn.GroupNorm copies channels_last
        # to contiguous first, and its output (so the gradient it gets) is contiguous.
        dyc = dy.contiguous()
        _, amean, arstd = torch.native_group_norm(x.contiguous(), sw, b, n, c, hw, g, 1e-5)
        copy_dst = torch.empty_like(x)

        def ours():
            launch.forward(x, g, w, b, 1e-5)
            launch.backward(dy, x, mean, rstd, w, g, [True, True, True])

        def aten():
            xc = x.contiguous()
            torch.native_group_norm(xc, sw, b, n, c, hw, g, 1e-5)
            torch.ops.aten.native_group_norm_backward(dyc, xc, amean, arstd, sw, n, c, hw, g,
                                                      [True, True, True])

        return {"persample": ours, "aten": aten, "copy": lambda: copy_dst.copy_(x)}

    def autograd_steps(self):
        """Whole steps: ops, autograd and host time."""
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        x = self.x.detach().requires_grad_()
        leaves = [p.detach().expand(x.shape[0], -1) for p in (self.stock.weight, self.stock.bias)]
        expanded = call_for_per_sample_grads(self.stock)

        def backward(y):
            x.grad = None
            y.backward(self.dy)
            self.stock.zero_grad(set_to_none=True)

        def persample_step():
            w, b = (p.detach().requires_grad_() for p in leaves)
            backward(persample.group_norm(x, self.groups, w, b))

        def expanded_step():
            backward(expanded(x))
            self.stock.weight.grad_sample = self.stock.bias.grad_sample = None

        return {"plain": lambda: backward(self.stock(x)), "persample": persample_step,
                "expanded_weights": expanded_step}


def _warm(steps, optional):
    """Runs each step twice (compiles, caches); a peer that fails is dropped, with why."""
    skipped = {}
    for name, step in list(steps.items()):
        try:
            step()
            step()
        except Exception as e:  # noqa: BLE001  (a peer's own bug must not end the run)
            if name not in optional:
                raise
            del steps[name]
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    return skipped


def run_case(shape, dtype, channels_last, rounds):
    case = Case(shape, dtype, channels_last)
    launch = cuda.triton_launch()
    x, fmt = launch.dense(case.x)
    plan = launch.plan_for(x, fmt, case.groups)
    row = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last, "plan": repr(plan),
        "on_chip": plan.single, "split": plan.splits > 1, **measure(case, rounds),
    }
    del case
    torch.cuda.empty_cache()
    return row


def measure(case, rounds):
    """A row's figures for ``case``: its kernel-only steps (persample, aten, copy) and
    its end-to-end steps (plain, persample, expanded_weights), warmed up, then timed;
    ``case.bytes`` is the size of one tensor. A peer that fails is reported as skipped."""
    kernels, steps = case.kernel_steps(), case.autograd_steps()
    skipped = _warm(kernels, ("aten",))
    skipped.update(_warm(steps, ("expanded_weights",)))
    kt = kernel_times(kernels, max(3, rounds // 4))
    st = step_times(steps, rounds)
    nbytes = case.bytes
    fields = {
        "mb_per_tensor": nbytes / 2**20,
        "kernel_ms": {k: statistics.median(v) for k, v in kt.items()},
        "aten_over_persample_kernels": ratios(kt, "aten", "persample") if "aten" in kt else None,
        # 5 passes of the tensor at the persample kernels' speed, over the copy's 2.
        "bandwidth_fraction": _stats([2.5 * cp / ps for cp, ps in zip(kt["copy"], kt["persample"])]),
        "copy_gbps": 2 * nbytes / statistics.median(kt["copy"]) / 1e6,
        "step_ms": {k: statistics.median(v) for k, v in st.items()},
        "plain_over_persample": ratios(st, "plain", "persample"),
        "skipped": skipped,
    }
    if "expanded_weights" in st:
        fields["expanded_weights_over_persample"] = ratios(st, "expanded_weights", "persample")
    return fields


def summary(rows):
    """Geometric means (and the bandwidth minimum) that the goals are stated in."""
    def med(row, key):
        return row[key]["median"]

    contiguous = [r for r in rows if not r["channels_last"]]
    channels_last = [r for r in rows if r["channels_last"]]
    on_chip = [med(r, "bandwidth_fraction") for r in rows if r["on_chip"]]
    ew = [med(r, "expanded_weights_over_persample") for r in rows if "expanded_weights_over_persample" in r]
    return {
        "plain_contiguous": gmean(med(r, "plain_over_persample") for r in contiguous),
        "plain_channels_last": gmean(med(r, "plain_over_persample") for r in channels_last),
        "aten_kernels_contiguous": gmean(med(r, "aten_over_persample_kernels") for r in contiguous
                                         if r["aten_over_persample_kernels"]),
        "aten_kernels_channels_last": gmean(med(r, "aten_over_persample_kernels") for r in channels_last
                                            if r["aten_over_persample_kernels"]),
        "bandwidth_on_chip_min": min(on_chip) if on_chip else float("nan"),
        "bandwidth_gmean": gmean(med(r, "bandwidth_fraction") for r in rows),
        "expanded_weights": gmean(ew),
        "expanded_weights_cases": len(ew),
    }


def goals(means):
    """``{goal: (measured, minimum, met)}``."""
    return {text: (means[key], low, means[key] >= low) for text, (key, low) in GOALS.items()}


def _range(r):
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def report(result):
    print(result["header"])
    print("per case: kernel-only ms (persample, ATen, copy), ATen/persample kernels, bandwidth "
          "on the 5-pass floor / copy's; end-to-end step ms, plain/persample and "
          "ExpandedWeights/persample (speed-ups, range over rounds)")
    for r in result["rows"]:
        label = f"{','.join(map(str, r['shape']))} {r['dtype']} {'NHWC' if r['channels_last'] else 'NCHW'}"
        k, s = r["kernel_ms"], r["step_ms"]
        ew = r.get("expanded_weights_over_persample")
        aten = r["aten_over_persample_kernels"]
        print(f"{label:<30} kernels {k['persample']:.3f}/{k.get('aten', math.nan):.3f}/{k['copy']:.3f} ms "
              f"ATen/ours {_range(aten) if aten else 'failed'} bw "
              f"{r['bandwidth_fraction']['median']:.0%} | step {s['persample']:.3f} ms "
              f"plain/ours {_range(r['plain_over_persample'])} EW/ours "
              f"{_range(ew) if ew else 'skipped'} | {r['plan']}")
        for name, why in r["skipped"].items():
            print(f"    skipped {name}: {why}")
    means = result["summary"]
    print("kernel-only ATen/persample (geomean): contiguous "
          f"{means['aten_kernels_contiguous']:.2f}x, channels_last {means['aten_kernels_channels_last']:.2f}x; "
          f"bandwidth fraction geomean {means['bandwidth_gmean']:.0%}")
    for text, (value, low, met) in goals(means).items():
        print(f"goal {text}: {value:.2f} (>= {low}) {'met' if met else 'NOT met'}")


def main(args, parser):
    """The suite, from ``persample.bench``'s parsed arguments."""
    if args.device != "cuda" or not torch.cuda.is_available():
        parser.error("--kernels measures CUDA kernels: run it with --device cuda on a machine "
                     "with a GPU")
    if cuda.triton_launch() is None:
        parser.error("--kernels measures the Triton kernels: triton is not installed (or "
                     "PERSAMPLE_DISABLE_TRITON=1)")
    import json

    import triton

    from . import gpu_check, tune

    def save(result):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if args.op in ("layer_norm", "rms_norm"):
        from . import row_kernels

        if args.tune or args.check:
            parser.error("--tune and --check are GroupNorm's (the row norms' float64 sweep on the "
                         "GPU is tests/test_triton_row_norm.py): use them without --op")
        return row_kernels.main(args, parser, save)
    launch = cuda.triton_launch()
    result = {"header": (f"torch {torch.__version__} | triton {triton.__version__} | "
                         f"{torch.cuda.get_device_name()} | knobs {tune.knobs(launch)}")}
    if args.check:
        result["check"] = gpu_check.run()
        save(result)
    if args.tune:
        result["tune"] = tune.run(SHAPES[:4], DTYPES, also=SHAPES[4:])
        save(result)
        tune.apply(launch, result["tune"]["best"])
        result["header"] += f" | tuned {result['tune']['best']}"
    if not args.tune:  # the suite's own compilations, in parallel (see persample.bench.tune)
        tune.precompile(tune.jobs([tune.knobs(launch)], SHAPES, DTYPES))
    rounds = args.rounds or 12
    torch.manual_seed(0)
    result["rows"] = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for cl in (False, True):
                result["rows"].append(run_case(shape, dtype, cl, rounds))
                save(result)
    result["summary"] = summary(result["rows"])
    report(result)
    save(result)
