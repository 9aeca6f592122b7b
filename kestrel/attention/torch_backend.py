"""Reference attention in plain torch (CPU and any device).

A step's requests split in two groups:
- decodes (one new token each) run as one batched SDPA call per layer over
  their keys gathered from the cache, padded to the longest and masked;
- prefill chunks (several new tokens) run one SDPA call each, on exactly their
  own queries and keys (causal, or masked when earlier chunks are cached).

So a serving step that mixes one 128-token prefill with 15 decodes costs one
[1, H, 128, S] and one [15, H, 1, L] attention, not a padded [16, H, 128, L]
one. On CPU, half-precision caches are read into float32 for the SDPA call:
torch's CPU SDPA in bf16 is ~5x slower. On CPU the decodes use the C++ kernel
`kernels/cpu_attention.py` where it builds (it reads the keys through the slot
indices, with no gathered copy: 2-3x faster than gather + SDPA at 1-16 requests),
the gather + SDPA path otherwise; bf16 prefill chunks use the flash kernel of
`kernels/cpu_prefill_attention.py` where the CPU has AVX512-BF16 (3x SDPA at 512 tokens), except on
CPUs with AMX, where torch's bf16 SDPA (AMX tiles, no widening to fp32) is 1-2.9x faster than it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kestrel.attention.backend import BatchLayout
from kestrel.kernels import cpu_attention, cpu_prefill_attention


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    token_index: torch.Tensor  # [Rd] int64: flat positions of the decode tokens
    kv_index: torch.Tensor     # [Rd, L] int32 cache slots, L the longest (padding -> masked)
    mask: torch.Tensor         # [Rd, 1, 1, L] bool, True = attend
    all_rows: bool = False     # the group is the whole batch (token_index = 0..T-1): no gather, no scatter


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int                 # first flat token of the chunk
    num_tokens: int            # Q
    kv_index: torch.Tensor     # [S] int32 cache slots of all its positions
    mask: torch.Tensor | None  # [Q, S] bool when S > Q (context cached); None: plain causal


@dataclass(frozen=True, slots=True)
class TorchAttentionMeta:
    slot_mapping: torch.Tensor  # [T] int32; -1 (padding) lands in the pool's spare last slot
    decodes: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]


class TorchAttentionBackend:
    """Reference backend: SDPA over keys gathered from the cache (see the module docstring)."""

    name = "torch"

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, max_model_len: int,
                 device: torch.device | str) -> None:
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.native_decode = self.device.type == "cpu" and cpu_attention.load()
        """Decodes run on the C++ CPU kernel (else gather + SDPA)."""
        self.native_prefill = (self.device.type == "cpu" and head_dim in cpu_prefill_attention.HEAD_DIMS
                               and cpu_prefill_attention.use())
        """bf16 prefills run on the C++ flash kernel where the CPU has AVX512-BF16 (else SDPA in fp32)."""

    def prepare(self, layout: BatchLayout) -> TorchAttentionMeta:
        device = layout.slot_mapping.device
        decode_tokens, decode_reqs, prefills = [], [], []
        start = 0
        for r, (q, s) in enumerate(zip(layout.query_lens, layout.seq_lens)):
            if q == 1:
                decode_tokens.append(start)
                decode_reqs.append(r)
            else:
                kv_index = layout.slot_table[layout.req_rows[r], :s]
                mask = None
                if s > q:
                    qpos = torch.arange(s - q, s, device=device).view(-1, 1)
                    mask = torch.arange(s, device=device).view(1, -1) <= qpos  # [Q, S]
                prefills.append(PrefillChunk(start, q, kv_index, mask))
            start += q
        decodes = None
        if decode_reqs:
            decodes = self._decode_group(layout, decode_tokens, decode_reqs, device)
        return TorchAttentionMeta(layout.slot_mapping, decodes, tuple(prefills))

    def graph_metadata(self, max_batch_size: int, slot_table: torch.Tensor) -> TorchAttentionMeta:
        """Static decode buffers as wide as the context (slow, but shape-stable for graph capture)."""
        b, width, dev = max_batch_size, self.max_model_len, self.device
        group = DecodeGroup(torch.arange(b, device=dev),
                            torch.zeros(b, width, dtype=torch.int32, device=dev),
                            torch.zeros(b, 1, 1, width, dtype=torch.bool, device=dev))
        group.mask[:, ..., 0] = True  # a padding row attends one key, so its softmax stays finite
        return TorchAttentionMeta(torch.full((b,), -1, dtype=torch.int32, device=dev), group, ())

    def update_graph_metadata(self, meta: TorchAttentionMeta, layout: BatchLayout) -> None:
        if not layout.is_decode_only:
            raise ValueError("graph metadata describes decode steps (one token per request) only")
        group, r = meta.decodes, layout.num_reqs
        meta.slot_mapping.fill_(-1)
        meta.slot_mapping[:r].copy_(layout.slot_mapping)
        group.kv_index.zero_()
        group.kv_index[:r].copy_(layout.slot_table.index_select(0, layout.req_rows))
        positions = torch.arange(self.max_model_len, device=self.device).view(1, -1)
        group.mask.zero_()
        group.mask[:, ..., 0] = True
        group.mask[:r].copy_((positions < layout.seq_lens_t.view(-1, 1)).view(r, 1, 1, -1))

    @staticmethod
    def _decode_group(layout: BatchLayout, tokens: list[int], reqs: list[int],
                      device: torch.device) -> DecodeGroup:
        s_lens = [layout.seq_lens[r] for r in reqs]
        width = max(s_lens)
        rows = layout.req_rows[reqs] if len(reqs) < layout.num_reqs else layout.req_rows
        kv_index = layout.slot_table.index_select(0, rows)[:, :width]  # [Rd, L]
        s_len_t = torch.tensor(s_lens, device=device).view(-1, 1)
        mask = torch.arange(width, device=device).view(1, -1) < s_len_t  # [Rd, L]
        # Padding keys point at the row's first key's slot; the mask hides them.
        kv_index = torch.where(mask, kv_index, kv_index[:, :1])
        return DecodeGroup(torch.tensor(tokens, device=device), kv_index.contiguous(),
                           mask.view(len(reqs), 1, 1, width), all_rows=len(tokens) == layout.num_tokens)

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchAttentionMeta) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KH, D], caches: [num_slots, KH, D] -> [T, H, D]
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        if meta.decodes is None and len(meta.prefills) == 1:
            return self._prefill(q, k_cache, v_cache, meta.prefills[0])
        decode = self._native_decode if self.native_decode else self._decode
        if not meta.prefills and meta.decodes.all_rows:  # decode only: every token is a decode, in order
            return decode(q, k_cache, v_cache, meta.decodes)
        out = torch.empty_like(q)
        for chunk in meta.prefills:
            out[chunk.start: chunk.start + chunk.num_tokens] = self._prefill(q, k_cache, v_cache, chunk)
        if meta.decodes is not None:
            out[meta.decodes.token_index] = decode(q, k_cache, v_cache, meta.decodes)
        return out

    def _prefill(self, q, k_cache, v_cache, chunk: PrefillChunk) -> torch.Tensor:
        if self.native_prefill and q.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16:
            return cpu_prefill_attention.prefill_attention(q[chunk.start: chunk.start + chunk.num_tokens],
                                                           k_cache, v_cache, chunk.kv_index)  # [Q, H, D]
        q_c = q[chunk.start: chunk.start + chunk.num_tokens].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        keys = k_cache.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)     # [1, KH, S, D]
        values = v_cache.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)
        num_q, heads, kv_heads = chunk.num_tokens, q.shape[1], k_cache.shape[1]
        if chunk.mask is not None and heads != kv_heads:
            # Context cached: each KV head's G query heads as one head of G x Q rows, so SDPA reads its keys
            # once (same maths per row; 101 queries over 1288 keys, 9 heads on 3, bf16 on AMX: 1.08 -> 0.90 ms)
            g = heads // kv_heads
            folded = q_c.reshape(1, kv_heads, g * num_q, q.shape[2])                       # [1, KH, G*Q, D]
            out = _sdpa(folded, keys, values, chunk.mask.repeat(g, 1), is_causal=False)
            return out.reshape(heads, num_q, q.shape[2]).transpose(0, 1).contiguous()     # [Q, H, D]
        out = _sdpa(q_c, keys, values, chunk.mask, is_causal=chunk.mask is None)          # [1, H, Q, D]
        return out[0].transpose(0, 1)                                                     # [Q, H, D]

    @staticmethod
    def _decode(q, k_cache, v_cache, group: DecodeGroup) -> torch.Tensor:
        num_rows, width = group.kv_index.shape
        q_d = q if group.all_rows else q.index_select(0, group.token_index)              # [Rd, H, D]
        flat = group.kv_index.view(-1)
        keys = k_cache.index_select(0, flat).view(num_rows, width, *k_cache.shape[1:]).transpose(1, 2)  # [R, KH, L, D]
        values = v_cache.index_select(0, flat).view(num_rows, width, *v_cache.shape[1:]).transpose(1, 2)
        out = _sdpa(q_d.unsqueeze(2), keys, values, group.mask, is_causal=False)         # [R, H, 1, D]
        return out[:, :, 0]                                                               # [Rd, H, D]

    @staticmethod
    def _native_decode(q, k_cache, v_cache, group: DecodeGroup) -> torch.Tensor:
        q_d = q if group.all_rows else q.index_select(0, group.token_index)              # [Rd, H, D]
        return cpu_attention.decode_attention(q_d, k_cache, v_cache, group.kv_index, group.mask)  # [Rd, H, D]


def _sdpa(q, keys, values, mask, is_causal: bool) -> torch.Tensor:
    dtype = q.dtype
    fast_here = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_prefill_attention.bf16_sdpa())
    if q.device.type == "cpu" and not fast_here:  # torch's CPU SDPA is slow in half precision without AMX
        q, keys, values = q.float(), keys.float(), values.float()
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out.to(dtype)
