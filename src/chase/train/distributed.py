"""``torchrun`` set-up: one process per device, gloo on the CPU, NCCL on CUDA; only rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "wrap_ddp"]


@dataclass
class Dist:
    """Where this process stands: rank, world size, its device, and whether it writes files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums of ``values`` over all ranks (float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.device.type == "cpu" or dist.get_backend() != "nccl":
            t = t.cpu()
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or a single process.

    A process group that the caller already initialised (e.g. tests with ``torch.multiprocessing``) is used
    as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world, local, _device(device, local))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=_device(device, 0))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, dev, initialized_here=True)


def wrap_ddp(module: nn.Module, d: Dist) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes (call again after a
    channel removal: DDP's buckets are sized for the old shapes)."""
    if not d.enabled:
        return module
    ids = [d.device.index] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
