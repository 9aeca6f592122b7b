"""The prefix-cache seam: what a cache of computed KV, keyed by token-id prefixes, must offer.

The KV manager asks the cache, before a request's first step, for the longest prefix of its tokens
whose KV is already in the pool (`match`); the request then holds that prefix `lock`ed and computes
only the rest. When a request's prompt is computed, and again when it finishes or is preempted, its
computed tokens and their slots go to the cache (`insert`), which keeps what it wants and frees the
rest. When the pool runs short, the manager asks the cache to `evict` unlocked entries before
anyone is preempted.

Ownership (checked by `KVCacheManager.check_integrity`): every slot is exactly one of free (on the
allocator's stack), cached (owned by the cache, whether or not a running request has it locked),
or in use (owned by one running request). free + cached + in use == total.

`NoPrefixCache` caches nothing: every match is empty and every insert frees its slots. `RadixCache`
(`radix_cache.py`, a token-granular radix tree) fills the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kestrel.kvcache.allocator import SlotAllocator


class PrefixHit(NamedTuple):
    """The longest cached prefix of a token sequence."""

    num_tokens: int
    """Tokens [0, num_tokens) have KV in the pool."""
    slots: list[int]
    """Their slots, one per token, owned by the cache."""
    handle: object
    """What to `lock` / `unlock`; None for an empty hit."""


EMPTY_HIT = PrefixHit(0, [], None)


class PrefixCache(Protocol):
    keeps_inserts: bool
    """True when `insert` keeps every slot it is given (until evicted): only then may a running
    request hand its computed prefix over and go on reading it (`KVCacheManager.share_computed`)."""

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of `token_ids` (it may be empty). Nothing is locked yet.

        A hit's handle must be locked before anything else may evict (the manager locks it in the
        same `allocate` call); its slots stay the cache's and must never be freed by the caller.
        """
        ...

    def lock(self, handle: object) -> None:
        """Keep the hit's slots from eviction until `unlock` (reference counted). A no-op for None."""
        ...

    def unlock(self, handle: object) -> None:
        ...

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> PrefixHit:
        """Take ownership of `slots` (the KV of `token_ids`, one each): cache them or free them.

        Slots the cache already owns for this prefix are recognised as its own; any other slot it does
        not keep (a duplicate of KV it holds already, or everything for a cache that keeps nothing) goes
        back to the allocator. Returns what the cache now holds of `token_ids` (not locked).
        """
        ...

    def evict(self, num_slots: int) -> int:
        """Free up to `num_slots` unlocked cached slots (least recently used first); returns how many."""
        ...

    @property
    def num_cached_slots(self) -> int:
        ...

    @property
    def num_evictable_slots(self) -> int:
        """Cached slots no lock protects: what `evict` could free now."""
        ...

    def cached_slots(self) -> list[int]:
        """Every slot the cache owns (for the integrity check)."""
        ...

    def check_integrity(self) -> None:
        """Assert the cache's own invariants (counts, structure, reference counts)."""
        ...


class NoPrefixCache:
    """Caches nothing: every request computes its whole prompt."""

    keeps_inserts = False

    def __init__(self, allocator: SlotAllocator) -> None:
        self._allocator = allocator

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        return EMPTY_HIT

    def lock(self, handle: object) -> None:
        pass

    def unlock(self, handle: object) -> None:
        pass

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> PrefixHit:
        self._allocator.free(list(slots))
        return EMPTY_HIT

    def evict(self, num_slots: int) -> int:
        return 0

    @property
    def num_cached_slots(self) -> int:
        return 0

    @property
    def num_evictable_slots(self) -> int:
        return 0

    def cached_slots(self) -> list[int]:
        return []

    def check_integrity(self) -> None:
        pass


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache at admission, and how many were found."""

    num_queried_tokens: int = 0
    """Tokens of every admitted request (preempted requests count again when readmitted)."""
    num_hit_tokens: int = 0
    """Of those, tokens whose KV came from the cache."""

    def record(self, num_queried: int, num_hit: int) -> None:
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
