"""Step inputs on the device: one `StepBatch`'s integer lists become device tensors in one copy.

All lists are packed into one int32 array; on CUDA it goes through a pinned host buffer with one
non-blocking copy, then is split into views. On CPU the views share the numpy array's memory.
The pinned buffer is reused each step: the caller must not stage a new step before the previous
step's copy is done (the worker syncs on its sampled tokens every step).
"""

from __future__ import annotations

from typing import NamedTuple

import itertools

import numpy as np
import torch

from kestrel.step_batch import StepBatch


class StepInputs(NamedTuple):
    """Device tensors of one step, all int32."""

    token_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    slot_mapping: torch.Tensor     # [T]
    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor         # [R]
    req_rows: torch.Tensor         # [R]
    sample_indices: torch.Tensor   # [S]
    write_rows: torch.Tensor       # [W] slot-table entries to set
    write_positions: torch.Tensor  # [W]
    write_slots: torch.Tensor      # [W]


class InputStager:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None  # int32 staging buffer (CUDA only), grown on demand

    def stage(self, batch: StepBatch) -> StepInputs:
        w = batch.table_writes
        parts = (batch.token_ids, batch.positions, batch.slot_mapping, batch.query_start_loc, batch.seq_lens,
                 batch.req_rows, batch.sample_indices, w.rows, w.positions, w.slots)
        lengths = [len(p) for p in parts]
        packed = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=sum(lengths))
        flat = self._to_device(packed)  # [sum(lengths)] int32
        return StepInputs(*flat.split(lengths))

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(packed)
        if self.device.type == "cpu":
            return host
        if self.device.type != "cuda":
            return host.to(self.device)
        n = host.numel()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 2 * (0 if self._pinned is None else self._pinned.numel()), 4096),
                                       dtype=torch.int32, pin_memory=True)
        self._pinned[:n].copy_(host)
        return self._pinned[:n].to(self.device, non_blocking=True)
