"""``python -m persample.bench.host``: where a CUDA step's host time goes.

At shapes whose kernels take less time than the host needs to launch them, a step
costs its host time. This times one forward+backward at a small shape (the GPU idles:
wall time is host time) through each layer of the stack, from stock ``nn.GroupNorm``
and the public ``persample.group_norm`` down to the raw Triton launches, and prints a
profile of the public op's step.
"""

import cProfile
import io
import pstats
import sys
import time

import torch

import persample

from ..ops.group_norm import cuda, eager


def per_call_us(fn, iters=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main(shape=(16, 64, 16, 16, 32)):
    n, c, h, w, g = shape
    x = torch.randn(n, c, h, w, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    wp, bp = (torch.rand(n, c, device="cuda").requires_grad_() for _ in range(2))
    stock = torch.nn.GroupNorm(g, c).cuda()
    launch = cuda.triton_launch()
    xd, wd, bd = x.detach(), wp.detach(), bp.detach()
    _, mean, rstd = launch.forward(xd, g, wd, bd, 1e-5)
    mask = [True, True, True]

    def public():
        persample.group_norm(x, g, wp, bp).backward(dy)

    def routed(min_numel):
        def step():
            saved, eager.TRITON_MIN_NUMEL = eager.TRITON_MIN_NUMEL, min_numel
            try:
                public()
            finally:
                eager.TRITON_MIN_NUMEL = saved
        return step

    steps = {
        "plain nn.GroupNorm step": lambda: stock(x).backward(dy),
        "persample step, C++ path (ATen kernels)": routed(float("inf")),
        "persample step, public op (Triton)": routed(0),
        "ops without autograd (validation + launch)": lambda: (
            torch.ops.persample.group_norm(xd, g, wd, bd, 1e-5),
            torch.ops.persample.group_norm_backward(dy, xd, mean, rstd, wd, g, mask)),
        "CUDA kernels' Python (cuda.py)": lambda: (
            cuda.group_norm_cuda(xd, g, wd, bd, 1e-5),
            cuda.group_norm_backward_cuda(dy, xd, mean, rstd, wd, g, mask)),
        "launch functions (triton_launch.py)": lambda: (
            launch.forward(xd, g, wd, bd, 1e-5),
            launch.backward(dy, xd, mean, rstd, wd, g, mask)),
    }
    print(f"host time per forward+backward at {shape} fp32 (GPU idle; C++ library "
          f"{'built' if eager.LIBRARY else 'not built'}):")
    for name, fn in steps.items():
        try:
            with torch.enable_grad():
                print(f"  {name:<48} {per_call_us(fn):8.1f} us")
        except Exception as e:  # noqa: BLE001  (report and go on)
            print(f"  {name:<48} failed: {type(e).__name__}: {e}")
    profile = cProfile.Profile()
    step = steps["persample step, public op (Triton)"]
    profile.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main(*(tuple(map(int, a.split(","))) for a in sys.argv[1:2]))
