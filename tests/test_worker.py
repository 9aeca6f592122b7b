"""The engine / worker seam: step batches as data, the worker in another process, the slot table.

The worker sees only `StepBatch`es; these tests check that a batch survives a process boundary,
that the engine gets the same tokens whether its worker runs in-process or in a child process
(the path tensor parallelism takes), that the KV manager's incremental table writes rebuild
exactly the table it describes, and that the torch backend's CUDA-graph hooks compute what its
per-step metadata does.
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from kestrel.attention import BatchLayout, create_backend
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.kvcache.manager import KVCacheManager
from kestrel.sampling_params import SamplingParams
from kestrel.step_batch import SampleRow, StepBatch, StepResult, TableWrites, decode_batch, decode_result, encode


def _batch() -> StepBatch:
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5, logprobs=2, stop=("x",))
    return StepBatch([5, 6, 7, 8], [0, 1, 2, 9], [3, 4, 5, 11], [0, 3, 4], [3, 10], [1, 0],
                     TableWrites([1, 1, 1, 0], [0, 1, 2, 9], [3, 4, 5, 11]), [2, 3],
                     [SampleRow("a", params, [2]), SampleRow("b", SamplingParams(), [], [1, 2], [3])], ["gone"])


def test_step_batch_round_trips_as_bytes_and_pickle():
    batch = _batch()
    assert decode_batch(encode(batch)) == batch
    assert pickle.loads(pickle.dumps(batch)) == batch
    assert batch.query_lens == [3, 1] and batch.num_reqs == 2 and not batch.is_decode_only
    result = StepResult([4, 9], [[-0.1, -0.1, -2.0], [-1.0, -0.5, -1.0]], [[4, 4, 7], [9, 3, 9]], [1, 2])
    assert decode_result(encode(result)) == result


def _run(engine: Engine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]):
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params[rid])
    got: dict[str, list] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].append((out.new_token_ids, out.new_logprobs, out.finish_reason))
    engine.check_integrity()
    return got


def test_worker_in_a_child_process_gives_the_same_tokens(tiny_llama_dir):
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(3, 128) for _ in range(rng.randrange(2, 30))] for i in range(6)}
    kinds = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=12, logprobs=2, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=3, max_tokens=8)]
    params = {rid: kinds[i % len(kinds)] for i, rid in enumerate(prompts)}
    config = dict(model=tiny_llama_dir, show_progress=False, num_kv_slots=72, max_num_batched_tokens=48)
    local = _run(Engine(EngineConfig(**config)), prompts, params)
    engine = Engine(EngineConfig(**config, distributed_executor_backend="mp"))
    try:
        remote = _run(engine, prompts, params)
        assert engine.scheduler.num_preemptions > 0  # the small pool made requests recompute, remotely too
    finally:
        engine.shutdown()
    assert remote == local


def test_a_failing_worker_process_raises_instead_of_hanging(tiny_llama_dir):
    engine = Engine(EngineConfig(model=tiny_llama_dir, show_progress=False, distributed_executor_backend="mp"))
    engine.executor._process.kill()
    engine.executor._process.join()
    engine.add_request("r", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="worker process died"):
        engine.step()
    engine.shutdown()


def test_table_writes_rebuild_the_table_the_manager_describes():
    """Random allocations, frees and reuse of rows: applying each step's writes to a mirror table gives
    every holder's slots at its row, and a freed row's late writes never land."""
    rng = random.Random(0)
    kv = KVCacheManager(num_slots=64, max_num_seqs=4, max_model_len=32)
    mirror = [[-1] * 32 for _ in range(4)]
    live: list[str] = []
    for step in range(400):
        for _ in range(rng.randrange(1, 4)):
            if live and rng.random() < 0.3:
                kv.free(live.pop(rng.randrange(len(live))))
            else:
                rid = live[rng.randrange(len(live))] if live and rng.random() < 0.6 else f"q{step}-{rng.random()}"
                room = kv.max_model_len - kv.num_slots_of(rid)
                if room and kv.allocate(rid, rng.randrange(1, min(room, 6) + 1)) and rid not in live:
                    live.append(rid)
        writes = kv.take_table_writes()
        assert len(set(zip(writes.rows, writes.positions))) == len(writes)
        for row, pos, slot in zip(writes.rows, writes.positions, writes.slots):
            mirror[row][pos] = slot
        for rid in live:
            slots = kv.slots_of(rid)
            assert mirror[kv.row_of(rid)][: len(slots)] == slots
        kv.check_integrity()
    for rid in live:
        kv.free(rid)
    assert kv.num_free_slots == 64
    kv.check_integrity()


@pytest.mark.parametrize("seq_lens", [[5, 1, 17], [3]])
def test_torch_backend_graph_metadata_matches_per_step_metadata(seq_lens):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, max_len, batch = 4, 2, 8, 24, 5
    backend = create_backend("torch", num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, max_model_len=max_len,
                             device="cpu")
    num_slots = 128
    k_cache = torch.randn(num_slots + 1, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_slots + 1, kv_heads, dim, generator=gen)
    table = torch.randperm(num_slots, generator=gen)[: 4 * max_len].view(4, max_len).int()
    r = len(seq_lens)
    rows = torch.tensor([2, 0, 3][:r], dtype=torch.int32)
    s_lens = torch.tensor(seq_lens, dtype=torch.int32)
    slot_mapping = table[rows.long(), (s_lens - 1).long()]
    layout = BatchLayout([1] * r, seq_lens, torch.arange(r + 1, dtype=torch.int32), s_lens, rows, table, slot_mapping)
    q = torch.randn(r, heads, dim, generator=gen)
    k, v = torch.randn(r, kv_heads, dim, generator=gen), torch.randn(r, kv_heads, dim, generator=gen)
    expected = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), backend.prepare(layout))

    meta = backend.graph_metadata(batch, table)
    backend.update_graph_metadata(meta, layout)
    pad = batch - r
    q_pad = torch.cat([q, torch.randn(pad, heads, dim, generator=gen)])
    k_pad = torch.cat([k, torch.randn(pad, kv_heads, dim, generator=gen)])
    v_pad = torch.cat([v, torch.randn(pad, kv_heads, dim, generator=gen)])
    k_graph, v_graph = k_cache.clone(), v_cache.clone()
    out = backend.forward(q_pad, k_pad, v_pad, k_graph, v_graph, meta)
    torch.testing.assert_close(out[:r], expected)
    assert torch.isfinite(out).all()  # padding rows stay finite
    assert torch.equal(k_graph[:num_slots][slot_mapping.long()], k)  # real tokens stored
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slot_mapping.long()] = False
    assert torch.equal(k_graph[:num_slots][untouched], k_cache[:num_slots][untouched])  # padding wrote the spare slot


def test_staged_inputs_keep_their_values_and_start_16_byte_aligned():
    """Each list is a view starting at a multiple of 16 bytes (Triton specializes kernels on pointer alignment)."""
    from kestrel.worker.inputs import InputStager

    batch = _batch()  # lists of 4, 4, 4, 3, 2, 2, 2, 4, 4, 4 ints: unaligned offsets if packed back to back
    inputs = InputStager(torch.device("cpu")).stage(batch)
    base = inputs.token_ids.data_ptr()
    expected = [batch.token_ids, batch.positions, batch.slot_mapping, batch.query_start_loc, batch.seq_lens,
                batch.req_rows, batch.sample_indices, batch.table_writes.rows, batch.table_writes.positions,
                batch.table_writes.slots]
    for view, values in zip(inputs, expected):
        assert view.dtype == torch.int32 and view.tolist() == list(values)
        assert (view.data_ptr() - base) % 16 == 0
