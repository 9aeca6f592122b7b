"""Reference attention in plain torch (CPU and any device).

A step's requests split in two groups:
- decodes (one new token each) run as one batched SDPA call per layer over
  their keys gathered from the cache, padded to the longest and masked;
- prefill chunks (several new tokens) run one SDPA call each, on exactly their
  own queries and keys (causal, or masked when earlier chunks are cached).

So a serving step that mixes one 128-token prefill with 15 decodes costs one
[1, H, 128, S] and one [15, H, 1, L] attention, not a padded [16, H, 128, L]
one. On CPU, half-precision caches are read into float32 for the SDPA call:
torch's CPU SDPA in bf16 is ~5x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kestrel.attention.backend import BatchLayout

@dataclass(frozen=True, slots=True)
class DecodeGroup:
    token_index: torch.Tensor  # [Rd] int64: flat positions of the decode tokens
    kv_index: torch.Tensor     # [Rd, L] int64 cache slots, L the longest (padding -> masked)
    mask: torch.Tensor         # [Rd, 1, 1, L] bool, True = attend


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int                 # first flat token of the chunk
    num_tokens: int            # Q
    kv_index: torch.Tensor     # [S] int64 cache slots of all its positions
    mask: torch.Tensor | None  # [Q, S] bool when S > Q (context cached); None: plain causal


@dataclass(frozen=True, slots=True)
class TorchAttentionMeta:
    slot_mapping: torch.Tensor  # [T] int64
    decodes: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]


class TorchAttentionBackend:
    def prepare(self, layout: BatchLayout) -> TorchAttentionMeta:
        device = layout.slot_mapping.device
        table = layout.req_to_token
        decode_tokens, decode_reqs, prefills = [], [], []
        start = 0
        for r, (q, s) in enumerate(zip(layout.query_lens, layout.seq_lens)):
            if q == 1:
                decode_tokens.append(start)
                decode_reqs.append(r)
            else:
                kv_index = table[layout.req_rows[r], :s]
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

    @staticmethod
    def _decode_group(layout: BatchLayout, tokens: list[int], reqs: list[int],
                      device: torch.device) -> DecodeGroup:
        s_lens = [layout.seq_lens[r] for r in reqs]
        width = max(s_lens)
        kv_index = layout.req_to_token[layout.req_rows[reqs], :width]  # [Rd, L]
        s_len_t = torch.tensor(s_lens, device=device).view(-1, 1)
        mask = torch.arange(width, device=device).view(1, -1) < s_len_t  # [Rd, L]
        # Padding keys point at the row's first key's slot; the mask hides them.
        kv_index = torch.where(mask, kv_index, kv_index[:, :1])
        return DecodeGroup(torch.tensor(tokens, device=device), kv_index.contiguous(),
                           mask.view(len(reqs), 1, 1, width))

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchAttentionMeta) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KH, D], caches: [num_slots, KH, D] -> [T, H, D]
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        if meta.decodes is None and len(meta.prefills) == 1:
            return self._prefill(q, k_cache, v_cache, meta.prefills[0])
        out = torch.empty_like(q)
        for chunk in meta.prefills:
            out[chunk.start: chunk.start + chunk.num_tokens] = self._prefill(q, k_cache, v_cache, chunk)
        if meta.decodes is not None:
            out[meta.decodes.token_index] = self._decode(q, k_cache, v_cache, meta.decodes)
        return out

    @staticmethod
    def _prefill(q, k_cache, v_cache, chunk: PrefillChunk) -> torch.Tensor:
        q_c = q[chunk.start: chunk.start + chunk.num_tokens].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        keys = k_cache.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)     # [1, KH, S, D]
        values = v_cache.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)
        out = _sdpa(q_c, keys, values, chunk.mask, is_causal=chunk.mask is None)          # [1, H, Q, D]
        return out[0].transpose(0, 1)                                                     # [Q, H, D]

    @staticmethod
    def _decode(q, k_cache, v_cache, group: DecodeGroup) -> torch.Tensor:
        num_rows, width = group.kv_index.shape
        q_d = q.index_select(0, group.token_index)                                       # [Rd, H, D]
        flat = group.kv_index.view(-1)
        keys = k_cache.index_select(0, flat).view(num_rows, width, *k_cache.shape[1:]).transpose(1, 2)  # [R, KH, L, D]
        values = v_cache.index_select(0, flat).view(num_rows, width, *v_cache.shape[1:]).transpose(1, 2)
        out = _sdpa(q_d.unsqueeze(2), keys, values, group.mask, is_causal=False)         # [R, H, 1, D]
        return out[:, :, 0]                                                               # [Rd, H, D]


def _sdpa(q, keys, values, mask, is_causal: bool) -> torch.Tensor:
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        q, keys, values = q.float(), keys.float(), values.float()
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out.to(dtype)
