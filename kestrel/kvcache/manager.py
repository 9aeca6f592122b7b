"""Which KV slots each running request holds, and the slot-table entries that changed.

A running request owns one row of the slot table (`table[row, position] -> slot`, kept on the
worker's device) and a list of slots, one per position it has KV for: first the prefix it matched
in the prefix cache (owned by the cache, locked while the request runs), then slots of its own.
This manager is pure bookkeeping (no tensors): it records every table entry it assigns and hands
them out once per step (`take_table_writes`) so the worker updates its table incrementally.

Contract: `allocate` grants all requested slots or changes nothing (it asks the prefix cache to
evict only when that makes the allocation fit, and then at least `EVICT_AT_LEAST` of the pool, so
that a full pool is not scanned once per decoding request per step); `free` returns a request's slots to the prefix
cache, which keeps or frees them. `share_computed` hands a running request's computed prefix to the
cache at once, so that requests arriving meanwhile reuse it: the cache takes the request's own slots
(or frees them as duplicates of KV it holds already), and the request's holding is re-pointed at
the cache's slots, locked, with the table entries that changed recorded as writes. `check_integrity`
asserts that free + cached + in use == total, each slot once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kestrel.kvcache.allocator import SlotAllocator
from kestrel.kvcache.prefix_cache import EMPTY_HIT, NoPrefixCache, PrefixCache, PrefixHit
from kestrel.step_batch import TableWrites


EVICT_AT_LEAST = 1 / 64
"""Fraction of the pool an eviction frees at least (when that much is evictable). Each eviction scans
the prefix cache's leaves, and a full pool is short by one slot per decoding request per step: evicting
exactly the shortfall cost one scan per request per step (35 ms of host time per step at 256 requests
and ~1,700 cached prompts, more than the GPU's step); 1/64 of the pool makes it one scan per ~50 steps."""


@dataclass(slots=True)
class _Holding:
    """What one request holds."""

    row: int
    slots: list[int] = field(default_factory=list)
    """One per position with KV: the prefix hit's slots, then the request's own."""
    prefix: PrefixHit = EMPTY_HIT
    """The locked prefix-cache hit its first positions come from."""


class KVCacheManager:
    def __init__(self, num_slots: int, max_num_seqs: int, max_model_len: int,
                 prefix_cache: Callable[[SlotAllocator], PrefixCache] = NoPrefixCache) -> None:
        """`prefix_cache` builds the cache over this manager's allocator (`NoPrefixCache`, `RadixCache`)."""
        self.allocator = SlotAllocator(num_slots)
        self.prefix_cache: PrefixCache = prefix_cache(self.allocator)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self._free_rows: list[int] = list(range(max_num_seqs - 1, -1, -1))
        self._held: dict[str, _Holding] = {}
        self._writes: list[tuple[int, int, list[int]]] = []
        """(row, first position, slots) assigned since the last `take_table_writes`."""

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    @property
    def num_free_slots(self) -> int:
        return self.allocator.num_free

    @property
    def num_cached_slots(self) -> int:
        return self.prefix_cache.num_cached_slots

    @property
    def num_available_slots(self) -> int:
        """Slots an allocation could get now: free ones and cached ones no running request locks."""
        return self.allocator.num_free + self.prefix_cache.num_evictable_slots

    @property
    def shares_prefixes(self) -> bool:
        """The prefix cache keeps what it is given, so requests can share computed prefixes."""
        return self.prefix_cache.keeps_inserts

    def num_slots_of(self, request_id: str) -> int:
        held = self._held.get(request_id)
        return 0 if held is None else len(held.slots)

    def slots_of(self, request_id: str) -> list[int]:
        """The request's slots by position (do not modify)."""
        return self._held[request_id].slots

    def row_of(self, request_id: str) -> int:
        return self._held[request_id].row

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of `token_ids`; pass it to the request's first `allocate`."""
        return self.prefix_cache.match(token_ids)

    def allocate(self, request_id: str, num_new: int, prefix: PrefixHit = EMPTY_HIT) -> bool:
        """Give the request `num_new` more slots (after `prefix`, on its first allocation); all or nothing."""
        held = self._held.get(request_id)
        start = prefix.num_tokens if held is None else len(held.slots)
        if held is not None and prefix.num_tokens:
            raise ValueError(f"request {request_id} already holds slots; a prefix hit comes with the first allocation")
        if start + num_new > self.max_model_len:
            raise ValueError(f"request {request_id} would exceed max_model_len {self.max_model_len}")
        if held is None and not self._free_rows:
            return False
        self.prefix_cache.lock(prefix.handle)  # before evicting, so the hit itself survives
        shortfall = num_new - self.allocator.num_free
        if shortfall > self.prefix_cache.num_evictable_slots:  # evicting would not be enough: change nothing
            self.prefix_cache.unlock(prefix.handle)
            return False
        if shortfall > 0:
            at_least = int(self.allocator.num_slots * EVICT_AT_LEAST)
            self.prefix_cache.evict(max(shortfall, min(at_least, self.prefix_cache.num_evictable_slots)))
        slots = self.allocator.allocate(num_new)
        assert slots is not None, "the prefix cache evicted fewer slots than it said it could"
        if held is None:
            held = self._held[request_id] = _Holding(self._free_rows.pop(), list(prefix.slots), prefix)
            if prefix.num_tokens:
                self._writes.append((held.row, 0, list(prefix.slots)))
        if slots:
            self._writes.append((held.row, start, slots))
            held.slots.extend(slots)
        return True

    def free(self, request_id: str, computed_token_ids: Sequence[int] = ()) -> None:
        """Release the request's row and slots; no-op if it holds none.

        `computed_token_ids` are the tokens whose KV the request computed (a prefix of its tokens):
        the prefix cache may keep their slots. Slots past them are freed.
        """
        held = self._held.pop(request_id, None)
        if held is None:
            return
        n = min(len(computed_token_ids), len(held.slots))
        self.prefix_cache.insert(computed_token_ids[:n], held.slots[:n])
        own_tail = held.slots[max(n, held.prefix.num_tokens):]
        self.allocator.free(own_tail)
        self.prefix_cache.unlock(held.prefix.handle)
        self._free_rows.append(held.row)
        if self._writes:  # entries of a row freed in the same step must not reach the table late
            self._writes = [w for w in self._writes if w[0] != held.row]

    def share_computed(self, request_id: str, computed_token_ids: Sequence[int]) -> None:
        """Hand the request's computed KV to the prefix cache now; the request keeps running on it.

        `computed_token_ids` are the request's tokens with KV (a prefix of its tokens). The cache
        takes the request's own slots for them (freeing those it holds already under another slot);
        the request's holding then points at the cache's slots, locked like a prefix hit. A no-op when
        the cache keeps nothing, or nothing new was computed.
        """
        held = self._held.get(request_id)
        if held is None or not self.prefix_cache.keeps_inserts:
            return
        n = min(len(computed_token_ids), len(held.slots))
        old_start = held.prefix.num_tokens
        if n <= old_start:
            return
        hit = self.prefix_cache.insert(computed_token_ids[:n], held.slots[:n])
        assert hit.num_tokens == n, "a prefix cache that keeps inserts kept only part of one"
        self.prefix_cache.lock(hit.handle)
        self.prefix_cache.unlock(held.prefix.handle)
        new_slots = hit.slots
        # Only positions past the old hit can differ (the cache never moves a locked slot). This runs
        # after the step's writes were taken, so no (row, position) is written twice in one step.
        p = old_start
        while p < n:
            if held.slots[p] == new_slots[p]:
                p += 1
                continue
            run_start = p
            while p < n and held.slots[p] != new_slots[p]:
                p += 1
            self._writes.append((held.row, run_start, new_slots[run_start:p]))
        held.slots[:n] = new_slots
        held.prefix = hit

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; only when no request holds slots (returns whether it did)."""
        if self._held:
            return False
        self.prefix_cache.evict(self.prefix_cache.num_cached_slots)
        return True

    def take_table_writes(self) -> TableWrites:
        """Every table entry assigned since the last call, flattened, in order."""
        rows: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for row, start, new in self._writes:
            rows.extend([row] * len(new))
            positions.extend(range(start, start + len(new)))
            slots.extend(new)
        self._writes = []
        return TableWrites(rows, positions, slots)

    def check_integrity(self) -> None:
        """Assert free + cached + in use == total, each slot owned once, and rows owned once."""
        self.prefix_cache.check_integrity()
        in_use: list[int] = []
        for held in self._held.values():
            in_use.extend(held.slots[held.prefix.num_tokens:])
        cached = self.prefix_cache.cached_slots()
        self.allocator.check_integrity(in_use + cached)
        cached_set = set(cached)
        assert len(cached_set) == len(cached), "a slot is cached twice"
        assert not cached_set & set(in_use), "a slot is both cached and in use by a request"
        for held in self._held.values():
            assert cached_set.issuperset(held.slots[:held.prefix.num_tokens]), \
                "a request reads a prefix slot the cache no longer holds"
        rows = [held.row for held in self._held.values()]
        assert len(set(rows)) == len(rows), "a table row is owned twice"
        assert not set(rows) & set(self._free_rows), "a table row is both free and owned"
        assert len(rows) + len(self._free_rows) == self.max_num_seqs, "table rows leaked"
