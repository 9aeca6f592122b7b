"""Outputs with the prefix cache equal outputs without it: a tiny random Llama and SmolLM2 (fp32, greedy).

Covers prefixes of every length, chunked prefill, a pool small enough to force eviction and
preemption, seeds and logprobs, and the cached-token counts reported per request.
"""

from __future__ import annotations

import random

import pytest

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _engine(path: str, **kw) -> Engine:
    kw.setdefault("num_kv_slots", 4096)  # small enough for a fast integrity check every step
    return Engine(EngineConfig(model=path, show_progress=False, **kw))


def _run(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY) -> dict:
    """request id -> (tokens, logprob records, cached prompt tokens)."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    got: dict[str, tuple[list, list, int]] = {rid: ([], [], 0) for rid in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens, logprobs, _ = got[out.request_id]
            tokens += out.new_token_ids
            logprobs += out.new_logprobs or []
            got[out.request_id] = (tokens, logprobs, out.num_cached_tokens)
        engine.check_integrity()
    return got


def _tokens(got: dict) -> dict:
    return {rid: tokens for rid, (tokens, _, _) in got.items()}


def _shared_prefix_prompts(seed: int, base_len: int, tag: str, step: int = 1) -> dict[str, list[int]]:
    """One request per prefix length 0..base_len of a common base, each with its own 3-token tail."""
    rng = random.Random(seed)
    base = [rng.randrange(3, 128) for _ in range(base_len)]
    return {f"{tag}{k}": base[:k] + [rng.randrange(3, 128) for _ in range(3)] for k in range(0, base_len + 1, step)}


@pytest.fixture(scope="module")
def uncached(tiny_llama_dir):
    return _engine(tiny_llama_dir, enable_prefix_caching=False)


def test_every_prefix_length_matches_the_uncached_engine(tiny_llama_dir, uncached):
    cached = _engine(tiny_llama_dir, max_num_batched_tokens=16)  # chunked prefill too
    first = _shared_prefix_prompts(1, 48, "a")
    second = {rid.replace("a", "b"): ids for rid, ids in _shared_prefix_prompts(1, 48, "a").items()}
    third = _shared_prefix_prompts(1, 48, "c")  # same bases, other tails: hits at every length
    third = {rid: ids[:-3] + [5, 6, 7] for rid, ids in third.items()}
    want = _tokens(_run(uncached, {**first, **third}))
    got_first = _run(cached, first)
    got_second = _run(cached, second)  # the same prompts again: all but the last token cached
    got_third = _run(cached, third)
    assert _tokens(got_first) == {rid: want[rid] for rid in first}
    assert _tokens(got_second) == {rid.replace("a", "b"): want[rid] for rid in first}
    assert _tokens(got_third) == {rid: want[rid] for rid in third}
    assert all(got_second[rid][2] == len(ids) - 1 for rid, ids in second.items())
    assert all(got_third[f"c{k}"][2] >= k for k in range(49))  # a random tail may match a little more
    stats = cached.scheduler.prefix_stats
    assert 0.5 < stats.hit_rate < 1
    assert cached.kv_manager.num_available_slots == 4096


def test_tight_pool_evicts_and_preempts_with_identical_outputs(tiny_llama_dir, uncached):
    prompts = {**_shared_prefix_prompts(2, 40, "x", step=5), **_shared_prefix_prompts(3, 30, "y", step=6)}
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _tokens(_run(uncached, prompts, params))
    tight = _engine(tiny_llama_dir, num_kv_slots=120, max_num_batched_tokens=32)
    got = _run(tight, prompts, params)
    assert _tokens(got) == want
    assert tight.scheduler.num_preemptions > 0 and tight.scheduler.prefix_stats.num_hit_tokens > 0
    assert tight.kv_manager.num_available_slots == 120


def test_seeds_and_logprobs_are_unchanged_by_the_cache(tiny_llama_dir, uncached):
    prompts = _shared_prefix_prompts(4, 36, "s", step=6)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=3)
    want = _run(uncached, prompts, seeded)
    cached = _engine(tiny_llama_dir)
    _run(cached, prompts, seeded)  # warm the cache
    got = _run(cached, {rid + "-again": ids for rid, ids in prompts.items()}, seeded)
    for rid in prompts:
        tokens, logprobs, num_cached = got[rid + "-again"]
        assert tokens == want[rid][0] and num_cached == len(prompts[rid]) - 1
        for record, expected in zip(logprobs, want[rid][1]):
            assert record.keys() == expected.keys()
            for token_id, lp in record.items():
                assert lp.logprob == pytest.approx(expected[token_id].logprob, abs=1e-4)


def test_abort_releases_the_locks(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, num_kv_slots=200)
    prompts = _shared_prefix_prompts(5, 30, "z", step=10)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv_manager.num_available_slots < 200
    for rid in prompts:
        engine.abort_request(rid)
    engine.check_integrity()
    assert engine.kv_manager.num_available_slots == 200 and engine.kv_manager.num_cached_slots > 0
    assert engine.reset_prefix_cache() and engine.kv_manager.num_free_slots == 200


def test_smollm2_shared_system_prompt_and_multi_turn(smollm_llm):
    """Through the offline LLM: batched with the cache == each prompt alone on an empty cache."""
    llm = smollm_llm
    system = "You are a careful assistant who answers in one short sentence. " * 4
    questions = ["What is the capital of France?", "Name a primary color.", "What is 3 + 4?",
                 "Which animal barks?"]
    params = SamplingParams(temperature=0, max_tokens=12)
    alone = []
    for q in questions:
        assert llm.reset_prefix_cache()
        alone.append(llm.generate(system + q, params, use_tqdm=False)[0])
    assert all(out.num_cached_tokens == 0 for out in alone)
    batched = llm.generate([system + q for q in questions], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
    assert all(out.num_cached_tokens > 40 for out in batched[1:])
    # multi-turn: the follow-up's history (the first turn and its answer) is cached
    conv = [{"role": "user", "content": questions[0]}]
    first = llm.chat(conv, params, use_tqdm=False)[0]
    conv += [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "And Italy?"}]
    follow_up = llm.chat(conv, params, use_tqdm=False)[0]
    assert follow_up.num_cached_tokens >= len(first.prompt_token_ids)
    assert llm.reset_prefix_cache()
    fresh = llm.chat(conv, params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0 and fresh.outputs[0].token_ids == follow_up.outputs[0].token_ids


@pytest.mark.parametrize("argv,enabled,policy", [([], True, "fcfs"), (["--disable-radix-cache"], False, "fcfs"),
                                                 (["--no-enable-prefix-caching", "--schedule-policy", "lpm"],
                                                  False, "lpm")])
def test_flags(argv, enabled, policy):
    import argparse

    from kestrel.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(argv))
    assert (config.enable_prefix_caching, config.schedule_policy) == (enabled, policy)
    with pytest.raises(ValueError, match="schedule_policy"):
        EngineConfig(schedule_policy="sjf")
