"""Which KV slots each request owns: the request->slot table and the allocator.

`req_to_token[row, position] -> kv slot` is the table attention reads (a CPU
int64 tensor here; the runner copies the rows a step needs to the device). Each
running request owns one row. The scheduler calls `allocate` before a step
and `free` when a request finishes or is preempted.

Contract: a request's slots for positions [0, num_slots(req)) are valid in its
row; `allocate` either grants all requested slots or changes nothing.
"""

from __future__ import annotations

import torch

from kestrel.kvcache.allocator import SlotAllocator


class KVCacheManager:
    def __init__(self, num_slots: int, max_num_reqs: int, max_model_len: int) -> None:
        self.allocator = SlotAllocator(num_slots)
        self.max_model_len = max_model_len
        self.req_to_token = torch.zeros(max_num_reqs, max_model_len, dtype=torch.int64)
        self._free_rows: list[int] = list(range(max_num_reqs - 1, -1, -1))
        self._row: dict[str, int] = {}
        self._num_slots: dict[str, int] = {}

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    @property
    def num_free_slots(self) -> int:
        return self.allocator.num_free

    def num_slots_of(self, request_id: str) -> int:
        return self._num_slots.get(request_id, 0)

    def row_of(self, request_id: str) -> int:
        return self._row[request_id]

    def allocate(self, request_id: str, num_new: int) -> bool:
        """Give the request `num_new` more slots (positions continue after its last one)."""
        start = self._num_slots.get(request_id, 0)
        if start + num_new > self.max_model_len:
            raise ValueError(f"request {request_id} would exceed max_model_len {self.max_model_len}")
        if request_id not in self._row and not self._free_rows:
            return False
        slots = self.allocator.allocate(num_new)
        if slots is None:
            return False
        if request_id not in self._row:
            self._row[request_id] = self._free_rows.pop()
        row = self._row[request_id]
        if slots:
            self.req_to_token[row, start:start + num_new] = torch.tensor(slots, dtype=torch.int64)
        self._num_slots[request_id] = start + num_new
        return True

    def free(self, request_id: str) -> None:
        """Release all of the request's slots and its row (no-op if it holds none)."""
        row = self._row.pop(request_id, None)
        n = self._num_slots.pop(request_id, 0)
        if row is None:
            return
        self.allocator.free(self.req_to_token[row, :n].tolist())
        self._free_rows.append(row)

    def check_integrity(self) -> None:
        """Assert free + in-use == total and that rows are owned once."""
        in_use: list[int] = []
        for rid, row in self._row.items():
            in_use.extend(self.req_to_token[row, : self._num_slots[rid]].tolist())
        self.allocator.check_integrity(in_use)
        rows = list(self._row.values())
        assert len(set(rows)) == len(rows), "a table row is owned twice"
        assert not set(rows) & set(self._free_rows), "a table row is both free and owned"
        assert len(rows) + len(self._free_rows) == self.req_to_token.shape[0], "table rows leaked"
