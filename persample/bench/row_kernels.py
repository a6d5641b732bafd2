"""``python -m persample.bench --device cuda --kernels --op layer_norm|rms_norm``: the
row norms' kernel-bound CUDA suite, as persample.bench.kernels is GroupNorm's.

Transformer shapes ``(N, T, D)``: the layer suite's three (small: host time decides a
step there) and three kernel-bound ones, one with rows wider than a register tile
(the swept kernels) and one with few samples of long sequences (a sample's rows split
into ranges whose sums the merge kernel adds). In fp32 and bf16, with per-sample
``[N, D]`` parameters:

- **kernel-only** (CUDA-graph replay, ``do_bench``, L2 flushed): persample's Triton
  forward+backward launches, ATen's (``native_layer_norm`` and its backward, or
  ``_fused_rms_norm`` and its backward: what ``nn.LayerNorm`` / ``nn.RMSNorm``
  launch), and a copy. Bandwidth on the 5-pass floor, against the copy's.
- **end-to-end step**: plain ``nn.LayerNorm`` / ``nn.RMSNorm``, persample's function
  with ``[N, D]`` leaves, and ExpandedWeights (LayerNorm only: it has no RMSNorm rule).

``--check`` runs no sweep here: tests/test_triton_row_norm.py is the row norms'
float64 correctness suite and runs on the GPU as it is (scripts/gpu_check.sh).
The goal (issue 18): the kernels at least as fast as ATen's.
"""

import torch

import persample

from ..ops.shared import backends
from .kernels import _range, gmean, measure

SHAPES = [(16, 128, 768), (8, 512, 1024), (64, 64, 384),  # the layer suite's
          (32, 2048, 1024), (8, 1024, 16384), (2, 8192, 4096)]
DTYPES = (torch.float32, torch.bfloat16)
EPS = 1e-5


class Case:
    """``[N, T, D]`` input, output gradient and ``[N, D]`` parameters on the GPU."""

    def __init__(self, op, shape, dtype, device="cuda"):
        self.op, self.rms, self.shape = op, op == "rms_norm", shape
        n, _, d = shape
        self.x = torch.randn(shape, device=device, dtype=dtype)
        self.dy = torch.randn_like(self.x)
        stock = torch.nn.RMSNorm if self.rms else torch.nn.LayerNorm
        self.stock = stock(d, eps=EPS).to(device, dtype)
        with torch.no_grad():
            for p in self.stock.parameters():
                p.normal_()
        self.params = [p.detach() for p in self.stock.parameters()]  # weight[, bias]
        self.per_sample = [p.expand(n, d) for p in self.params]
        self.bytes = self.x.numel() * self.x.element_size()

    def kernel_steps(self):
        launch = backends.triton_module(backends.ROW_NORM_TRITON)
        x, dy, rms, d = self.x, self.dy, self.rms, self.shape[-1]
        w, b = (self.per_sample + [None])[:2]
        _, mean, rstd = launch.forward(x, w, b, rms, EPS)
        mask = [True, True, not rms]
        sw, sb = (self.params + [None])[:2]
        aten = torch.ops.aten
        if rms:
            _, arstd = aten._fused_rms_norm(x, [d], sw, EPS)

            def stock():
                aten._fused_rms_norm(x, [d], sw, EPS)
                aten._fused_rms_norm_backward(dy, x, [d], arstd, sw, [True, True])
        else:
            _, amean, arstd = aten.native_layer_norm(x, [d], sw, sb, EPS)

            def stock():
                aten.native_layer_norm(x, [d], sw, sb, EPS)
                aten.native_layer_norm_backward(dy, x, [d], amean, arstd, sw, sb, [True, True, True])

        def ours():
            launch.forward(x, w, b, rms, EPS)
            launch.backward(dy, x, mean, rstd, w, rms, mask)

        copy_dst = torch.empty_like(x)
        return {"persample": ours, "aten": stock, "copy": lambda: copy_dst.copy_(x)}

    def autograd_steps(self):
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        x = self.x.detach().requires_grad_()
        d = self.shape[-1]

        def backward(y):
            x.grad = None
            y.backward(self.dy)
            self.stock.zero_grad(set_to_none=True)

        def persample_step():
            leaves = [p.detach().requires_grad_() for p in self.per_sample]
            if self.rms:
                backward(persample.rms_norm(x, d, *leaves, EPS))
            else:
                backward(persample.layer_norm(x, d, *leaves, EPS))

        steps = {"plain": lambda: backward(self.stock(x)), "persample": persample_step}
        if not self.rms:
            expanded = call_for_per_sample_grads(self.stock)

            def expanded_step():
                backward(expanded(x))
                for p in self.stock.parameters():
                    p.grad_sample = None

            steps["expanded_weights"] = expanded_step
        return steps


