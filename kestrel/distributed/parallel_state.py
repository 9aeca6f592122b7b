"""Tensor-parallel group state and the collectives layers use.

With one rank (the default) every collective is the identity, so layers can be
written tensor-parallel from the start. `init_tensor_parallel` wires a
torch.distributed process group (NCCL on GPU, gloo on CPU) when TP is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPState:
    rank: int = 0
    world_size: int = 1
    group: object | None = None


_STATE = TPState()


def init_tensor_parallel(rank: int, world_size: int, group=None) -> None:
    global _STATE
    _STATE = TPState(rank, world_size, group)


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP ranks (in place); identity on one rank."""
    if _STATE.world_size == 1:
        return x
    dist.all_reduce(x, group=_STATE.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim; identity on one rank."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)
