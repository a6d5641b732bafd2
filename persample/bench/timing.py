"""Interleaved timing, shared by the layer and the model benchmarks."""

import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps, rounds, device, on_step=None):
    """Seconds per round of each step, interleaved, in an order that rotates each round
    (so that caches, the allocator and drifts in machine load treat the steps alike).
    ``on_step(name)`` runs before each step (a progress bar's label), outside the timing."""
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if on_step is not None:
                on_step(name)
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times
