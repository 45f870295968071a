"""Data parallel training under `accelerate launch`: each process takes a share of every batch.

Every process builds the same batches (same seed), computes the gradient of its share, and the
shares are summed with weights n_local / n_batch, which is exactly the full-batch mean gradient.
So N processes give the result of one process up to float rounding. Only P, Φ and the head are
reduced: they are all that trains. Run alone (no WORLD_SIZE > 1), every function is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> tuple[int, int]:
    """(rank, world size); starts the process group through Accelerate when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # reads the launcher's environment and initialises torch.distributed (gloo on CPU)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(ids: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a batch: every world-th example from position rank."""
    return ids[rank::world]


def reduce_gradients(modules: list[nn.Module], n_local: int, n_batch: int) -> None:
    """Turn each process's mean gradient over its share into the full-batch mean gradient, everywhere."""
    if not dist.is_initialized():
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is None:  # this process had no share of a short last batch
                p.grad = torch.zeros_like(p)
            p.grad.mul_(n_local / n_batch)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every process (so every process skips the same steps)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather(local: dict[int, int]) -> dict[int, int]:
    """Union of every process's {example index: prediction}."""
    if not dist.is_initialized():
        return local
    parts: list[dict[int, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}
