"""``python -m persample.bench --device cuda --kernels --tune``: times the geometry knobs
of ops/group_norm/triton_launch.py (chunk and register-tile sizes, warps, pipelining) on the GPU.

Each configuration is timed kernel-only (persample.bench.kernels) on the benchmark
shapes in fp32 and bf16, both layouts; the best is the one with the least total of
those times. Each configuration compiles its own kernel variants; they are compiled
first by worker processes in parallel (triton's on-disk cache then serves the timing
process), so that a sweep fits a short GPU lease.
"""

import statistics
import subprocess
import sys
import time

import torch

KNOBS = ("REGISTER_ELEMENTS", "CHUNK_ELEMENTS", "BYTES_PER_THREAD", "NUM_STAGES")
CONFIGS = [
    dict(REGISTER_ELEMENTS=4096, CHUNK_ELEMENTS=4096, BYTES_PER_THREAD=64, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=8192, CHUNK_ELEMENTS=4096, BYTES_PER_THREAD=64, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=16384, CHUNK_ELEMENTS=4096, BYTES_PER_THREAD=64, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=4096, CHUNK_ELEMENTS=2048, BYTES_PER_THREAD=32, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=4096, CHUNK_ELEMENTS=8192, BYTES_PER_THREAD=64, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=4096, CHUNK_ELEMENTS=4096, BYTES_PER_THREAD=32, NUM_STAGES=None),
    dict(REGISTER_ELEMENTS=4096, CHUNK_ELEMENTS=4096, BYTES_PER_THREAD=64, NUM_STAGES=1),
    dict(REGISTER_ELEMENTS=8192, CHUNK_ELEMENTS=8192, BYTES_PER_THREAD=128, NUM_STAGES=None),
]


def knobs(launch):
    return {name: getattr(launch, name) for name in KNOBS}


def apply(launch, config):
    for name, value in config.items():
        setattr(launch, name, value)


def _cases(shapes, dtypes):
    return [(shape, dtype, cl) for shape in shapes for dtype in dtypes for cl in (False, True)]


def precompile(jobs, workers=12):
    """Compiles the kernels of ``jobs`` (``(config, shape, dtype name, channels_last)``)
    in ``workers`` processes, one launch each: the same specialisations as the timing
    run's, into triton's on-disk cache. Returns the workers' exit codes."""
    code = "import sys, persample.bench.tune as t; t._compile_jobs(eval(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-P", "-c", code, repr(jobs[w::workers])])
             for w in range(workers) if jobs[w::workers]]
    return [p.wait() for p in procs]


def jobs(configs, shapes, dtypes):
    return [(config, shape, str(dtype)[6:], cl) for config in configs
            for shape, dtype, cl in _cases(shapes, dtypes)]


def _compile_jobs(jobs):
    from .kernels import Case
    from ..ops.group_norm import cuda

    launch = cuda.triton_launch()
    for config, shape, dtype, cl in jobs:
        apply(launch, config)
        case = Case(shape, getattr(torch, dtype), cl)
        case.kernel_steps()["persample"]()
        del case
        torch.cuda.empty_cache()
    torch.cuda.synchronize()


def run(shapes, dtypes, also=()):
    """``{"configs": [...], "ms": [[per case] per config], "best": config}``; the
    kernels of every configuration at ``also``'s shapes are compiled too (the suite
    that follows runs them under the best)."""
    from .kernels import Case, kernel_times
    from ..ops.group_norm import cuda

    launch = cuda.triton_launch()
    saved = knobs(launch)
    start = time.perf_counter()
    codes = precompile(jobs(CONFIGS, list(shapes) + list(also), dtypes))
    compiled_s = time.perf_counter() - start
    cases = _cases(shapes, dtypes)
    table = [[None] * len(cases) for _ in CONFIGS]
    try:
        for j, (shape, dtype, cl) in enumerate(cases):
            case = Case(shape, dtype, cl)
            steps = {}
            for i, config in enumerate(CONFIGS):
                apply(launch, config)
                steps[i] = _bound(case, launch, config)
            times = kernel_times(steps, 2, rep_ms=15)
            for i in steps:
                table[i][j] = statistics.median(times[i])
            del case, steps
            torch.cuda.empty_cache()
    finally:
        apply(launch, saved)
    totals = [sum(row) for row in table]
    best = CONFIGS[min(range(len(CONFIGS)), key=totals.__getitem__)]
    labels = [f"{','.join(map(str, s))} {str(d)[6:]} {'NHWC' if cl else 'NCHW'}" for s, d, cl in cases]
    for label, column in zip(labels, zip(*table)):
        print(f"tune {label:<32}" + " ".join(f"{t:7.3f}" for t in column))
    for config, total in zip(CONFIGS, totals):
        print(f"tune total {total:8.3f} ms  {config}")
    print(f"tune: best {best} (compiled in {compiled_s:.0f} s, worker exit codes {codes})")
    return {"configs": CONFIGS, "cases": labels, "ms": table, "totals": totals, "best": best,
            "compile_s": compiled_s}


def _bound(case, launch, config):
    """The kernel-only step of ``case`` under ``config`` (knobs are read at launch)."""
    inner = case.kernel_steps()["persample"]

    def step():
        saved = knobs(launch)
        apply(launch, config)
        try:
            inner()
        finally:
            apply(launch, saved)

    return step

