"""Free-slot bookkeeping for the token-granular KV pool (one slot per token).

Pure Python: a LIFO stack of free slot indices. A slot is either free (on the
stack) or owned by exactly one request; `check_integrity()` asserts that.

Slots come out in ascending order where the stack allows (a fresh pool, or a run freed together):
attention reads a request's keys in position order, and on CPU a forward stream of addresses is
20-40% faster than the same slots backwards (decode kernel, 16 requests x 216-1000 keys, Zen 4).
"""

from __future__ import annotations


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        # Pop from the end; reversed so the first allocations get low indices.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free slots, or None (and take nothing) if fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        slots = self._free[-n:]
        del self._free[-n:]
        slots.reverse()  # the stack holds runs descending, so that they pop ascending
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))

    def check_integrity(self, in_use: list[int]) -> None:
        """Assert free + in_use partition all slots exactly once."""
        free = set(self._free)
        assert len(free) == len(self._free), "a slot is on the free stack twice"
        used = set(in_use)
        assert len(used) == len(in_use), "a slot is owned twice"
        assert not (free & used), "a slot is both free and in use"
        assert len(free) + len(used) == self.num_slots, (
            f"slots leaked: free {len(free)} + in use {len(used)} != total {self.num_slots}")
