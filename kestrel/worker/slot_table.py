"""The request->slot table on the worker's device: `table[row, position] -> slot`.

Attention kernels read it; the engine's KV manager decides its contents and sends only the entries
that changed (`StepBatch.table_writes`), so a step never copies the whole table to the device.
"""

from __future__ import annotations

import torch


class SlotTable:
    def __init__(self, max_num_seqs: int, max_model_len: int, device: torch.device) -> None:
        # [max_num_seqs, max_model_len] int32
        self.table = torch.zeros(max_num_seqs, max_model_len, dtype=torch.int32, device=device)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """table[rows[i], positions[i]] = slots[i]; all [N] int32 on the table's device, no (row, position) twice."""
        if rows.numel():
            self.table[rows, positions] = slots
