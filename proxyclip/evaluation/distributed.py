"""Several evaluating processes under torchrun: this process's place, sharding, summing.

Under ``torchrun`` (WORLD_SIZE > 1) image i goes to process i % WORLD_SIZE; per-class areas are
summed with all_reduce. Without WORLD_SIZE > 1 everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the evaluating processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 this is a single process. The backend is NCCL for CUDA, else Gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum an int64 tensor over all processes (a no-op for one process)."""
    if info.world == 1:
        return tensor
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = tensor.to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def shard(total: int, info: DistInfo) -> list[int]:
    """The indices among ``range(total)`` that this process evaluates: i % world == rank."""
    return [i for i in range(total) if i % info.world == info.rank]
