"""Where a layer finds the per-sample leaves of ``persample.call_for_per_sample_grads``.

The wrapper attaches zero ``[N, C]`` leaves to each layer for one call (``active``),
and keeps them (``parked``) until the backward pass of that call has run: activation
checkpointing (``torch.utils.checkpoint``, reentrant or not) runs the layer's forward
again during the backward pass, and that recomputation must add the same leaves, or its
results differ from the first forward (a ``CheckpointError`` without reentrance, missing
per-sample gradients with it). A forward that runs inside a backward pass is such a
recomputation; no other forward sees the parked leaves.

Under ``torch.compile`` the compiler recomputes from its own graph, whose inputs are the
active leaves, so compiled code never reads the parked ones (and adds no guard on them).
"""

import torch

__all__ = ["recomputing", "current"]


def recomputing():
    """True while a forward runs inside a backward pass, outside compiled code."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def current(active, layer):
    """The leaves a layer's forward must add: ``active`` (set for the wrapper's call),
    else the parked ones while checkpointing recomputes the forward."""
    if active is None and recomputing():
        return layer.__dict__.get("_persample_parked")
    return active
