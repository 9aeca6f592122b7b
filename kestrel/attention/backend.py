"""The attention backend interface and the per-step batch description it reads.

A step's batch is one flat ("nopad") token array: request r owns tokens
[query_start_loc[r], query_start_loc[r + 1]) whose positions are the last `query_len` of its
`seq_len` positions. Keys/values of every position live in the KV pool at
`slot_table[req_rows[r], position]`. A backend turns this into its own typed metadata once per step
(`prepare`), then `forward` is called per layer with that metadata.

Contract: `forward` first writes the new tokens' k/v into the cache at `slot_mapping` (a negative
slot is a padding token and writes nothing), then attends causally over all `seq_len` positions.

CUDA graphs replay a decode step (one token per request) captured once per batch-size bucket, so a
backend that supports them also implements `graph_metadata(max_batch_size, slot_table)` (metadata
whose tensors are static buffers, used while capturing; the slot table is the worker's, which
lives as long as the graphs) and `update_graph_metadata(meta, layout)` (writes a real step's
values into those buffers, in place, before a replay; rows past `layout.num_reqs` are padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Where each request's tokens sit in the flat batch and in the KV cache."""

    query_lens: list[int]
    """[R] tokens computed this step per request (host)."""
    seq_lens: list[int]
    """[R] positions with KV after this step, context + query (host)."""
    query_start_loc: torch.Tensor
    """[R + 1] int32 on the device: first flat token of each request, then T."""
    seq_lens_t: torch.Tensor
    """[R] int32 on the device: `seq_lens`."""
    req_rows: torch.Tensor
    """[R] int32 on the device: each request's row in the slot table."""
    slot_table: torch.Tensor
    """[max_num_seqs, max_model_len] int32 on the device: position -> slot."""
    slot_mapping: torch.Tensor
    """[T] int32 on the device: cache slot of each new token."""

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_reqs


MetaT = TypeVar("MetaT")


class AttentionBackend(Protocol, Generic[MetaT]):
    name: str

    def prepare(self, layout: BatchLayout) -> MetaT:
        """Build the backend's metadata for one step (shared by all layers)."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: MetaT) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KH, D], caches: [num_slots, KH, D] -> [T, H, D]."""
        ...

    def graph_metadata(self, max_batch_size: int, slot_table: torch.Tensor) -> MetaT:
        """Decode metadata for `max_batch_size` requests in static buffers (captured by a graph)."""
        ...

    def update_graph_metadata(self, meta: MetaT, layout: BatchLayout) -> None:
        """Write a decode step's values into `meta`'s static buffers (padding rows attend nothing)."""
        ...


@dataclass(frozen=True, slots=True)
class AttentionContext:
    """Everything a layer's attention needs for this step, passed down explicitly."""

    backend: AttentionBackend
    meta: object
    """The backend's own metadata type, from its `prepare`."""
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (k_cache, v_cache), each [num_slots, KH, D]."""
