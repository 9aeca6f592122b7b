"""Step inputs on the device: one `StepBatch`'s integer lists become device tensors in one copy.

All lists are packed into one int32 array, each starting 16-byte aligned (`_ALIGN`); on CUDA it goes
through a pinned host buffer with one non-blocking copy, then is split into views. On CPU the views
share the numpy array's memory.
Two pinned buffers take turns, each reused only once the copy out of it has finished (an event),
so the next step can be staged while this one still runs (async scheduling).
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


_ALIGN = 4
"""Each list starts at a multiple of 4 int32s (16 bytes) of the packed array. Triton specializes a kernel on
whether each pointer argument is 16-byte aligned: views at arbitrary offsets gave the extend-attention,
KV-store and RoPE kernels new variants to compile (~1 s each) in the middle of a run whenever a step's
list lengths changed the alignment (measured on an H200: a shared-prefix run took 12.5 s instead of 8.8 s
with a cold kernel cache)."""


class InputStager:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None, None]  # int32 staging buffers (CUDA only), grown on demand
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def stage(self, batch: StepBatch) -> StepInputs:
        w = batch.table_writes
        parts = (batch.token_ids, batch.positions, batch.slot_mapping, batch.query_start_loc, batch.seq_lens,
                 batch.req_rows, batch.sample_indices, w.rows, w.positions, w.slots)
        lengths = [len(p) for p in parts]
        padded = [-(-n // _ALIGN) * _ALIGN for n in lengths]
        packed = np.zeros(sum(padded), dtype=np.int32)
        for start, part, n in zip(itertools.accumulate(padded, initial=0), parts, lengths):
            packed[start:start + n] = part
        flat = self._to_device(packed)  # [sum(padded)] int32
        return StepInputs(*(view[:n] for view, n in zip(flat.split(padded), lengths)))

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(packed)
        if self.device.type == "cpu":
            return host
        if self.device.type != "cuda":
            return host.to(self.device)
        n, i = host.numel(), self._turn
        self._turn ^= 1
        if self._copied[i] is not None:
            self._copied[i].synchronize()  # the copy out of this buffer, two steps ago, is done
        buffer = self._pinned[i]
        if buffer is None or buffer.numel() < n:
            buffer = self._pinned[i] = torch.empty(max(n, 2 * (0 if buffer is None else buffer.numel()), 4096),
                                                   dtype=torch.int32, pin_memory=True)
        buffer[:n].copy_(host)
        on_device = buffer[:n].to(self.device, non_blocking=True)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        return on_device
