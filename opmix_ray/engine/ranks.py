"""How the main run's Ray Train workers share one global step.

Every rank runs the same seeded MixtureSampler and draws the whole global batch (indices into
arrays every rank already maps from the object store, so this costs microseconds), then keeps its
own contiguous rows. The global draws are therefore exactly those of a one-worker run on the same
mixture, the repetition counters agree on every rank without a collective, and a push applied at
the same step on every rank switches the whole batch at once. Rows are split further into
main.grad_accum_steps micro-batches; DDP averages the gradients over ranks, so an optimizer step
sees the gradient of the mean loss over the global batch, as one worker would.

The collectives here (gloo on CPU, nccl on GPU) run only when world > 1.
"""
from __future__ import annotations

import numpy as np
import torch


def rank_rows(batch: np.ndarray, rank: int, world: int, accum: int) -> list[np.ndarray]:
    """This rank's micro-batches of the global batch [B, seq_len + 1] (B divides by world x accum:
    the config check)."""
    per = len(batch) // world
    return np.split(batch[rank * per:(rank + 1) * per], accum)


def mean_over_ranks(x: float, world: int) -> float:
    """The mean of a per-rank scalar over all ranks (the global batch's loss for the log)."""
    if world == 1:
        return x
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t.item()) / world


def from_rank0(value, world: int):
    """Rank 0's `value` on every rank (which pushed round to switch to, decided once)."""
    if world == 1:
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_on_rank0(value, world: int) -> list | None:
    """[value of rank 0, rank 1, ...] on rank 0, None elsewhere (every rank's resume state)."""
    if world == 1:
        return [value]
    import torch.distributed as dist
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def _collective_device() -> torch.device:
    import torch.distributed as dist
    if dist.get_backend() == "nccl":  # nccl moves tensors between GPUs only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
