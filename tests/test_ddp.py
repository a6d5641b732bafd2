"""persample under DistributedDataParallel (gloo, 2 processes on loopback).

A compiled DP-SGD step: per-sample gradients of every parameter (vmap(grad), through
persample::group_norm), per-sample clipping, then the clipped sum all-reduced by a
compiled DDP model, which runs a second backward on the clip-weighted per-sample losses.
The update must equal a single process computing the same on the concatenated batch.
"""

import os
import sys
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import persample

WORLD, PER_RANK, MAX_NORM = 2, 3, 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        persample.nn.GroupNorm(2, 8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * PER_RANK, 3, 6, 6, generator=g), torch.randint(0, 4, (WORLD * PER_RANK,), generator=g)


def _clip_factors(model, x, y):
    """min(1, MAX_NORM / ||g_i||) from per-sample gradients of all parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_sample = torch.compile(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0)), fullgraph=True)
    grads = per_sample(params, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    return (MAX_NORM / (norms + 1e-6)).clamp(max=1.0), grads


def _clipped_sum(model, ddp, x, y):
    factors, _ = _clip_factors(model, x, y)
    losses = F.cross_entropy(ddp(x), y, reduction="none")
    (losses * factors).sum().backward()
    return {k: p.grad for k, p in model.named_parameters()}


def _worker(rank, store, out):
    # A file rendezvous: a TCP port picked in advance can be taken before the workers bind it.
    if sys.platform.startswith("linux"):
        # Gloo's own sockets on loopback, whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        ddp = torch.compile(torch.nn.parallel.DistributedDataParallel(model))
        x, y = _data()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        grads = _clipped_sum(model, ddp, x[mine], y[mine])
        if rank == 0:
            # DDP averages over ranks; DP-SGD wants the sum of clipped per-sample grads.
            torch.save({k: g * WORLD for k, g in grads.items()}, out)
    finally:
        dist.destroy_process_group()


class TestDDP(unittest.TestCase):
    @unittest.skipUnless(dist.is_available() and dist.is_gloo_available(), "needs gloo")
    def test_clipped_update_matches_single_process(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.pt")
            store = os.path.join(tmp, "rendezvous")
            mp.spawn(_worker, args=(store, out), nprocs=WORLD, join=True)
            distributed = torch.load(out)
        model = _model()
        x, y = _data()
        factors, per_sample = _clip_factors(model, x, y)
        self.assertTrue((factors < 1).any(), "the test must exercise clipping")
        for name, g in per_sample.items():
            expected = torch.einsum("n,n...->...", factors, g)
            torch.testing.assert_close(distributed[name], expected, rtol=1e-4, atol=1e-5)
        # The clipped per-sample norms are within MAX_NORM.
        clipped = torch.stack(
            [(g * factors.view(-1, *[1] * (g.dim() - 1))).flatten(1).norm(dim=1) for g in per_sample.values()], 1
        ).norm(dim=1)
        self.assertTrue(bool((clipped <= MAX_NORM * (1 + 1e-5)).all()))


if __name__ == "__main__":
    unittest.main()
