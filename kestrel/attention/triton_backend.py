"""Attention on GPUs through Triton kernels (`kestrel/kernels/`), CUDA-graph ready.

A step is one of two kinds:
- decode-only (one new token per request): split-K flash-decoding over the slot table
  (`decode_attention`), GQA-aware, with a fixed number of KV splits so nothing depends on host-side
  sequence lengths: the same launch is captured in a CUDA graph and replayed;
- anything else (prefills, chunked prefills, prefix-cache hits, decodes mixed in): the leading
  requests with one new token (the running decodes: the scheduler puts running requests first) go
  through `decode_attention` as above, the rest through one `extend_attention` launch, each request's
  new tokens attending causally over its cached prefix and themselves, all keys read from the cache
  through the slot table. (The extend kernel pads each one-token request to a tile of BLOCK_M rows:
  at 256 decodes beside a prompt chunk that wasted tile was most of a mixed step's attention time.)

Either way the new tokens' k/v are stored first (`store_kv`; slot -1 is padding and writes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kestrel.attention.backend import BatchLayout
from kestrel.kernels.decode_attention import decode_attention, decode_workspace_size
from kestrel.kernels.extend_attention import extend_attention
from kestrel.kernels.store_kv import store_kv

_MAX_KV_SPLITS = 16
"""Most splits of a decode request's keys (batch 1: 8 KV heads x 16 splits fill an H200)."""


def num_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per request so that about two programs per multiprocessor run: a power of two in [1, 16].

    Small batches need splits to fill the GPU; large ones fill it with (request, KV head) pairs alone,
    and every split more is partial results to write and merge (measured on an H200 at batch 64,
    16 splits: the merge kernel took 4% of the step and the partial kernel ran at 65% of bandwidth).
    """
    want = -(-2 * num_sms // max(1, batch_size * num_kv_heads))
    return max(1, min(_MAX_KV_SPLITS, 1 << (want - 1).bit_length()))


@dataclass(frozen=True, slots=True)
class TritonAttentionMeta:
    slot_mapping: torch.Tensor     # [T] int32; -1: padding
    slot_table: torch.Tensor       # [max_num_seqs, max_model_len] int32
    req_rows: torch.Tensor         # [R] int32
    seq_lens: torch.Tensor         # [R] int32
    query_start_loc: torch.Tensor  # [R + 1] int32 (extend only)
    max_query_len: int
    is_decode: bool
    num_kv_splits: int             # decode: splits of each request's keys
    num_decodes: int = 0           # mixed step: the first num_decodes requests (one token each) decode
    extend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """Mixed step: (req_rows, query_start_loc, seq_lens) of the requests after the decodes, 16-byte aligned
    copies (Triton specializes on pointer alignment; a view at an odd offset would compile a new variant)."""


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, max_model_len: int,
                 device: torch.device | str, max_num_seqs: int = 256) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sm_scale = head_dim ** -0.5
        self.device = torch.device(device)
        self.max_num_seqs = max_num_seqs
        size = decode_workspace_size(max_num_seqs, num_heads, head_dim, _MAX_KV_SPLITS)
        self._workspace = torch.empty(size, dtype=torch.float32, device=self.device)
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 132)

    def prepare(self, layout: BatchLayout) -> TritonAttentionMeta:
        if layout.is_decode_only:
            return TritonAttentionMeta(layout.slot_mapping, layout.slot_table, layout.req_rows, layout.seq_lens_t,
                                       layout.query_start_loc, 1, True,
                                       num_kv_splits(layout.num_reqs, self.num_kv_heads, self._num_sms))
        lens = layout.query_lens
        d = next((i for i, n in enumerate(lens) if n != 1), len(lens))  # leading decodes
        extend = tuple(t[d:].clone() if d else t for t in (layout.req_rows, layout.query_start_loc, layout.seq_lens_t))
        return TritonAttentionMeta(layout.slot_mapping, layout.slot_table, layout.req_rows, layout.seq_lens_t,
                                   layout.query_start_loc, max(lens[d:]), False,
                                   num_kv_splits(max(1, d), self.num_kv_heads, self._num_sms), d, extend)

    def forward(self, q, k, v, k_cache, v_cache, meta: TritonAttentionMeta) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KH, D], caches: [num_slots + 1, KH, D] -> [T, H, D]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.is_decode:
            return decode_attention(q, k_cache, v_cache, meta.slot_table, meta.req_rows, meta.seq_lens, out,
                                    self.sm_scale, meta.num_kv_splits, self._workspace)
        d = meta.num_decodes
        if d:  # the leading one-token requests: their tokens are the first d of the flat batch
            decode_attention(q[:d], k_cache, v_cache, meta.slot_table, meta.req_rows[:d], meta.seq_lens[:d], out[:d],
                             self.sm_scale, meta.num_kv_splits, self._workspace)
        req_rows, query_start_loc, seq_lens = meta.extend
        return extend_attention(q, k_cache, v_cache, meta.slot_table, req_rows, query_start_loc, seq_lens, out,
                                self.sm_scale, meta.max_query_len)

    def graph_metadata(self, max_batch_size: int, slot_table: torch.Tensor) -> TritonAttentionMeta:
        """Static decode buffers; padding rows have seq_len 0 (they attend nothing) and slot -1."""
        if max_batch_size > self.max_num_seqs:
            raise ValueError(f"graph batch size {max_batch_size} exceeds max_num_seqs {self.max_num_seqs}")
        b, dev = max_batch_size, self.device
        i32 = dict(dtype=torch.int32, device=dev)
        return TritonAttentionMeta(torch.full((b,), -1, **i32), slot_table, torch.zeros(b, **i32),
                                   torch.zeros(b, **i32), torch.arange(b + 1, **i32), 1, True,
                                   num_kv_splits(b, self.num_kv_heads, self._num_sms))

    def update_graph_metadata(self, meta: TritonAttentionMeta, layout: BatchLayout) -> None:
        if not layout.is_decode_only:
            raise ValueError("graph metadata describes decode steps (one token per request) only")
        if layout.slot_table.data_ptr() != meta.slot_table.data_ptr():
            raise ValueError("this step reads another slot table than the one the graphs were captured with")
        r = layout.num_reqs
        meta.slot_mapping[r:].fill_(-1)
        meta.slot_mapping[:r].copy_(layout.slot_mapping)
        meta.req_rows[r:].zero_()
        meta.req_rows[:r].copy_(layout.req_rows)
        meta.seq_lens[r:].zero_()
        meta.seq_lens[:r].copy_(layout.seq_lens_t)
