"""The prefix-cache seam: what a cache of computed KV, keyed by token-id prefixes, must offer.

The KV manager asks the cache, before a request's first step, for the longest prefix of its tokens
whose KV is already in the pool (`match`); the request then holds that prefix `lock`ed and computes
only the rest. When a request finishes or is preempted, its computed tokens and their slots go to
the cache (`insert`), which keeps what it wants and frees the rest. When the pool runs short, the
manager asks the cache to `evict` unlocked entries before anyone is preempted.

Ownership (checked by `KVCacheManager.check_integrity`): every slot is exactly one of free (on the
allocator's stack), cached (owned by the cache, whether or not a running request has it locked),
or in use (owned by one running request). free + cached + in use == total.

`NoPrefixCache` caches nothing: every match is empty and every insert frees its slots. A radix tree
(`radix_cache.py`, SGLang's RadixAttention) fills the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of `token_ids` (it may be empty). Nothing is locked yet."""
        ...

    def lock(self, handle: object) -> None:
        """Keep the hit's slots from eviction until `unlock` (reference counted). A no-op for None."""
        ...

    def unlock(self, handle: object) -> None:
        ...

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> None:
        """Take ownership of `slots` (the KV of `token_ids`, one each): cache them or free them.

        Slots the cache already owns for this prefix are recognised as its own; any other slot it does
        not keep goes back to the allocator.
        """
        ...

    def evict(self, num_slots: int) -> int:
        """Free up to `num_slots` unlocked cached slots (least recently used first); returns how many."""
        ...

    @property
    def num_cached_slots(self) -> int:
        ...

    def cached_slots(self) -> list[int]:
        """Every slot the cache owns (for the integrity check)."""
        ...


class NoPrefixCache:
    """Caches nothing: today's behaviour, every request computes its whole prompt."""

    def __init__(self, allocator: SlotAllocator) -> None:
        self._allocator = allocator

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        return EMPTY_HIT

    def lock(self, handle: object) -> None:
        pass

    def unlock(self, handle: object) -> None:
        pass

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> None:
        self._allocator.free(list(slots))

    def evict(self, num_slots: int) -> int:
        return 0

    @property
    def num_cached_slots(self) -> int:
        return 0

    def cached_slots(self) -> list[int]:
        return []
