"""``python -m persample.bench --model {wrn16-4,unet,vit}``: one whole DP-SGD step, per method.

Each method (``persample.bench.model_methods``) runs the same private step on the same
synthetic batch: per-sample gradients of every parameter, per-sample clipping, the sum,
Gaussian noise and the SGD update. The methods are timed interleaved round by round in
one process, in a rotating order, and reported as median ms, steps/s and the median
same-round ratio to the non-private compiled step, the floor. Then profiled steps give
the norms' share of each (what persample can change) and, on CUDA, a separate step
gives the peak memory above what was resident.

The models are :mod:`persample.models`' (WRN-16-4 of De et al. 2022 on 3x32x32 images,
10 classes; a small DPDM-style diffusion U-Net with its noise-prediction loss; a small
ViT with LayerNorm on 3x32x32 images, 10 classes).
"""

import contextlib
import json
import os
import platform
import re
import statistics
import time
import warnings

import torch

import persample

from . import model_methods as M
from . import timing
from .methods import Unavailable

BATCH_SIZE = {"cpu": 8, "cuda": 64}
ROUNDS = {"cpu": 10, "cuda": 20}
MODELS = M.MODELS
_NORM = re.compile(r"(group|layer|rms)_?norm", re.IGNORECASE)
_FUSED = re.compile(r"CompiledFxGraph|Torch-Compiled Region|^triton_|cpp_fused_")


class _NoBar:
    """Stands in for a tqdm bar where tqdm is missing (the GPU image has no extras)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass


def _progress(total, desc):
    """A tqdm bar where tqdm is installed (the ``demo`` extra), else a silent stand-in."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)


def time_interleaved(steps, rounds, device):
    """Seconds of each step per round, the order rotating each round, with a progress bar."""
    with _progress(rounds * len(steps), "timing") as bar:

        def on_step(name):
            bar.set_postfix_str(name)
            bar.update(1)

        return timing.time_interleaved(steps, rounds, device, on_step)


def norm_share(step, device, repeats=3):
    """Fraction of a profiled step spent in the norms (the median of ``repeats`` steps):
    forward, backward and per-sample work, i.e. every operator event whose name says
    group, layer or RMS norm (ATen's, persample's, Opacus's samplers), outermost ones
    only. On CPU, of the step's wall time; on CUDA, of its kernel time. None where a
    compiled graph fused the norms into other kernels (inductor names a kernel after
    all the ops it fuses, so its time cannot be split)."""
    shares = [_profiled_share(step, device) for _ in range(repeats)]
    return None if None in shares else statistics.median(shares)


