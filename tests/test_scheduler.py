"""Scheduler and KV bookkeeping with fake capacity (no model): budgets, preemption, integrity."""

from __future__ import annotations

import random

import pytest

from kestrel.kvcache.allocator import SlotAllocator
from kestrel.kvcache.manager import KVCacheManager
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler
from kestrel.step_batch import StepResult
from kestrel.stop_rules import StopRules


def _scheduler(kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> Scheduler:
    return Scheduler(kv, StopRules((), kv.max_model_len), max_num_seqs, max_num_batched_tokens)


def _simulate(seed: int, num_slots: int, budget: int, max_seqs: int, num_reqs: int,
              req_len: int | None = None) -> Scheduler:
    """Random arrivals / lengths / aborts; each request needs at most `req_len` slots (default: the pool)."""
    req_len = req_len or num_slots
    rng = random.Random(seed)
    kv = KVCacheManager(num_slots, max_seqs, max_model_len=num_slots)
    sched = _scheduler(kv, max_seqs, budget)
    reqs = []
    for i in range(num_reqs):
        prompt = [1] * rng.randrange(1, req_len // 2)
        max_tokens = rng.randrange(1, req_len - len(prompt) + 1)
        reqs.append(Request.new(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), i))
    pending = list(reqs)
    for _ in range(20000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop(0))
        if not pending and not sched.has_unfinished:
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        assert len(sched.running) <= max_seqs
        for req, n in out.scheduled:
            assert n > 0 and req.num_computed_tokens + n <= req.num_tokens
            assert kv.num_slots_of(req.request_id) >= req.num_computed_tokens + n
        sched.commit(out)
        sched.update(out, StepResult([7] * len(out.sampled)))  # max_tokens finishes requests
        if sched.running and rng.random() < 0.02:  # a client goes away
            sched.abort(rng.choice(sched.running).request_id)
        kv.check_integrity()
    assert not pending and not sched.has_unfinished, "workload did not drain (livelock?)"
    assert kv.num_available_slots == num_slots
    assert all(r.is_finished for r in reqs)
    return sched


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_integrity_and_drain(seed):
    sched = _simulate(seed, num_slots=64, budget=16, max_seqs=4, num_reqs=30)
    if seed == 0:
        assert sched.num_preemptions > 0  # the tight pool really forced preemption


def test_roomy_pool_never_preempts():
    assert _simulate(1, num_slots=4096, budget=256, max_seqs=8, num_reqs=20, req_len=512).num_preemptions == 0


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    kv = KVCacheManager(1000, 8, 1000)
    sched = _scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    a = Request.new("a", [1] * 25, SamplingParams(), 0)
    sched.add(a)
    chunks = []
    while a.num_computed_tokens < a.num_tokens:
        (req, n), = sched.schedule().scheduled
        chunks.append(n)
        req.num_computed_tokens += n
    assert chunks == [10, 10, 5]
    a.token_ids.append(3)
    b = Request.new("b", [1] * 30, SamplingParams(), 1)
    sched.add(b)
    out = sched.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]


def test_preempts_newest_and_requeues_it_first():
    kv = KVCacheManager(10, 4, 10)
    sched = _scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = Request.new("old", [1] * 5, SamplingParams(), 0), Request.new("new", [1] * 5, SamplingParams(), 1)
    sched.add(old)
    sched.add(new)
    for req, n in sched.schedule().scheduled:
        req.num_computed_tokens += n
        req.token_ids.append(2)
    out = sched.schedule()  # both need one more slot; only the old one can have it
    assert out.preempted == [new] and [r.request_id for r, _ in out.scheduled] == ["old"]
    assert new.num_computed_tokens == 0 and sched.waiting[0] is new
    kv.check_integrity()


def test_allocator_all_or_nothing_and_integrity():
    alloc = SlotAllocator(8)
    a = alloc.allocate(5)
    assert alloc.allocate(4) is None and alloc.num_free == 3
    alloc.check_integrity(a)
    alloc.free(a)
    alloc.check_integrity([])
    with pytest.raises(AssertionError):
        alloc.check_integrity([0])  # claims a free slot is in use


def test_allocator_hands_out_runs_in_ascending_order():
    alloc = SlotAllocator(10)
    a, b = alloc.allocate(4), alloc.allocate(3)
    assert a == [0, 1, 2, 3] and b == [4, 5, 6]  # a fresh pool: forward runs, as attention reads them
    alloc.free(a)
    assert alloc.allocate(4) == [0, 1, 2, 3]  # a run freed together comes back forward
    assert alloc.allocate(2) == [7, 8]
