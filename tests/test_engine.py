"""Engine behaviour on a tiny random Llama: batching, preemption, seeds, stops, integrity."""

from __future__ import annotations

import random

import pytest

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams


def _engine(path: str, **kw) -> Engine:
    kw.setdefault("show_progress", False)
    return Engine(EngineConfig(model=path, **kw))


def _run(engine: Engine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]) -> dict:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params[rid])
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    reasons: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        engine.check_integrity()
    return {rid: (tokens[rid], reasons[rid]) for rid in prompts}


def _prompts(n: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))] for i in range(n)}


def test_batched_equals_one_at_a_time(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    prompts = _prompts(6)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = {rid: greedy for rid in prompts}
    batched = _run(engine, prompts, params)
    for rid, ids in prompts.items():
        alone = _run(engine, {rid + "-alone": ids}, {rid + "-alone": greedy})
        assert alone[rid + "-alone"] == batched[rid]
        assert len(batched[rid][0]) == 20 and batched[rid][1] == "length"


def test_small_pool_preempts_and_gives_identical_outputs(tiny_llama_dir):
    prompts = _prompts(8, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    params = {rid: greedy for rid in prompts}
    roomy = _run(_engine(tiny_llama_dir), prompts, params)
    tight_engine = _engine(tiny_llama_dir, num_kv_slots=120, max_num_batched_tokens=64)
    tight = _run(tight_engine, prompts, params)
    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy
    assert tight_engine.kv_manager.num_available_slots == 120


def test_seed_reproducible_across_batch_compositions(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    alone = _run(engine, {"s": prompt}, {"s": seeded})["s"]
    others = _prompts(5, seed=3)
    mixed_params = {rid: SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True) for rid in others}
    mixed_params["s2"] = seeded
    mixed = _run(engine, {**others, "s2": prompt}, mixed_params)["s2"]
    assert alone == mixed
    other_seed = _run(engine, {"s3": prompt}, {"s3": seeded.with_seed(99)})["s3"]
    assert other_seed != alone


def test_stop_token_ids_and_eos(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tokens, _ = _run(engine, {"a": [9, 10, 11]}, {"a": greedy})["a"]
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    stopped = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_at])
    got, reason = _run(engine, {"b": [9, 10, 11]}, {"b": stopped})["b"]
    assert reason == "stop" and got == tokens[: first + 1]
    # min_tokens blocks the stop token until enough tokens exist.
    blocked = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_at],
                             min_tokens=first + 2)
    got, _ = _run(engine, {"c": [9, 10, 11]}, {"c": blocked})["c"]
    assert stop_at not in got[: first + 2]


def test_context_length_finishes_with_length(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    tokens, reason = _run(engine, {"a": list(range(3, 23))}, {"a": params})["a"]
    assert reason == "length" and len(tokens) == 12


def test_prompt_validation(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, max_model_len=32)
    p = SamplingParams()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], p)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("b", list(range(3, 40)), p)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("c", [1, 100000], p)
    assert not engine.has_unfinished_requests()


def test_abort_frees_slots(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, num_kv_slots=500)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for rid, ids in _prompts(4, seed=5).items():
        engine.add_request(rid, ids, params)
    for _ in range(3):
        engine.step()
    assert engine.kv_manager.num_available_slots < 500
    for rid in list(_prompts(4, seed=5)):
        engine.abort_request(rid)
    engine.check_integrity()
    assert engine.kv_manager.num_available_slots == 500 and not engine.has_unfinished_requests()


def test_prepacked_weights_give_the_same_greedy_tokens(tiny_llama_dir):
    """The default CPU engine hands its matmuls to oneDNN-packed weights; --no-prepack-weights keeps F.linear."""
    from kestrel.kernels.cpu_linear import packing_supported
    import torch

    if not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN")
    packed, plain = _engine(tiny_llama_dir), _engine(tiny_llama_dir, prepack_weights=False)
    layer = packed.executor.worker.model.model.layers[0]
    assert layer.mlp.gate_up_proj.kernel is not None and packed.executor.worker.model.lm_head.kernel is not None
    assert layer.mlp.gate_up_proj.weight.numel() == 0  # the plain copy is dropped
    assert plain.executor.worker.model.model.layers[0].mlp.gate_up_proj.kernel is None
    prompts = _prompts(4, seed=7)
    greedy = {rid: SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for rid in prompts}
    assert _run(packed, prompts, greedy) == _run(plain, prompts, greedy)
