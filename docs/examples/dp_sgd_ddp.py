"""One DP-SGD step of persample.models.WideResNet over 2 processes (DDP, gloo on CPU).

    torchrun --standalone --nproc_per_node 2 docs/examples/dp_sgd_ddp.py

Each rank takes its own examples: per-sample gradients of every parameter by a
torch.func vmap(grad) (persample::group_norm for the GroupNorm layers), clipped per
example; then a DDP backward of the clip-weighted per-example losses all-reduces the
clipped sums, and rank 0's noise is shared by broadcast. (docs/distributed.md)
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import persample
from persample.models import WideResNet, synthetic_images, synthetic_labels

MAX_NORM, NOISE, LR, PER_RANK = 1.0, 1.0, 0.1, 4

dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial model on every rank
model = persample.convert_group_norm(WideResNet(depth=10, width=1, num_classes=10))
ddp = torch.nn.parallel.DistributedDataParallel(model)

g = torch.Generator().manual_seed(1 + rank)  # each rank its own examples
x, y = synthetic_images(PER_RANK, generator=g), synthetic_labels(PER_RANK, generator=g)

params = {k: v.detach() for k, v in model.named_parameters()}


def example_loss(p, xi, yi):
    return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])


grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
factors = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)

# The gradient of sum_i factor_i * loss_i is the sum of the clipped per-sample gradients;
# DDP averages it over ranks, so multiply by world to keep the sum over all examples.
(F.cross_entropy(ddp(x), y, reduction="none") * factors * world).sum().backward()
with torch.no_grad():
    for p in model.parameters():
        noise = torch.randn_like(p) * NOISE * MAX_NORM if rank == 0 else torch.zeros_like(p)
        dist.broadcast(noise, 0)  # one noise draw for the whole batch
        p -= LR * (p.grad + noise) / (world * PER_RANK)
# Every rank applied the same update: the models must still be identical.
checksum = torch.stack([p.double().sum() for p in model.parameters()]).sum()
gathered = [torch.zeros_like(checksum) for _ in range(world)]
dist.all_gather(gathered, checksum)
assert all(torch.equal(c, gathered[0]) for c in gathered), "ranks diverged"
print(f"rank {rank}: {int((factors < 1).sum())}/{PER_RANK} examples clipped, models in sync")
# Tear down in order: the DDP reducer before its process group, and no rank leaving
# while another still talks to it (gloo's threads otherwise abort the exit).
del ddp
dist.barrier()
dist.destroy_process_group()
