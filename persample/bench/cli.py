"""``python -m persample.bench``: per-sample norm gradients, timed against every peer.

Three suites, each timing every method interleaved round by round in one process:
one norm layer's forward+backward at several shapes (the default, persample.bench.layer:
GroupNorm, or ``--op layer_norm|rms_norm`` at transformer shapes in fp32 and bf16), one
whole DP-SGD step of a model (``--model``, persample.bench.models), and the
kernel-bound CUDA suite (``--kernels``, persample.bench.kernels; with ``--op layer_norm|rms_norm``,
persample.bench.row_kernels).
"""

import argparse

import torch

from . import layer, models
from . import methods as M


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m persample.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds (< 2 min)")
    parser.add_argument("--rounds", type=int, help="timed rounds per method")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kernels", action="store_true",
                        help="the kernel-bound CUDA suite instead (persample.bench.kernels)")
    parser.add_argument("--check", action="store_true",
                        help="with --kernels: a float64 correctness sweep first (persample.bench.gpu_check)")
    parser.add_argument("--tune", action="store_true",
                        help="with --kernels: time the kernels' geometry knobs first, and use the best")
    parser.add_argument("--op", choices=list(M.METHODS),
                        help="the layer suite's norm (default group_norm)")
    parser.add_argument("--methods", help="comma-separated subset of: " + ",".join(M.TABLE)
                        + "; with --model: of " + ",".join(models.M.METHODS))
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--model", choices=list(models.MODELS),
                        help="time one whole DP-SGD step of this model per method instead (persample.bench.models)")
    parser.add_argument("--batch-size", type=int, help="with --model: the batch (default 8 on CPU, 64 on CUDA)")
    args = parser.parse_args(argv)
    if args.op and args.model:
        parser.error("--op picks the norm of the layer and kernel suites; --model times whole models")
    args.op = args.op or "group_norm"
    if args.kernels:
        from . import kernels

        return kernels.main(args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.model:
        return models.main(args)
    return layer.main(args, parser)
