"""The scheduler over a radix prefix cache, with fake capacity (no model).

A model of the pool's contents (`content[slot]` = the token prefix whose KV the slot holds) checks
that every prefix hit and every running request reads the right KV, through random workloads with
shared prefixes, chunked prefill, eviction, preemption and aborts.
"""

from __future__ import annotations

import random

from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.radix_cache import RadixCache
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler
from kestrel.step_batch import StepResult
from kestrel.stop_rules import StopRules


def _scheduler(num_slots: int, max_seqs: int, budget: int, policy: str = "fcfs",
               max_model_len: int | None = None) -> Scheduler:
    kv = KVCacheManager(num_slots, max_seqs, max_model_len or num_slots, RadixCache)
    return Scheduler(kv, StopRules((), kv.max_model_len), max_seqs, budget, policy)


def _step(sched: Scheduler, content: dict[int, tuple[int, ...]], token: int = 7):
    """Schedule, "compute" the scheduled tokens into `content` (checking what they read), commit, update."""
    out = sched.schedule()
    kv = sched.kv_manager
    for req, n in out.scheduled:
        slots = kv.slots_of(req.request_id)
        start = req.num_computed_tokens
        for p in range(start):  # what attention reads: the hit's and earlier steps' KV
            assert content.get(slots[p]) == tuple(req.token_ids[: p + 1]), "a request reads the wrong KV"
        for p in range(start, start + n):
            content[slots[p]] = tuple(req.token_ids[: p + 1])
    sched.commit(out)
    sched.update(out, StepResult([token] * len(out.sampled)))
    return out


