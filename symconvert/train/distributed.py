"""torchrun support: ``Dist`` (this process's rank), ``distributed()`` (the one set-up and
tear-down of the process group) and the small all-reduces the loop needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from symconvert.checks import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun group if launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
        owns = True
    return Dist(rank=rank, world_size=world, local_rank=local, owns_group=owns), device


@contextlib.contextmanager
def distributed(device: str | torch.device | None = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """``setup_distributed`` for a block: the group this call created is destroyed after it."""
    dist, dev = setup_distributed(resolve_device(device))
    try:
        yield dist, dev
    finally:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def any_rank(dist: Dist, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not dist.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(dist: Dist, stats: dict[str, Any]) -> dict[str, Any]:
    if not dist.enabled:
        return dict(stats)
    t = torch.tensor([stats["loss_sum"], float(stats["correct"]), float(stats["seen"])],
                     dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return {"loss_sum": float(t[0]), "correct": int(t[1]), "seen": int(t[2]),
            "time": stats["time"]}
