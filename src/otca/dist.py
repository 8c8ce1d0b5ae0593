"""Processes: one code path for a single process and for ``torchrun --nproc_per_node N``, and the DDP / FSDP2
plumbing around the trained module (wrapping, gradient sync, whole and sharded tensors, optimizer state).

Under torchrun (``WORLD_SIZE`` set) the process group is started with NCCL on GPU and gloo on CPU.
Prompt groups are sharded across ranks by contiguous slices of the global batch; the credit math runs
on the all-gathered batch so that group statistics are right when a group spans ranks.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

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


# ------------------------------------------------------------------ wrapped models (DDP / FSDP2)


class VelocityModule(torch.nn.Module):
    """``forward = policy.velocity``, so DDP / FSDP2 can wrap any FlowPolicy without reaching inside it.

    With ``autocast`` the network runs under torch.autocast (weights stay in their own dtype, e.g. fp32);
    the velocity comes back in the latents' dtype and the SDE and credit math stay in fp32.
    """

    def __init__(self, policy: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.policy: Any = policy  # a FlowPolicy
        self.autocast = autocast

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.autocast is None:
            return cast(torch.Tensor, self.policy.velocity(x, sigma, cond))
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return cast(torch.Tensor, self.policy.velocity(x, sigma, cond)).to(x.dtype)


def wrap(module: torch.nn.Module, info: DistInfo, fsdp: bool, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` as every rank's replica: unchanged in one process, FSDP2 ``fully_shard`` (``fsdp``) or DDP."""
    if not info.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # frozen parts (text encoders, VAE) stay whole: they are used outside the wrapped forward
        frozen = {p for p in module.parameters() if not p.requires_grad}
        return cast(torch.nn.Module, fully_shard(module, ignored_params=frozen))
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        module,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def no_sync(model: Any, skip_sync: bool) -> AbstractContextManager[None]:
    """A block whose backward accumulates gradients locally (``skip_sync``) or synchronises them over ranks."""
    if skip_sync and hasattr(model, "no_sync"):  # DDP
        return cast(AbstractContextManager[None], model.no_sync())
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(not skip_sync)
    return nullcontext()


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded DTensor) parameter, detached (a collective if sharded)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full: torch.Tensor, p: Any) -> torch.Tensor:
    """``full`` laid out like parameter ``p``: sharded the same way when ``p`` is an FSDP2 DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
    return full.to(p.device, p.dtype)


def optimizer_state(optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimizer state with whole tensors (``sharded``: FSDP2 moments gathered, a collective on every rank)."""
    state = optimizer.state_dict()
    if sharded:
        state["state"] = {i: {k: whole(v) for k, v in st.items()} for i, st in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool) -> None:
    """Load a state of :func:`optimizer_state`; ``sharded``: each moment re-sharded like its parameter."""
    if sharded:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state["state"] = {
            i: {k: v if v.dim() == 0 else like(v, params[int(i)]) for k, v in st.items()}
            for i, st in state["state"].items()
        }
    optimizer.load_state_dict(state)
