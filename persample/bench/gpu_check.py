"""A float64 correctness sweep of the CUDA kernels on the GPU, for short GPU leases
(``python -m persample.bench --device cuda --kernels --check``; tests/test_triton.py
is the full suite).

Every plan the launcher can make (a block held in registers, swept, split over
programs, channel blocks, several groups per program) is forced by the geometry knobs
on a few shapes, in fp32, bf16 and fp16, both layouts, with shared and per-sample
parameters. Each output is compared with stock GroupNorm in float64 on the per-sample
view (``[1, N*C, *]`` with ``N*G`` groups: an independent formula, on ATen's kernels):
its max error must be at most twice stock's own error in the input dtype, plus a
rounding floor of a few units in the dtype's last place (of the float64 result's
largest entry). fp32 per-sample dgamma at mean/std = 1e3 must be within 5e-5 relative.
"""

import itertools

import torch

from ..ops.group_norm import cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: triton's interpreter (tests)

FORCED = {  # plan kind -> knobs of ops/group_norm/triton_launch.py that force it at these shapes
    "default": {},
    "swept": dict(REGISTER_ELEMENTS=16, PROGRAMS_PER_SM=0),
    "split": dict(REGISTER_ELEMENTS=16, CHUNK_ELEMENTS=64, PROGRAMS_PER_SM=1 << 20),
    "channel_blocks": dict(REGISTER_ELEMENTS=16, CHUNK_ELEMENTS=16, PROGRAMS_PER_SM=0),
}
SHAPES = [(4, 32, 9, 7, 8), (3, 12, 5, 5, 4), (2, 64, 16, 16, 32)]


def reference(x, groups, w, b, dy, dtype):
    """out, grad_input, per-sample grads of stock GroupNorm on the per-sample view, in
    ``dtype`` (params too, as CUDA's needs them)."""
    n, c = x.shape[:2]
    xv = x.detach().to(dtype).reshape(1, n * c, -1).requires_grad_()
    wv = w.detach().to(dtype).expand(n, c).reshape(n * c).clone().requires_grad_()
    bv = b.detach().to(dtype).expand(n, c).reshape(n * c).clone().requires_grad_()
    y = torch.group_norm(xv, n * groups, wv, bv, 1e-5)
    gx, gw, gb = torch.autograd.grad(y, (xv, wv, bv), dy.to(dtype).reshape(1, n * c, -1))
    return y.reshape(x.shape), gx.reshape(x.shape), gw.reshape(n, c), gb.reshape(n, c)


def check_case(shape, dtype, channels_last, per_sample, seed):
    torch.manual_seed(seed)
    n, c, h, w_, g = shape
    x = torch.randn(n, c, h, w_, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w = torch.rand(n if per_sample else 1, c, device=DEVICE) + 0.5
    b = torch.randn(1, c, device=DEVICE)
    weight = w.to(dtype) if per_sample else w[0].to(dtype)
    out, mean, rstd = cuda.group_norm_cuda(x, g, weight, b[0].to(dtype), 1e-5)
    gi, gw, gb = cuda.group_norm_backward_cuda(dy, x, mean, rstd, weight, g, [True, True, True])
    truth = reference(x, g, weight.float(), b[0].to(dtype).float(), dy, torch.float64)
    stock = reference(x, g, weight, b[0].to(dtype), dy, dtype)
    ulp = torch.finfo(dtype).eps
    worst = 0.0
    for name, ours, st, t in zip(("out", "grad_input", "grad_weight", "grad_bias"),
                                 (out, gi, gw, gb), stock, truth):
        if not torch.isfinite(ours).all():
            return {"ok": False, "why": f"{name} not finite"}
        err = (ours.double() - t).abs().max().item()
        bound = 2 * (st.double() - t).abs().max().item() + 8 * ulp * t.abs().max().item()
        worst = max(worst, err / bound)
    layout_ok = out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return {"ok": worst <= 1 and layout_ok, "worst_error_over_bound": worst, "layout_ok": layout_ok}


def large_mean():
    """fp32 per-sample dgamma at mean/std = 1e3, relative to its largest entry."""
    torch.manual_seed(1)
    rows = {}
    for kind, knobs in FORCED.items():
        with _knobs(knobs):
            x = (torch.randn(2, 8, 16, 16, device=DEVICE) + 1e3).to(memory_format=torch.channels_last)
            w = torch.rand(8, device=DEVICE) + 0.5
            dy = torch.randn_like(x)
            _, mean, rstd = cuda.group_norm_cuda(x, 2, w, None, 1e-5)
            gw = cuda.group_norm_backward_cuda(dy, x, mean, rstd, w, 2, [False, True, False])[1]
            t = reference(x, 2, w, torch.zeros_like(w), dy, torch.float64)[2]
            rows[kind] = ((gw.double() - t).abs().max() / t.abs().max()).item()
    return rows


class _knobs:
    def __init__(self, knobs):
        self.launch, self.knobs = cuda.triton_launch(), knobs

    def __enter__(self):
        self.saved = {k: getattr(self.launch, k) for k in self.knobs}
        for k, v in self.knobs.items():
            setattr(self.launch, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.launch, k, v)


def _cases():
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return [c for c in itertools.product(FORCED, SHAPES, dtypes, (False, True), (False, True))
            if c[2] != torch.float16 or c[0] == "default"]


def _worker(index, workers):
    """Runs every ``workers``-th case from ``index``, printing one JSON line per case."""
    import json

    for i, (kind, shape, dtype, cl, per_sample) in enumerate(_cases()):
        if i % workers != index:
            continue
        with _knobs(FORCED[kind]):
            try:
                r = check_case(shape, dtype, cl, per_sample, seed=i)
            except Exception as e:  # noqa: BLE001  (report every case, then fail)
                r = {"ok": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        r.update(kind=kind, shape=shape, dtype=str(dtype)[6:], channels_last=cl, per_sample=per_sample)
        print("CHECK " + json.dumps(r), flush=True)


def run(workers=8):
    """The sweep, in ``workers`` processes (each compiles its own kernel variants)."""
    import json
    import subprocess
    import sys

    code = "import sys, persample.bench.gpu_check as g; g._worker(int(sys.argv[1]), int(sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-P", "-c", code, str(i), str(workers)],
                              stdout=subprocess.PIPE, text=True) for i in range(workers)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        results += [json.loads(line[6:]) for line in out.splitlines() if line.startswith("CHECK ")]
        if p.returncode:
            results.append({"ok": False, "why": f"worker exited with {p.returncode}"})
    failures = sum(not r["ok"] for r in results)
    for r in results:
        if not r["ok"]:
            print("check FAILED", r)
    lm = large_mean()
    worst = max((r.get("worst_error_over_bound", 0) for r in results), default=0)
    print(f"check: {len(results) - failures}/{len(results)} cases within twice stock's error "
          f"(worst error/bound {worst:.2f}); fp32 dgamma at mean/std 1e3, relative: "
          + ", ".join(f"{k} {v:.1e}" for k, v in lm.items()) + " (goal <= 5e-5)")
    return {"cases": results, "failures": failures, "large_mean": lm}
