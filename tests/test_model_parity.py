"""Logits parity with Hugging Face transformers on tiny random models (fp32).

Runs Kestrel's model on a flat batch of several prompts of different lengths
(and in chunks), as the engine does, and compares every position's logits.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from kestrel.attention import AttentionContext, BatchLayout, create_backend
from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.pool import KVPool
from kestrel.kernels.cpu_linear import packing_supported
from kestrel.models.loader import build_model, load_model_config, pack_weights
from kestrel.worker.slot_table import SlotTable
from tests.conftest import make_tiny_hf_model

TOL = 1e-3


class TinyRunner:
    """Runs Kestrel's model over chunks of several requests, returning all positions' logits."""

    def __init__(self, path: str, packed: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = load_model_config(path)
        self.model = build_model(path, self.cfg, dtype, "cpu", max_position=256, show_progress=False)
        if packed:
            # every linear layer (4 per decoder layer) and the LM head
            assert pack_weights(self.model) == 4 * self.cfg.num_layers + 1
        self.pool = KVPool(self.cfg.num_layers, 4096, self.cfg.num_kv_heads, self.cfg.head_dim, dtype, "cpu")
        self.kv = KVCacheManager(4096, 8, 256)
        self.table = SlotTable(8, 256, torch.device("cpu"))
        self.backend = create_backend("torch", num_heads=self.cfg.num_heads, num_kv_heads=self.cfg.num_kv_heads,
                                      head_dim=self.cfg.head_dim, max_model_len=256, device="cpu")

    @torch.inference_mode()
    def run(self, chunks: list[tuple[str, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (request id, new token ids, start position) -> logits per chunk [n, vocab]."""
        ids, pos, slots, rows, q_lens, s_lens = [], [], [], [], [], []
        for rid, toks, start in chunks:
            assert self.kv.allocate(rid, len(toks))
            ids += toks
            pos += list(range(start, start + len(toks)))
            slots += self.kv.slots_of(rid)[start:start + len(toks)]
            rows.append(self.kv.row_of(rid))
            q_lens.append(len(toks))
            s_lens.append(start + len(toks))
        w = self.kv.take_table_writes()
        self.table.write(*(torch.tensor(x, dtype=torch.int32) for x in (w.rows, w.positions, w.slots)))
        as_i32 = functools.partial(torch.tensor, dtype=torch.int32)
        layout = BatchLayout(q_lens, s_lens, as_i32([0, *itertools.accumulate(q_lens)]), as_i32(s_lens), as_i32(rows),
                             self.table.table, as_i32(slots))
        ctx = AttentionContext(self.backend, self.backend.prepare(layout), self.pool.layers())
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), ctx)
        logits = self.model.compute_logits(hidden).float()
        return list(logits.split(q_lens))


def _hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def _prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
               "rope_theta": 500000.0}),
    ("qwen2", {}),
])
@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_logits_match_transformers(tmp_path, arch, overrides, packed):
    if packed and not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN")
    hf = make_tiny_hf_model(str(tmp_path), arch, **overrides)
    runner = TinyRunner(str(tmp_path), packed=packed)
    prompts = _prompts(1, [37, 5, 64, 1], runner.cfg.vocab_size)
    # One flat batch of four requests (nopad), whole prompts.
    ours = runner.run([(f"r{i}", p, 0) for i, p in enumerate(prompts)])
    for p, got in zip(prompts, ours):
        ref = _hf_logits(hf, p)
        assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_chunked_prefill_and_decode_match_full_forward(tmp_path, packed):
    if packed and not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN")
    hf = make_tiny_hf_model(str(tmp_path), "llama")
    runner = TinyRunner(str(tmp_path), packed=packed)
    a, b = _prompts(2, [50, 30], runner.cfg.vocab_size)
    # Step 1: first chunk of a, all of b but its last token. Step 2: rest of a with b's last (decode-like).
    first = runner.run([("a", a[:20], 0), ("b", b[:-1], 0)])
    second = runner.run([("a", a[20:], 20), ("b", b[-1:], len(b) - 1)])
    ref_a, ref_b = _hf_logits(hf, a), _hf_logits(hf, b)
    assert (torch.cat([first[0], second[0]]) - ref_a).abs().max().item() <= TOL
    assert (torch.cat([first[1], second[1]]) - ref_b).abs().max().item() <= TOL


def test_qwen2_has_qkv_bias(tmp_path):
    make_tiny_hf_model(str(tmp_path), "qwen2")
    cfg = load_model_config(str(tmp_path))
    assert cfg.attention_bias
    model = build_model(str(tmp_path), cfg, torch.float32, "cpu", max_position=64, show_progress=False)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_bfloat16_stays_close_to_float32(tmp_path, packed):
    """bf16 weights and KV (attention upcast to fp32 on CPU), whole prompts then decode steps."""
    if packed and not packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 on this CPU")
    hf = make_tiny_hf_model(str(tmp_path), "qwen2")
    runner = TinyRunner(str(tmp_path), packed=packed, dtype=torch.bfloat16)
    a, b = _prompts(3, [40, 12], runner.cfg.vocab_size)
    first = runner.run([("a", a[:-1], 0), ("b", b[:-1], 0)])
    second = runner.run([("a", a[-1:], len(a) - 1), ("b", b[-1:], len(b) - 1)])
    for got, ref in ((torch.cat([first[0], second[0]]), _hf_logits(hf, a)),
                     (torch.cat([first[1], second[1]]), _hf_logits(hf, b))):
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 0.05 * scale
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
