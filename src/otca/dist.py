"""Processes: one code path for a single process and for ``torchrun --nproc_per_node N``.

Under torchrun (``WORLD_SIZE`` set) the process group is started with NCCL on GPU and gloo on CPU.
Prompt groups are sharded across ranks by contiguous slices of the global batch; the credit math runs
on the all-gathered batch so that group statistics are right when a group spans ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of ``n`` global items (``n`` must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"global batch of {n} samples does not split evenly over {self.world_size} processes")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def init_distributed() -> DistInfo:
    """Start the process group if launched by torchrun; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device=torch.device("cuda") if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def all_gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equal-shaped ``[b, ...]`` tensors of all ranks in rank order -> ``[world*b, ...]``."""
    if not info.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: float | torch.Tensor, info: DistInfo) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=info.device).clone()
    if info.distributed:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
