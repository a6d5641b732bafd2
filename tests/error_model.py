"""Tolerances from an error model, for the tests that compare reduced-precision results
with float64 references.

A float32 (or fp16/bf16) result differs from machine to machine in its last bits: ATen,
oneDNN and MKL pick their kernels by the CPU (``ATEN_CPU_CAPABILITY``) and split work by
the thread count. A constant tolerance tuned on one machine fails on another (issue 19:
a WRN's Linear head under AVX2). So each bound here scales with stock PyTorch's own
error on the same problem, in the same dtype, on the same machine, plus a few units in
the last place.
"""

import torch

F64 = torch.float64
ULPS = 4  # the rounding floor, in units in the last place


def max_error(got, want):
    """The largest absolute difference, in float64."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got.detach().to("cpu", F64) - want.detach().to("cpu", F64)).abs().max().item() if got.numel() else 0.0


def check_close(got, want, stock, what, scale=0.0):
    """A result of persample's own kernels, ``got``, against the float64 reference
    ``want``; outside float64 its error may be at most twice ``stock``'s (stock ATen on
    the same problem in the same dtype) plus 4 ulps of the result's scale, or of
    ``scale``, the size of an intermediate that an fp32 computation must round."""
    got64 = got.detach().to("cpu", F64)
    assert got64.shape == want.shape, what
    if got.dtype == F64:
        torch.testing.assert_close(got64, want, rtol=1e-7, atol=1e-9 * (1 + want.abs().max()), msg=what)
        return
    err, stock_err = max_error(got, want), max_error(stock, want)
    floor = ULPS * torch.finfo(got.dtype).eps * (1 + want.abs().max().item())
    floor += ULPS * torch.finfo(torch.float32).eps * scale
    assert err <= 2 * stock_err + floor, (
        f"{what}: max error {err:.3g} against stock ATen's {stock_err:.3g} (floor {floor:.3g})"
    )


def grad_input_scale(grad_out, rstd, weight):
    """|grad_out| * rstd * |weight|, the size of grad_input's terms before they cancel
    (for a group of one element they cancel exactly): 4 fp32 ulps of it bound any fp32
    computation's rounding, stock's included, when rstd is huge (a group nearly
    constant, or of two elements: two fp32 formulas then differ by more than their
    results' rounding). For :func:`check_close`'s ``scale``."""
    w = 1.0 if weight is None else max(1.0, weight.abs().max().item())
    return grad_out.abs().max().item() * rstd.abs().max().item() * w


def check_group_norm(y, grads, params, ref, stock, what=""):
    """persample's output ``y`` and gradients ``grads`` of (input, weight, bias), None
    where not computed, with :func:`check_close` against ``ref`` (tests/samples.py's
    ``reference``), ``stock`` (its ``stock_loop``) the scale; ``params`` are (weight,
    bias), whose ``[C]`` gradients are batch sums."""
    check_close(y, ref[0], stock[0], f"{what}output")
    for name, g, p, want, stock_g in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                         (None, *params), ref[1:], stock[1:]):
        if g is None:
            continue
        if p is not None and p.dim() == 1:  # stock's rows summed exactly, then rounded
            want, stock_g = want.sum(0), stock_g.to(F64).sum(0).to(stock_g.dtype)
        check_close(g, want, stock_g, f"{what}{name}")


def check_statistics(x, groups, eps, mean, rstd):
    """Mean and rstd against float64 statistics of the same rounded input, bounded by
    the statistics stock ``native_group_norm`` saves in the same dtype."""
    n, c = x.shape[:2]
    v = x.detach().to(F64).reshape(n, groups, -1)
    want_mean, want_rstd = v.mean(-1), (v.var(-1, unbiased=False) + eps).rsqrt()
    x = x.detach().clone(memory_format=torch.contiguous_format)  # canonical strides
    _, stock_mean, stock_rstd = torch.native_group_norm(x, None, None, n, c, x.numel() // (n * c), groups, eps)
    check_close(mean, want_mean, stock_mean.view(n, -1), "mean")
    check_close(rstd, want_rstd, stock_rstd.view(n, -1), "rstd")


def assert_tracks_stock(got, stock, want, what, ulps=ULPS):
    """A result of a path that is stock PyTorch's but for persample's layers (convs,
    linears, whole models under torch.func), ``got``, against ``stock``, the same
    computation through stock layers in the same dtype. Their distance may be 3 times
    stock's own distance from the float64 ``want`` (persample's result may be twice as
    far from it as stock's, as in :func:`check_close`, and stock's is that far), plus 4
    ulps of ``want``. Distances are root-mean-square: the rounding of many layers adds
    up like a random walk, whose RMS is a stable statistic where the largest entry is
    not (measured under AVX2: the largest entry's error of one WRN GroupNorm gradient
    was 4.3x stock's; by RMS, every gradient of both test models stays within 0.55 of
    this bound under AVX-512, AVX2, default dispatch and one thread)."""
    assert got.shape == stock.shape == want.shape and got.dtype == stock.dtype, what
    err, stock_err = rms(got, stock), rms(stock, want)
    floor = ulps * torch.finfo(stock.dtype).eps * rms(want, torch.zeros_like(want))
    assert err <= 3 * stock_err + floor, (
        f"{what}: RMS {err:.3g} from stock's result, whose own RMS error is {stock_err:.3g} "
        f"(floor {floor:.3g})"
    )


def rms(a, b):
    """The root-mean-square difference, in float64."""
    return (a.detach().to("cpu", F64) - b.detach().to("cpu", F64)).square().mean().sqrt().item() if a.numel() else 0.0


def assert_all_track_stock(got, stock, want, what="", ulps=ULPS):
    """:func:`assert_tracks_stock` for dicts of named results with the same keys."""
    assert set(got) == set(stock) == set(want), (what, set(got) ^ set(want))
    for name in want:
        assert_tracks_stock(got[name], stock[name], want[name], f"{what}{name}", ulps)
