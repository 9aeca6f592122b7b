"""Decode attention straight over the slot table, written for torch.compile (the CPU decode path).

A decode step has one query per request. `decode_attention` reads each request's keys and values
from the KV pool through its slot indices, inside the reductions themselves: compiled by inductor,
the gather, q.k, the masked softmax and p.v become a few fused C++ loops that read each cached
key once, where the torch backend first copies every request's keys and values into a padded
tensor (index_select) and then runs SDPA over the copy. Eager it is correct but slow (it
materialises [R, L, KH, G, D] products): only `compiled_decode.py` runs it, compiled.

Maths in float32 whatever the cache dtype (as the torch backend does on CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kestrel.kernels import cpu_attention


class SlotDecodeMeta(NamedTuple):
    slot_mapping: torch.Tensor  # [R] int32: cache slot of each new token (-1: the spare slot)
    kv_index: torch.Tensor      # [R, L] int64 cache slots; columns past a row's length are masked
    mask: torch.Tensor          # [R, L] bool, True = attend (every row attends at least one key)


class SlotDecodeAttention:
    """The attention backend of compiled decode steps: store the new k/v, then attend.

    Attention is the C++ kernel `kernels/cpu_attention.py` where it builds (the graph calls it as an
    op: inductor's loops for `decode_attention` were 2-3x slower), else `decode_attention` compiled.
    """

    name = "slot-decode"

    def __init__(self) -> None:
        self.native = cpu_attention.load()

    def forward(self, q, k, v, k_cache, v_cache, meta: SlotDecodeMeta) -> torch.Tensor:
        # q: [R, H, D], k/v: [R, KH, D], caches: [num_slots, KH, D] -> [R, H, D]
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        if self.native:
            return cpu_attention.decode_attention(q, k_cache, v_cache, meta.kv_index, meta.mask)
        return decode_attention(q, k_cache, v_cache, meta.kv_index, meta.mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [R, H, D]; caches [N, KH, D]; kv_index, mask: [R, L] -> [R, H, D] (grouped-query aware)."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float().view(num_rows, 1, num_kv_heads, group, head_dim) * head_dim ** -0.5
    keys = k_cache[kv_index].float().unsqueeze(3)                       # [R, L, KH, 1, D]
    scores = (qf * keys).sum(-1)                                         # [R, L, KH, G]
    scores = scores.masked_fill(~mask.view(num_rows, -1, 1, 1), float("-inf"))
    probs = torch.softmax(scores, dim=1).unsqueeze(-1)                   # [R, L, KH, G, 1]
    values = v_cache[kv_index].float().unsqueeze(3)                     # [R, L, KH, 1, D]
    out = (probs * values).sum(1)                                        # [R, KH, G, D]
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype)
