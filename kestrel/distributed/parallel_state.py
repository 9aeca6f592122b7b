"""The tensor-parallel group a model is built for, and the collectives its layers use.

A `TPGroup` is passed to every parallel layer when the model is built (no module-level state).
With one rank (the default) every collective is the identity, so layers are written
tensor-parallel from the start. With several, `group` is a torch.distributed process group
(NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None
    """torch.distributed process group when size > 1."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (in place); identity on one rank."""
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dim; identity on one rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_RANK = TPGroup()
