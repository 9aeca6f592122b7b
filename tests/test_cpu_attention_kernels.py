"""The C++ CPU attention kernels on bf16 caches (decode: the AVX512-BF16 path where the CPU has it;
prefill: the flash kernel) against fp32 SDPA, and the prefill kernel behind the torch backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.attention.torch_backend import PrefillChunk, TorchAttentionBackend
from kestrel.kernels import cpu_attention, cpu_prefill_attention

pytestmark = pytest.mark.skipif(not cpu_attention.load(), reason="the C++ CPU kernels do not build here")


def _reference(q, k_cache, v_cache, kv_index):
    # fp32 SDPA over the gathered keys; query i sees keys j <= S - Q + i.  -> [Q, H, D] fp32
    n_q, s = q.shape[0], kv_index.numel()
    keys = k_cache[kv_index.long()].float().transpose(0, 1)[None]
    values = v_cache[kv_index.long()].float().transpose(0, 1)[None]
    mask = torch.arange(s).view(1, -1) <= (s - n_q + torch.arange(n_q)).view(-1, 1)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], keys, values, attn_mask=mask,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("n_q, s, heads, kv_heads, head_dim", [
    (1, 1, 9, 3, 64),      # one token
    (5, 5, 9, 3, 64),      # a partial query tile
    (130, 130, 9, 3, 64),  # several key blocks, causal
    (33, 300, 9, 3, 64),   # cached context, the last key block partial
    (7, 100, 4, 2, 128),   # head dim 128
    (70, 200, 8, 8, 128),  # no GQA
])
def test_prefill_kernel_matches_fp32_sdpa(n_q, s, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(n_q * 1000 + s)
    slots = s + 40
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=gen).bfloat16()
    q = (2 * torch.randn(n_q, heads, head_dim, generator=gen)).bfloat16()
    kv_index = torch.randperm(slots, generator=gen)[:s].int()  # scattered slots, as the pool hands them out
    out = cpu_prefill_attention.prefill_attention(q, k_cache, v_cache, kv_index)
    ref = _reference(q, k_cache, v_cache, kv_index)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    assert err.max().item() < 0.03 and err.mean().item() < 0.004  # bf16 rounding of weights and output


@pytest.mark.parametrize("seq_lens, heads, kv_heads, head_dim", [
    ([1], 9, 3, 64),               # one key
    ([37, 5, 16], 9, 3, 64),       # partial and whole 16-key blocks, padded rows
    ([300, 129], 32, 8, 128),      # head dim 128, GQA 4
    ([20, 3], 4, 4, 64),           # no GQA
    ([37, 5, 16, 1, 64, 20], 9, 3, 64),    # requests enough for one item per request (all KV heads)
    ([33, 7, 100, 2, 9], 32, 8, 128),       # the same, head dim 128
    ([9, 4], 16, 1, 64),           # one KV head, 16 query heads: the values in two passes of 8 heads
    ([5, 30, 2, 11], 12, 1, 128),  # 12 = 8 + 4 query heads a KV head, odd lengths (a last key alone)
])
def test_bf16_decode_kernel_matches_fp32_sdpa(seq_lens, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(sum(seq_lens))
    rows, width = len(seq_lens), max(seq_lens)
    slots = rows * width + 10
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=gen).bfloat16()
    q = (2 * torch.randn(rows, heads, head_dim, generator=gen)).bfloat16()
    kv_index = torch.randperm(slots, generator=gen)[:rows * width].view(rows, width).int()
    mask = torch.arange(width).view(1, -1) < torch.tensor(seq_lens).view(-1, 1)
    mask &= torch.rand(rows, width, generator=gen) < 0.8  # holes, as a masked-out key would leave
    mask[:, 0] = True
    out = cpu_attention.decode_attention(q, k_cache, v_cache, kv_index, mask)
    keys = k_cache[kv_index.long()].float().transpose(1, 2)    # [R, KH, L, D]
    values = v_cache[kv_index.long()].float().transpose(1, 2)
    ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask.view(rows, 1, 1, width),
                                         enable_gqa=kv_heads != heads)[:, :, 0]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    assert err.max().item() < 0.02 and err.mean().item() < 0.002


@pytest.mark.skipif(not cpu_prefill_attention.use(), reason="no AVX512-BF16, or AMX: the backend calls SDPA")
@pytest.mark.parametrize("context", [0, 45])
def test_torch_backend_prefill_takes_the_kernel_with_the_sdpa_result(context):
    heads, head_dim, n_q = 9, 64, 20
    q, k_cache, v_cache, chunk, _, backend = _prefill_case(context, heads, head_dim, n_q)
    assert backend.native_prefill
    fast = backend._prefill(q, k_cache, v_cache, chunk)
    backend.native_prefill = False
    slow = backend._prefill(q, k_cache, v_cache, chunk)
    assert fast.shape == slow.shape == (n_q, heads, head_dim)
    assert (fast.float() - slow.float()).abs().max().item() < 0.03


@pytest.mark.skipif(not cpu_prefill_attention.bf16_sdpa(), reason="no AMX: bf16 prefills take the C++ kernel")
@pytest.mark.parametrize("context", [0, 45])
def test_amx_prefill_runs_bf16_sdpa_with_the_fp32_result(context):
    """On AMX CPUs a bf16 prefill chunk calls torch's SDPA in bf16 (no kernel, no widening): fresh (causal)
    and after cached context (masked), within bf16 rounding of the fp32 result."""
    heads, head_dim, n_q = 9, 64, 20
    q, k_cache, v_cache, chunk, visible, backend = _prefill_case(context, heads, head_dim, n_q)
    assert not backend.native_prefill
    out = backend._prefill(q, k_cache, v_cache, chunk)
    kv_index = chunk.kv_index
    keys = k_cache[kv_index.long()].float().transpose(0, 1).unsqueeze(0)  # [1, KH, S, D]
    values = v_cache[kv_index.long()].float().transpose(0, 1).unsqueeze(0)
    ref = F.scaled_dot_product_attention(q[3:].float().transpose(0, 1).unsqueeze(0), keys, values, attn_mask=visible,
                                         enable_gqa=True)[0].transpose(0, 1)
    assert out.shape == (n_q, heads, head_dim) and out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    assert err.max().item() < 0.03 and err.mean().item() < 0.003


def _prefill_case(context: int, heads: int, head_dim: int, n_q: int, kv_heads: int = 3):
    """bf16 caches of 128 slots, a chunk of n_q tokens starting at token 3 over `context` cached keys, and a
    CPU torch backend: (q, k_cache, v_cache, chunk, visible [n_q, S] bool, backend)."""
    gen = torch.Generator().manual_seed(context)
    k_cache = torch.randn(128, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(128, kv_heads, head_dim, generator=gen).bfloat16()
    q = torch.randn(3 + n_q, heads, head_dim, generator=gen).bfloat16()  # the chunk starts at token 3
    s = context + n_q
    kv_index = torch.randperm(128, generator=gen)[:s].int()
    visible = torch.arange(s).view(1, -1) <= torch.arange(context, s).view(-1, 1)  # [n_q, s]
    chunk = PrefillChunk(3, n_q, kv_index, None if context == 0 else visible)
    backend = TorchAttentionBackend(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_model_len=256,
                                    device="cpu")
    return q, k_cache, v_cache, chunk, visible, backend


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("kestrel_lock_probe", verbose=False), "lock")
    open(lock, "w").close()
    cpu_attention._clear_stale_lock("kestrel_lock_probe")
    assert os.path.exists(lock)  # a build in progress: left alone
    old = time.time() - cpu_attention._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_attention._clear_stale_lock("kestrel_lock_probe")
    assert not os.path.exists(lock)  # torch's loader would have waited on it forever
