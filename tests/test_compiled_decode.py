"""Compiled CPU decode steps (`--compile-decode`): same maths as the eager path, one compile.

- `decode_attention` (attention read through the slot table) agrees with the torch backend's
  gather + SDPA on a GQA layout with padded, masked rows.
- An engine with `compile_decode=True` gives the same greedy tokens as the eager engine (tiny
  random Llama and Qwen2: q/k/v bias) for batches of 1..5 requests of different lengths, with
  prefills, a lone request (padded to two rows) and preemption in the mix, and compiles once: no
  recompilation after start-up whatever the batch size or KV width.
"""

from __future__ import annotations

import random

import pytest
import torch

from kestrel.attention.slot_decode import SlotDecodeAttention, SlotDecodeMeta, decode_attention
from kestrel.attention.torch_backend import DecodeGroup, TorchAttentionBackend
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.kernels import cpu_bf16_gemm
from kestrel.worker.unguarded import UnguardedCalls
from engine_runs import run_staggered
from tests.conftest import make_tiny_hf_model


def test_slot_decode_attention_matches_gather_and_sdpa():
    gen = torch.Generator().manual_seed(0)
    num_slots, kh, h, d = 50, 2, 6, 16
    k_cache = torch.randn(num_slots, kh, d, generator=gen)
    v_cache = torch.randn(num_slots, kh, d, generator=gen)
    seq_lens = [7, 1, 12]
    width = max(seq_lens)
    kv_index = torch.randint(0, num_slots, (len(seq_lens), width), generator=gen)
    mask = torch.arange(width).view(1, -1) < torch.tensor(seq_lens).view(-1, 1)
    q = torch.randn(len(seq_lens), h, d, generator=gen)
    ours = decode_attention(q, k_cache, v_cache, kv_index, mask)
    group = DecodeGroup(torch.arange(len(seq_lens)), kv_index, mask.view(len(seq_lens), 1, 1, width))
    ref = TorchAttentionBackend._decode(q, k_cache, v_cache, group)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_slot_decode_backend_stores_the_new_keys_first():
    k_cache, v_cache = torch.zeros(5, 1, 4), torch.zeros(5, 1, 4)
    k, v = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    q = torch.randn(2, 2, 4)
    meta = SlotDecodeMeta(torch.tensor([3, -1], dtype=torch.int32), torch.tensor([[3, 3], [0, 0]]),
                          torch.tensor([[True, False], [True, False]]))
    out = SlotDecodeAttention().forward(q, k, v, k_cache, v_cache, meta)
    assert torch.equal(k_cache[3], k[0]) and torch.equal(v_cache[4], v[1])  # -1: the spare last slot
    torch.testing.assert_close(out[0], v[0].expand(2, 4))  # one key: the output is its value


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_decode_gives_the_eager_tokens_and_compiles_once(tmp_path, arch):
    path = str(tmp_path / arch)
    make_tiny_hf_model(path, arch)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))] for _ in range(5)]
    config = dict(model=path, show_progress=False, num_kv_slots=80, max_num_seqs=8)
    eager = run_staggered(Engine(EngineConfig(**config)), prompts, 24, solo_steps=3)
    torch._dynamo.reset()
    engine = Engine(EngineConfig(**config, compile_decode=True))
    runner = engine.executor.worker.compiled
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_staggered(engine, prompts, 24, solo_steps=3)
    assert compiled == eager
    assert engine.scheduler.num_preemptions > 0  # the small pool made requests recompute
    assert runner.num_runs > 0 and runner._calls.num_direct > 0  # warm steps ran dynamo's captured bytecode
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompilation


@pytest.mark.skipif(not cpu_bf16_gemm.use(), reason="needs the C++ kernels and AVX512-BF16")
def test_bf16_decode_graph_calls_the_small_matmul_kernel(tmp_path):
    path = str(tmp_path / "llama")
    make_tiny_hf_model(path, "llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    config = dict(model=path, show_progress=False, max_num_seqs=8, dtype="bfloat16")
    eager = run_staggered(Engine(EngineConfig(**config)), prompts, 16, solo_steps=3)
    torch._dynamo.reset()
    engine = Engine(EngineConfig(**config, compile_decode=True))
    runner = engine.executor.worker.compiled
    assert runner.small_bf16 and runner._graph_rows(min(6, runner.bf16_max_rows)) == "small"
    assert runner._graph_rows(runner.bf16_max_rows + 1) == "large"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_staggered(engine, prompts, 16, solo_steps=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    # bf16: fused loops round differently from eager ops, so a near-tie may flip; most tokens agree
    same = sum(a == b for e, c in zip(eager, compiled) for a, b in zip(e, c))
    assert same >= 0.9 * sum(len(e) for e in eager)


def test_warm_calls_skip_dynamo_and_an_unknown_key_takes_the_guarded_path():
    """`UnguardedCalls` runs a warm call on the bytecode captured for its key (dynamic sizes included);
    a key that compiled nothing goes through torch.compile's wrapper, with the same result."""
    calls = UnguardedCalls("test")
    scale = torch.compile(_scaled_sum, fullgraph=True)
    x = torch.randn(5, 3)
    torch._dynamo.mark_dynamic(x, 0)
    torch.testing.assert_close(calls(scale, x, 2.0, key="rows"), _scaled_sum(x, 2.0))
    calls.warm = True
    for rows in (2, 7, 11):  # other sizes of the dynamic dimension, new values
        y = torch.randn(rows, 3)
        torch.testing.assert_close(calls(scale, y, 2.0, key="rows"), _scaled_sum(y, 2.0))
    assert calls.num_direct == 3
    y = torch.randn(4, 3)
    torch.testing.assert_close(calls(scale, y, 2.0, key="other"), _scaled_sum(y, 2.0))
    assert calls.num_direct == 3  # no captured graph for "other": the wrapper ran it


def _scaled_sum(x, scale):
    return (x * scale).sum(-1) + x.shape[0]
