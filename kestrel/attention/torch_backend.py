"""Reference attention in plain torch (CPU and any device).

The flat batch is viewed as a padded grid [R, max_query_len] of queries
against [R, max_seq_len] keys gathered from the cache, with one boolean mask
for causality and padding, so a step costs one SDPA call per layer whatever
mix of prefills and decodes it holds. On CPU, half-precision caches are read
into float32 for the SDPA call: torch's CPU SDPA in bf16 is ~5x slower than
upcasting the gathered keys and values and running it in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kestrel.attention.backend import BatchLayout


@dataclass(frozen=True, slots=True)
class TorchAttentionMeta:
    slot_mapping: torch.Tensor   # [T] int64
    kv_index: torch.Tensor       # [R, L] int64 cache slots (padding -> a valid slot, masked)
    mask: torch.Tensor | None    # [R, 1, Q, L] bool, True = attend; None when is_causal suffices
    pad_index: torch.Tensor | None  # [T] int64: flat token -> row in the [R * Q] grid; None if no padding
    max_query_len: int


class TorchAttentionBackend:
    def prepare(self, layout: BatchLayout) -> TorchAttentionMeta:
        device = layout.slot_mapping.device
        q_lens, s_lens = layout.query_lens, layout.seq_lens
        num_reqs, max_q, max_s = len(q_lens), max(q_lens), max(s_lens)
        kv_index = layout.req_to_token[layout.req_rows, :max_s].contiguous()  # [R, L]
        if num_reqs == 1 and q_lens[0] == s_lens[0]:
            return TorchAttentionMeta(layout.slot_mapping, kv_index, None, None, max_q)
        q_len_t = torch.tensor(q_lens, device=device)
        s_len_t = torch.tensor(s_lens, device=device)
        ctx_len = (s_len_t - q_len_t).view(-1, 1, 1)                 # [R, 1, 1]
        qpos = torch.arange(max_q, device=device).view(1, -1, 1)      # [1, Q, 1]
        kpos = torch.arange(max_s, device=device).view(1, 1, -1)      # [1, 1, L]
        mask = (kpos <= ctx_len + qpos) & (kpos < s_len_t.view(-1, 1, 1))
        mask |= (qpos >= q_len_t.view(-1, 1, 1)) & (kpos == 0)        # padded queries see one key
        pad_index = None
        if any(q != max_q for q in q_lens):
            pad_index = torch.cat([torch.arange(q, device=device) + r * max_q for r, q in enumerate(q_lens)])
        return TorchAttentionMeta(layout.slot_mapping, kv_index, mask.unsqueeze(1), pad_index, max_q)

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchAttentionMeta) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        num_reqs, max_q = meta.kv_index.shape[0], meta.max_query_len
        if meta.pad_index is not None:
            q_grid = q.new_zeros(num_reqs * max_q, num_heads, head_dim)
            q_grid[meta.pad_index] = q
        else:
            q_grid = q
        q_grid = q_grid.view(num_reqs, max_q, num_heads, head_dim).transpose(1, 2)  # [R, H, Q, D]
        flat = meta.kv_index.view(-1)
        keys = k_cache.index_select(0, flat).view(num_reqs, -1, *k_cache.shape[1:]).transpose(1, 2)  # [R, KH, L, D]
        values = v_cache.index_select(0, flat).view(num_reqs, -1, *v_cache.shape[1:]).transpose(1, 2)
        if q.device.type == "cpu" and q.dtype != torch.float32:
            q_grid, keys, values = q_grid.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(
            q_grid, keys, values, attn_mask=meta.mask, is_causal=meta.mask is None,
            enable_gqa=keys.shape[1] != num_heads).to(q.dtype)
        out = out.transpose(1, 2).reshape(num_reqs * max_q, num_heads, head_dim)  # [R * Q, H, D]
        return out if meta.pad_index is None else out[meta.pad_index]
