"""The Triton attention backend and fused layers inside the engine, against the torch reference path.

Without a GPU the kernels run on CPU under the Triton interpreter (slow: tiny model, few tokens);
with one, on the GPU. Greedy tokens must match the torch backend's exactly on a tiny fp32 Llama,
through chunked prefill, mixed prefill/decode steps and preemption.
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see test_triton_kernels.py)

import pytest  # noqa: E402

pytest.importorskip("triton")

from kestrel.config import EngineConfig  # noqa: E402
from kestrel.engine import Engine  # noqa: E402
from kestrel.sampling_params import SamplingParams  # noqa: E402

from engine_runs import run_tokens  # noqa: E402

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    return run_tokens(engine, prompts, params, check_integrity=True)


def test_triton_backend_gives_the_torch_backends_greedy_tokens(tiny_llama_dir):
    rng = random.Random(5)
    prompts = {f"r{i}": [rng.randrange(3, 128) for _ in range(n)] for i, n in enumerate([1, 9, 23, 4])}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    common = dict(model=tiny_llama_dir, show_progress=False, dtype="float32", device=_DEVICE,
                  max_num_batched_tokens=16, num_kv_slots=48, enforce_eager=True)
    reference = _run(Engine(EngineConfig(**common, attention_backend="torch")), prompts, greedy)
    engine = Engine(EngineConfig(**common, attention_backend="triton"))
    assert engine.executor.info.attention_backend == "triton"
    assert _run(engine, prompts, greedy) == reference
    assert engine.scheduler.num_preemptions > 0  # the 48-slot pool forced recompute through the kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_greedy_tokens(tiny_llama_dir):
    rng = random.Random(6)
    prompts = {f"r{i}": [rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))] for i in range(21)}
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(model=tiny_llama_dir, show_progress=False, dtype="float32", device="cuda", max_num_seqs=32)
    eager = _run(Engine(EngineConfig(**common, enforce_eager=True)), prompts, greedy)
    engine = Engine(EngineConfig(**common))
    assert engine.executor.worker.graphs is not None
    assert _run(engine, prompts, greedy) == eager


def test_mixed_step_sends_the_leading_decodes_to_the_decode_kernel():
    """A step of decodes, then a prompt chunk, then one more decode: the first three go through
    decode_attention, the rest through extend_attention; together they equal the reference attention."""
    from kernel_refs import make_kv_cache, make_req_to_token, ref_extend_attention, rel_err

    from kestrel.attention.backend import BatchLayout
    from kestrel.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, dim = 4, 2, 32
    query_lens, seq_lens = [1, 1, 1, 9, 1], [40, 7, 70, 20, 33]
    num_slots = sum(seq_lens) + 8
    k_cache, v_cache = (t.to(_DEVICE) for t in make_kv_cache(num_slots, kv_heads, dim, torch.float32, "cpu", gen))
    table, req_rows = make_req_to_token(seq_lens, num_slots, 80, _DEVICE, gen)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, heads, dim, generator=gen).to(_DEVICE)
    k, v = (torch.randn(num_tokens, kv_heads, dim, generator=gen).to(_DEVICE) for _ in range(2))
    slot_mapping = torch.cat([table[int(r), s - n:s] for r, s, n in zip(req_rows, seq_lens, query_lens)])
    i32 = dict(dtype=torch.int32, device=_DEVICE)
    q_start = torch.tensor([0, *query_lens], **i32).cumsum(0).to(torch.int32)
    layout = BatchLayout(query_lens, seq_lens, q_start, torch.tensor(seq_lens, **i32), req_rows, table,
                         slot_mapping.to(torch.int32))
    backend = TritonAttentionBackend(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, max_model_len=80,
                                     device=_DEVICE, max_num_seqs=8)
    meta = backend.prepare(layout)
    assert not meta.is_decode and meta.num_decodes == 3 and meta.max_query_len == 9
    out = backend.forward(q, k, v, k_cache, v_cache, meta)
    ref = ref_extend_attention(q, k_cache, v_cache, table, req_rows, q_start, layout.seq_lens_t, dim ** -0.5)
    assert rel_err(out, ref) < 1e-4