def _prompt(rng: random.Random, prefixes: list[list[int]], max_len: int) -> list[int]:
    base = rng.choice(prefixes)[: rng.randrange(0, max_len // 2)]
    return base + [rng.randrange(3, 50) for _ in range(rng.randrange(1, max_len // 2))]


def test_1000_random_requests_with_aborts_end_free_or_cached_unlocked():
    rng = random.Random(0)
    sched = _scheduler(num_slots=160, max_seqs=6, budget=48, max_model_len=80)
    kv = sched.kv_manager
    prefixes = [[rng.randrange(3, 50) for _ in range(40)] for _ in range(5)]
    reqs = []
    for i in range(1000):
        prompt = _prompt(rng, prefixes, 60)
        reqs.append(Request.new(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 16)), i))
    pending = list(reqs)
    content: dict[int, tuple[int, ...]] = {}
    for num_steps in range(100_000):
        while pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if not pending and not sched.has_unfinished:
            break
        out = _step(sched, content)
        assert out.num_batched_tokens <= 48 and len(sched.running) <= 6
        if sched.running and rng.random() < 0.05:  # a client goes away
            sched.abort(rng.choice(sched.running).request_id)
        if sched.waiting and rng.random() < 0.01:  # or leaves before it ever ran
            sched.abort(rng.choice(sched.waiting).request_id)
        if num_steps % 50 == 0:
            kv.check_integrity()
    assert not pending and not sched.has_unfinished, "workload did not drain (livelock?)"
    kv.check_integrity()
    assert kv.num_available_slots == kv.num_slots  # every slot free or cached and unlocked
    assert kv.num_cached_slots > 0 and sched.num_preemptions > 0
    stats = sched.prefix_stats
    assert 0.2 < stats.hit_rate < 1


def test_same_prompt_is_computed_once_and_shared():
    sched = _scheduler(num_slots=400, max_seqs=8, budget=256)
    system = list(range(10, 110))
    for i in range(4):
        sched.add(Request.new(f"r{i}", system + [200 + i, 201], SamplingParams(max_tokens=3), i))
    content: dict[int, tuple[int, ...]] = {}
    first = _step(sched, content)
    assert [(r.request_id, n) for r, n in first.scheduled] == [("r0", 102)]  # the others wait one step
    second = _step(sched, content)
    assert [(r.request_id, n) for r, n in second.scheduled] == [("r0", 1), ("r1", 2), ("r2", 2), ("r3", 2)]
    kv = sched.kv_manager
    assert all(kv.slots_of(f"r{i}")[:100] == kv.slots_of("r0")[:100] for i in range(4))
    assert [sched._requests[f"r{i}"].num_cached_tokens for i in range(4)] == [0, 100, 100, 100]
    kv.check_integrity()


def test_concurrent_prompts_share_their_prefix_memory():
    """Admitted in the same step (a short shared part: no wait), then deduplicated when both finish prefill."""
    sched = _scheduler(num_slots=100, max_seqs=4, budget=100)
    a = Request.new("a", [1, 2, 3, 4, 5, 6, 10], SamplingParams(max_tokens=5), 0)
    b = Request.new("b", [1, 2, 3, 4, 5, 6, 11], SamplingParams(max_tokens=5), 1)
    sched.add(a)
    sched.add(b)
    content: dict[int, tuple[int, ...]] = {}
    out = _step(sched, content)
    assert len(out.scheduled) == 2
    kv = sched.kv_manager
    assert kv.slots_of("a")[:6] == kv.slots_of("b")[:6]
    assert kv.num_free_slots == 100 - 8  # 6 shared + one own each
    kv.check_integrity()


def test_preempted_request_finds_its_computed_prefix():
    sched = _scheduler(num_slots=24, max_seqs=2, budget=64)
    old = Request.new("old", list(range(3, 13)), SamplingParams(max_tokens=14, ignore_eos=True), 0)
    new = Request.new("new", list(range(20, 30)), SamplingParams(max_tokens=14, ignore_eos=True), 1)
    sched.add(old)
    sched.add(new)
    content: dict[int, tuple[int, ...]] = {}
    while not new.num_preemptions:
        _step(sched, content)
    assert sched.waiting[0] is new and new.num_computed_tokens == 0
    while sched.waiting:
        _step(sched, content)
    # readmitted on its own cached KV: it computes only what was evicted meanwhile, plus its last token
    assert sched.prefix_stats.num_hit_tokens > 0
    while sched.has_unfinished:
        _step(sched, content)
    sched.kv_manager.check_integrity()


def test_eviction_comes_before_preemption():
    sched = _scheduler(num_slots=40, max_seqs=4, budget=64)
    content: dict[int, tuple[int, ...]] = {}
    sched.add(Request.new("done", list(range(3, 33)), SamplingParams(max_tokens=1), 0))
    while sched.has_unfinished:
        _step(sched, content)
    assert sched.kv_manager.num_cached_slots == 30
    sched.add(Request.new("next", list(range(40, 70)), SamplingParams(max_tokens=5, ignore_eos=True), 1))
    while sched.has_unfinished:
        _step(sched, content)
    assert sched.num_preemptions == 0
    sched.kv_manager.check_integrity()


def test_lpm_prefers_the_longest_cached_prefix_when_the_queue_is_long():
    for policy, expected in (("fcfs", ["a", "b"]), ("lpm", ["b", "a"])):
        sched = _scheduler(num_slots=200, max_seqs=1, budget=64, policy=policy)
        content: dict[int, tuple[int, ...]] = {}
        sched.add(Request.new("warm", list(range(3, 43)), SamplingParams(max_tokens=1), 0))
        while sched.has_unfinished:
            _step(sched, content)
        sched.add(Request.new("a", [90, 91, 92], SamplingParams(max_tokens=2), 1))
        sched.add(Request.new("b", list(range(3, 43)) + [99], SamplingParams(max_tokens=2), 2))
        order = []
        while sched.has_unfinished:
            for req, _ in _step(sched, content).scheduled:
                if req.request_id not in order:
                    order.append(req.request_id)
        assert order == expected, policy


def test_full_pool_evicts_a_batch_not_one_slot_per_allocation():
    """A full pool of cached prompts: decoding requests short by one slot each trigger one eviction of
    `EVICT_AT_LEAST` of the pool, not one leaf scan per slot (the H200 n2000 regression: 35 ms/step)."""
    kv = KVCacheManager(640, 4, 640, RadixCache)
    for i in range(10):  # ten finished 64-token prompts fill the pool, all cached
        assert kv.allocate(f"done{i}", 64)
        kv.free(f"done{i}", [1000 * i + t for t in range(64)])
    assert kv.num_free_slots == 0 and kv.num_cached_slots == 640
    calls = []
    evict = kv.prefix_cache.evict
    kv.prefix_cache.evict = lambda n: calls.append(n) or evict(n)
    for _ in range(10):  # one slot at a time, as a decode step allocates
        assert kv.allocate("decoding", 1)
    assert calls == [640 // 64]
    assert kv.num_cached_slots == 630 and kv.num_slots_of("decoding") == 10
    kv.check_integrity()
    assert not kv.allocate("big", 640)  # more than free + evictable: nothing changes, nothing evicted
    assert calls == [640 // 64]
    kv.check_integrity()
