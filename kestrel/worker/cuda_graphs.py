"""CUDA graphs for decode steps: captured once per batch-size bucket, padded, replayed.

A decode step (one new token per request, every request sampling) launches hundreds of small
kernels; replaying a captured graph removes the launch gaps. At start-up, for each bucket size b
(1, 2, 4, 8, then steps of 16 up to `max_num_seqs`), the model's forward and LM head are captured
over static input buffers and the attention backend's static graph metadata. A step of R
requests replays the smallest bucket >= R: inputs are copied into the static buffers, padding
rows get token 0, position 0, slot -1 (its KV write goes to the pool's spare slot) and seq_len 0
(it attends nothing), and the first R rows of the captured logits are the step's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kestrel.attention import AttentionBackend, AttentionContext, BatchLayout

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    meta: object
    logits: torch.Tensor  # [b, vocab] written by each replay


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches, slot_table: torch.Tensor,
                 max_batch_size: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.slot_table = slot_table
        self.max_batch_size = max_batch_size
        self.buckets = batch_buckets(max_batch_size)
        # Static inputs every graph reads; [max_batch_size] int32
        self.token_ids = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._pool = None

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool); returns seconds."""
        start = time.perf_counter()
        for b in reversed(self.buckets):
            meta = self.backend.graph_metadata(b, self.slot_table)
            ctx = AttentionContext(self.backend, meta, self.kv_caches)
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels, outside the graph
                self._forward(b, ctx)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(b, ctx)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[b] = _Captured(graph, meta, logits)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        logger.info("captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s",
                    len(self.buckets), self.max_batch_size, elapsed)
        return elapsed

    def can_run(self, layout: BatchLayout) -> bool:
        return layout.is_decode_only and layout.num_reqs <= self.max_batch_size and bool(self._graphs)

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Replay the decode step of `layout` (every request samples): logits [R, vocab]."""
        r = layout.num_reqs
        b = next(size for size in self.buckets if size >= r)
        captured = self._graphs[b]
        self.token_ids[:r].copy_(token_ids)
        self.positions[:r].copy_(positions)
        if b > r:
            self.token_ids[r:b].zero_()
            self.positions[r:b].zero_()
        self.backend.update_graph_metadata(captured.meta, layout)
        captured.graph.replay()
        return captured.logits[:r]

    def _forward(self, b: int, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.model(self.token_ids[:b], self.positions[:b], ctx)  # [b, hidden]
        return self.model.compute_logits(hidden)  # [b, vocab]