def run_case(op, shape, dtype, rounds):
    case = Case(op, shape, dtype)
    launch = backends.triton_module(backends.ROW_NORM_TRITON)
    row = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "plan": repr(launch.plan_for(case.x)), **measure(case, rounds),
    }
    del case
    torch.cuda.empty_cache()
    return row


def summary(rows):
    def med(key):
        return [r[key]["median"] for r in rows if r.get(key)]

    return {"aten_kernels": gmean(med("aten_over_persample_kernels")),
            "aten_kernels_min": min(med("aten_over_persample_kernels"), default=float("nan")),
            "bandwidth_gmean": gmean(med("bandwidth_fraction")),
            "plain_steps": gmean(med("plain_over_persample")),
            "expanded_weights": gmean(med("expanded_weights_over_persample"))}


def report(result):
    print(result["header"])
    print("per case: kernel-only ms (persample, ATen, copy), ATen/persample kernels, bandwidth on "
          "the 5-pass floor / copy's; step ms, plain/persample, ExpandedWeights/persample")
    for r in result["rows"]:
        k, s = r["kernel_ms"], r["step_ms"]
        aten, ew = r["aten_over_persample_kernels"], r.get("expanded_weights_over_persample")
        print(f"{','.join(map(str, r['shape'])) + ' ' + r['dtype']:<24} kernels "
              f"{k['persample']:.3f}/{k.get('aten', float('nan')):.3f}/{k['copy']:.3f} ms ATen/ours "
              f"{_range(aten) if aten else 'failed'} bw {r['bandwidth_fraction']['median']:.0%} | step "
              f"{s['persample']:.3f} ms plain/ours {_range(r['plain_over_persample'])} EW/ours "
              f"{_range(ew) if ew else '-'} | {r['plan']}")
        for name, why in r["skipped"].items():
            print(f"    skipped {name}: {why}")
    m = result["summary"]
    met = "met" if m["aten_kernels"] >= 1 else "NOT met"
    print(f"kernel-only ATen/persample: geomean {m['aten_kernels']:.2f}x (min {m['aten_kernels_min']:.2f}x), "
          f"goal >= 1: {met}; bandwidth geomean {m['bandwidth_gmean']:.0%}; step plain/persample "
          f"{m['plain_steps']:.2f}x, ExpandedWeights/persample {m['expanded_weights']:.2f}x")


def main(args, parser, save):
    """The suite for ``args.op``, from persample.bench.kernels.main (which checked the
    device); ``save(result)`` writes the JSON as it grows."""
    import triton

    if backends.triton_module(backends.ROW_NORM_TRITON) is None:
        parser.error("--kernels measures the Triton kernels: triton is not installed (or "
                     "PERSAMPLE_DISABLE_TRITON=1)")
    result = {"header": f"torch {torch.__version__} | triton {triton.__version__} | "
                        f"{torch.cuda.get_device_name()} | op {args.op}", "op": args.op, "rows": []}
    rounds = args.rounds or 12
    torch.manual_seed(0)
    for shape in SHAPES:
        for dtype in DTYPES:
            result["rows"].append(run_case(args.op, shape, dtype, rounds))
            save(result)
    result["summary"] = summary(result["rows"])
    report(result)
    save(result)
