"""The attention backend interface and the per-step batch description it reads.

A step's batch is one flat ("nopad") token array: request r owns tokens
[query_start_loc[r], query_start_loc[r + 1]) whose positions are the last
`query_len` of its `seq_len` positions. Keys/values of every position live in
the KV pool at `req_to_token[row, position]`. A backend turns this into its
own metadata once per step (`prepare`), then `forward` is called per layer.

Contract: `forward` first writes the new tokens' k/v into the cache at
`slot_mapping`, then attends causally over all `seq_len` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Where each request's tokens sit in the flat batch and in the KV cache."""

    query_lens: list[int]
    """[R] tokens computed this step per request."""
    seq_lens: list[int]
    """[R] positions with KV after this step (context + query)."""
    req_rows: torch.Tensor
    """[R] int64: each request's row in req_to_token (on the device)."""
    req_to_token: torch.Tensor
    """[max_reqs, max_model_len] int64 table position -> slot (on the device)."""
    slot_mapping: torch.Tensor
    """[T] int64: cache slot of each new token (on the device)."""

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class AttentionBackend(Protocol):
    def prepare(self, layout: BatchLayout) -> object:
        """Build the backend's metadata for one step (shared by all layers)."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: object) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KH, D], caches: [num_slots, KH, D] -> [T, H, D]."""
        ...


@dataclass(frozen=True, slots=True)
class AttentionContext:
    """Everything a layer's attention needs for this step, passed down explicitly."""

    backend: AttentionBackend
    meta: object
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (k_cache, v_cache), each [num_slots, KH, D]."""