def _profiled_share(step, device):
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timing.sync(device)
    with profile(activities=activities) as prof:
        with record_function("persample_bench::step"):
            step()
        timing.sync(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    outer = [e for e in events
             if _NORM.search(e.name) and not _FUSED.search(e.name) and not _norm_ancestor(e)]
    if not outer and any(_FUSED.search(e.name) for e in events):
        return None
    if device.type == "cuda":
        total = sum(e.self_device_time_total for e in events)
        return sum(e.device_time_total for e in outer) / total if total else float("nan")
    (whole,) = [e for e in events if e.name == "persample_bench::step"]
    return sum(e.cpu_time_total for e in outer) / whole.cpu_time_total


def _norm_ancestor(event):
    parent = event.cpu_parent
    while parent is not None:
        if _NORM.search(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def peak_memory_mb(step, device):
    """Peak CUDA memory of one step above what was allocated before it, in MiB."""
    timing.sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    timing.sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


@contextlib.contextmanager
def _labelled_opacus_samplers():
    """Name Opacus's norm grad samplers in profiles (record_function), so that their
    per-sample work counts as the norms'; restored afterwards."""
    try:
        from opacus.grad_sample.grad_sample_module import GradSampleHooks

        import persample.opacus  # noqa: F401
    except ImportError:
        yield
        return
    registry = GradSampleHooks.GRAD_SAMPLERS
    saved = dict(registry)
    for cls in (*M.NORMS, persample.nn.GroupNorm, persample.nn.LayerNorm, persample.nn.RMSNorm):
        sampler = registry.get(cls)
        if sampler is not None:
            registry[cls] = _labelled(sampler, f"opacus_{cls.__name__}_grad_sampler ({cls.__module__})")
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


def _labelled(fn, name):
    def sampler(*args):
        with torch.profiler.record_function(name):
            return fn(*args)

    return sampler


def run(model, *, device="cpu", batch_size=None, rounds=None, methods=None):
    """Build, warm up (compile), time, profile; returns the result dict."""
    device = torch.device(device)
    n = batch_size or BATCH_SIZE[device.type]
    rounds = rounds or ROUNDS[device.type]
    wanted = list(methods) if methods else [m for m in M.METHODS if m not in M.OPT_IN]
    if "nonprivate_compiled" not in wanted:
        wanted.insert(0, "nonprivate_compiled")
    w = M.Workload(model, n, device)
    steps, skipped, compile_s = {}, {k: v for k, v in M.OPT_IN.items() if k not in wanted}, {}
    with warnings.catch_warnings(), _labelled_opacus_samplers():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and hook warnings
        with _progress(len(wanted), "warm-up (compiles)") as bar:
            for name in wanted:
                bar.set_postfix_str(name)
                try:
                    step = M.METHODS[name](w)
                    start = time.perf_counter()
                    step()
                    compile_s[name] = time.perf_counter() - start
                    step()
                    steps[name] = step
                except Unavailable as why:
                    skipped[name] = str(why)
                except Exception as e:  # noqa: BLE001  (a peer's own bug must not end the run)
                    if name == "nonprivate_compiled":
                        raise
                    skipped[name] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                bar.update(1)
        times = time_interleaved(steps, rounds, device)
        share = {name: norm_share(step, device) for name, step in steps.items()}
        cuda = device.type == "cuda"
        peak = {name: peak_memory_mb(step, device) for name, step in steps.items()} if cuda else {}
    floor = times["nonprivate_compiled"]
    # The goal's question, persample's row against its stock twin, asked round by round:
    # a whole step's noise between rounds is larger than the norms' part of it.
    pairs = {k: (times[k.replace("persample", "stock")], v) for k, v in times.items()
             if "persample" in k and k.replace("persample", "stock") in times}
    return {
        "model": model, "batch_size": n, "rounds": rounds,
        "parameters": sum(p.numel() for p in w.model.parameters()),
        "norm_layers": sum(isinstance(m, M.NORMS) for m in w.model.modules()),
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio_to_nonprivate": {k: statistics.median(a / b for a, b in zip(v, floor))
                                for k, v in times.items()},
        "ratio_range": {k: [min(a / b for a, b in zip(v, floor)), max(a / b for a, b in zip(v, floor))]
                        for k, v in times.items()},
        "norm_share": share, "peak_mb": peak, "first_step_s": compile_s, "skipped": skipped,
        "persample_over_stock": {k: _ratio_summary(a, b) for k, (b, a) in pairs.items()},
    }


def _ratio_summary(a, b):
    """[median, min, max] of the same-round ratios a/b."""
    r = [x / y for x, y in zip(a, b)]
    return [statistics.median(r), min(r), max(r)]


def report(result, header):
    print(header)
    print(f"{result['model']}: {result['parameters'] / 1e6:.2f}M parameters, {result['norm_layers']} "
          f"norm layers, batch {result['batch_size']}, {result['rounds']} rounds; one DP-SGD step "
          f"(per-sample gradients, clipping, noise, update), medians")
    peak = bool(result["peak_mb"])
    print(f"{'method':<26}{'ms/step':>10}{'steps/s':>9}{'x non-private':>15}{'(round range)':>16}"
          f"{'norm share':>17}{'first step s':>14}" + (f"{'peak MiB':>10}" if peak else ""))
    for name, ms in result["ms"].items():
        lo, hi = result["ratio_range"][name]
        print(f"{name:<26}{ms:>10.1f}{1e3 / ms:>9.2f}{result['ratio_to_nonprivate'][name]:>15.2f}"
              f"{f'({lo:.2f}-{hi:.2f})':>16}{_share(result['norm_share'][name]):>17}"
              f"{result['first_step_s'][name]:>14.1f}"
              + (f"{result['peak_mb'][name]:>10.0f}" if peak else ""))
    for name, (med, lo, hi) in result["persample_over_stock"].items():
        print(f"{name} / {name.replace('persample', 'stock')}: {med:.3f} ({lo:.2f}-{hi:.2f}), "
              "median same-round ratio (range)")
    by_reason = {}
    for name, why in result["skipped"].items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        print(f"skipped {', '.join(names)}: {why}")


def _load():
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def _share(value):
    return "fused" if value is None else f"{value:.1%}"


def main(args):
    """``python -m persample.bench --model ...``, from ``persample.bench``'s parsed flags
    (``model``, ``device``, ``rounds``, ``batch_size``, ``methods``, ``json``)."""
    methods = args.methods.split(",") if args.methods else None
    unknown = set(methods or ()) - set(M.METHODS)
    if unknown:
        raise SystemExit(f"unknown methods for --model: {', '.join(sorted(unknown))} "
                         f"(choose from {', '.join(M.METHODS)})")
    torch.manual_seed(0)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"torch {torch.__version__} | device {device} ({name}) | threads {torch.get_num_threads()} | "
              f"C++ eager path {'built' if persample.ops.shared.backends.LIBRARY else 'not built'}")
    start = time.perf_counter()
    result = run(args.model, device=args.device, batch_size=args.batch_size, rounds=args.rounds,
                 methods=methods)
    # Other processes on the machine distort CPU timings (OpenMP threads wait for each
    # other at every barrier), so the load is part of the record.
    header += f" | {time.perf_counter() - start:.0f} s | load average at the end {_load()}"
    report(result, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, **result}, f, indent=1)
    return result
