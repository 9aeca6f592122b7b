"""The radix prefix cache: unit cases, and hypothesis property tests through the KV manager.

The property tests keep a model of the pool's contents: every slot a request computes holds "the KV
of" its token prefix (`content[slot] = tuple(tokens[:position + 1])`). A prefix hit is right when its
slots hold exactly the query's prefixes, and longest when no cached slot holds a longer one; a
running request's KV is intact when its slots still hold its prefixes after any sequence of
inserts, shares, evictions, preemptions and aborts.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kestrel.kvcache.allocator import SlotAllocator
from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.radix_cache import RadixCache


def _cache(num_slots: int = 32) -> tuple[RadixCache, SlotAllocator]:
    alloc = SlotAllocator(num_slots)
    return RadixCache(alloc), alloc


def _insert(cache: RadixCache, alloc: SlotAllocator, tokens: list[int]):
    slots = alloc.allocate(len(tokens))
    assert slots is not None
    return cache.insert(tokens, slots), slots


def test_match_returns_the_longest_prefix_and_splits_edges():
    cache, alloc = _cache()
    _, slots = _insert(cache, alloc, [1, 2, 3, 4])
    hit = cache.match([1, 2, 9])
    assert hit.num_tokens == 2 and hit.slots == slots[:2]
    assert cache.match([1, 2, 3, 4, 5]).slots == slots
    assert cache.match([7]).num_tokens == 0 and cache.match([7]).handle is None
    assert cache.match([]).num_tokens == 0
    cache.check_integrity()  # the split left a consistent tree
    assert cache.num_cached_slots == 4


def test_insert_recognises_its_own_slots_and_frees_duplicates():
    cache, alloc = _cache(16)
    _, first = _insert(cache, alloc, [1, 2, 3])
    mine = first[:2] + alloc.allocate(2)  # a request that hit [1, 2] and computed 3 and 4 itself
    hit = cache.insert([1, 2, 3, 4], mine)
    assert hit.num_tokens == 4 and hit.slots == first + [mine[3]]
    assert cache.num_cached_slots == 4
    assert alloc.num_free == 16 - 4  # its own slot for token 3 was a duplicate: freed
    alloc.check_integrity(cache.cached_slots())
    cache.check_integrity()


def test_locked_prefixes_survive_eviction_and_lru_goes_first():
    cache, alloc = _cache(16)
    old, _ = _insert(cache, alloc, [1, 2, 3])
    new, _ = _insert(cache, alloc, [5, 6, 7])
    cache.match([1, 2, 3])  # touching [1, 2, 3] makes [5, 6, 7] the least recently used
    assert cache.evict(2) == 2  # token granular: only the tail of [5, 6, 7] goes
    assert cache.match([5, 6, 7]).num_tokens == 1 and cache.match([1, 2, 3]).num_tokens == 3
    cache.lock(old.handle)
    assert cache.num_evictable_slots == 1
    assert cache.evict(10) == 1  # everything but the locked prefix
    assert cache.num_cached_slots == 3 and cache.match([1, 2, 3]).num_tokens == 3
    cache.unlock(old.handle)
    assert cache.evict(10) == 3 and cache.num_cached_slots == 0 and alloc.num_free == 16
    cache.check_integrity()
    with pytest.raises(RuntimeError):
        cache.unlock(old.handle)


def test_locks_stack_and_splits_keep_them():
    cache, alloc = _cache(16)
    hit, _ = _insert(cache, alloc, [1, 2, 3, 4])
    cache.lock(hit.handle)
    cache.lock(hit.handle)
    short = cache.match([1, 2])  # splits the locked edge
    cache.check_integrity()
    assert cache.num_evictable_slots == 0
    cache.unlock(hit.handle)
    assert cache.evict(4) == 0
    cache.unlock(hit.handle)
    assert cache.num_evictable_slots == 4 and short.num_tokens == 2


def test_manager_shares_a_running_prefix_and_repoints_the_duplicate():
    kv = KVCacheManager(32, 4, 32, RadixCache)
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 4, 9]
    assert kv.allocate("a", 5) and kv.allocate("b", 5)  # both computed [1, 2, 3, 4] themselves
    kv.take_table_writes()
    kv.share_computed("a", a)
    kv.share_computed("b", b)
    assert kv.slots_of("b")[:4] == kv.slots_of("a")[:4]
    writes = kv.take_table_writes()  # b's row now points at a's slots for positions 0-3
    assert writes.positions == [0, 1, 2, 3] and writes.slots == kv.slots_of("a")[:4]
    assert kv.num_free_slots == 32 - 6  # b's duplicates went back
    kv.check_integrity()
    kv.free("a", a)
    kv.free("b", b)
    kv.check_integrity()
    assert kv.num_cached_slots == 6 and kv.num_available_slots == 32


def test_allocate_evicts_only_when_that_makes_it_fit():
    kv = KVCacheManager(8, 4, 8, RadixCache)
    assert kv.allocate("a", 6)
    kv.free("a", [1, 2, 3, 4, 5, 6])
    assert kv.num_cached_slots == 6
    assert kv.allocate("b", 5)  # 2 free + 3 evicted
    assert kv.num_cached_slots == 3
    assert not kv.allocate("c", 4)  # 3 cached + 0 free: not enough, so nothing is evicted
    assert kv.num_cached_slots == 3
    kv.check_integrity()


# ---- properties ----------------------------------------------------------------------
_TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # a small alphabet: many shared prefixes


class RadixMachine(RuleBasedStateMachine):
    """Random requests through a `KVCacheManager` over a `RadixCache` with a small pool."""

    @initialize(num_slots=st.integers(8, 40))
    def setup(self, num_slots: int) -> None:
        self.kv = KVCacheManager(num_slots, 4, 16, RadixCache)
        self.content: dict[int, tuple[int, ...]] = {}
        self.live: dict[str, tuple[list[int], int]] = {}
        """request id -> (tokens, computed)."""
        self.next_id = 0

    def _compute(self, rid: str, tokens: list[int], start: int, end: int) -> None:
        slots = self.kv.slots_of(rid)
        for p in range(start, end):
            self.content[slots[p]] = tuple(tokens[: p + 1])

    def _check_hit(self, query: list[int], hit) -> None:
        assert hit.num_tokens == len(hit.slots) <= len(query)
        for i, slot in enumerate(hit.slots):
            assert self.content.get(slot) == tuple(query[: i + 1]), "a hit slot holds the wrong KV"
        cached = {self.content.get(s) for s in self.kv.prefix_cache.cached_slots()}
        longest = max((len(c) for c in cached if c is not None and tuple(query[: len(c)]) == c), default=0)
        assert hit.num_tokens == longest, "match missed a longer cached prefix"

    @rule(tokens=_TOKENS, chunk=st.integers(1, 10))
    def start(self, tokens: list[int], chunk: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        hit = self.kv.match(tokens[:-1])
        self._check_hit(tokens[:-1], hit)
        n = min(chunk, len(tokens) - hit.num_tokens)
        if self.kv.allocate(rid, n, hit):
            self._compute(rid, tokens, hit.num_tokens, hit.num_tokens + n)
            self.live[rid] = (tokens, hit.num_tokens + n)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 10))
    def compute_more(self, data, chunk: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        tokens, computed = self.live[rid]
        n = min(chunk, len(tokens) - computed)
        if n and self.kv.allocate(rid, n):
            self._compute(rid, tokens, computed, computed + n)
            self.live[rid] = (tokens, computed + n)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def share(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        tokens, computed = self.live[rid]
        self.kv.share_computed(rid, tokens[:computed])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep=st.booleans())
    def finish_or_abort(self, data, keep: bool) -> None:
        """Finish (or be preempted: the same for the KV) keeping the computed tokens, or drop them all."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        tokens, computed = self.live.pop(rid)
        self.kv.free(rid, tokens[:computed] if keep else ())

    @rule(num_slots=st.integers(0, 12))
    def evict(self, num_slots: int) -> None:
        before, evictable = self.kv.num_cached_slots, self.kv.prefix_cache.num_evictable_slots
        freed = self.kv.prefix_cache.evict(num_slots)
        assert freed == min(num_slots, evictable)
        assert self.kv.num_cached_slots == before - freed

    @invariant()
    def integrity(self) -> None:
        if not hasattr(self, "kv"):
            return
        self.kv.check_integrity()
        for rid, (tokens, computed) in self.live.items():
            slots = self.kv.slots_of(rid)
            assert len(slots) == computed
            for p in range(computed):
                assert self.content[slots[p]] == tuple(tokens[: p + 1]), "a running request's KV was overwritten"

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for rid, (tokens, computed) in list(self.live.items()):
            self.kv.free(rid, tokens[:computed])
        self.kv.check_integrity()
        assert self.kv.num_available_slots == self.kv.num_slots  # every slot free or cached and unlocked


TestRadixProperties = RadixMachine.TestCase
TestRadixProperties.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
