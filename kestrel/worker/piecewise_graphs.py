"""CUDA graphs for mixed steps (prefill chunks + decodes): captured piecewise, between attention calls.

A decode-only step replays one whole-model graph (`cuda_graphs.py`). A mixed step cannot: its
attention depends on per-request query lengths that change every step. Launched eagerly, its ~450
kernels and ~1,300 small torch ops cost more host time than the GPU needs to run them (H200, Llama-3.1-8B
shape, 240 decodes + one 256-token prompt: 19.5 ms of wall time per step for 14.6 ms of device time;
`benchmarks/gpu/gpu_profile.py --cases mixed`). So, as vLLM's piecewise graphs do, everything between
two attention calls is one graph, per token-count bucket:

    piece 0:       embed -> layer 0 input norm -> qkv projection -> RoPE        -> q, k, v (static)
    attention 0:   eager, on the first T rows of q, k, v             -> attn (static)
    piece i:       layer i-1 o_proj -> norm -> MLP -> layer i norm -> qkv -> RoPE  -> q, k, v
    ...
    piece L:       layer L-1 o_proj -> norm -> MLP -> final norm    -> hidden (static)

A step of T tokens replays the smallest bucket b >= T (multiples of 64 up to `max_tokens`): token
ids and positions are copied into static buffers, rows T..b are padding (token 0, position 0), which
the row-wise pieces compute and nothing reads; attention sees only the first T rows, so padding
writes no KV. The worker captures every bucket at start-up (`capture`); a bucket missing then is
captured the first time a step needs it. The capture function is injectable: tests on a CPU use an
eager stand-in with the same fixed-output-buffer semantics as a graph replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kestrel.attention import AttentionContext, BatchLayout

logger = logging.getLogger(__name__)

BUCKET = 64
"""Token-count granularity of the buckets."""

Outputs = tuple[torch.Tensor, ...]
Capture = Callable[[Callable[[], Outputs], object], tuple[Callable[[], None], Outputs, object]]
"""capture(piece, pool) -> (replay, the piece's outputs in fixed memory, pool to share)."""


def cuda_capture(piece: Callable[[], Outputs], pool) -> tuple[Callable[[], None], Outputs, object]:
    piece()  # warm up outside the graph: Triton compiles, cuBLAS picks its kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = piece()
    return graph.replay, outputs, graph.pool()


def eager_capture(piece: Callable[[], Outputs], pool) -> tuple[Callable[[], None], Outputs, object]:
    """A stand-in for `cuda_capture` on any device: replaying re-runs the piece into the same outputs."""
    outputs = piece()

    def replay() -> None:
        for dst, src in zip(outputs, piece(), strict=True):
            dst.copy_(src)
    return replay, outputs, pool


@dataclass(slots=True)
class _Bucket:
    token_ids: torch.Tensor          # [b] int32, static
    positions: torch.Tensor          # [b] int32, static
    attn: torch.Tensor               # [b, H, D], static: the attention output the next piece reads
    replays: list[Callable[[], None]]
    qkv: list[Outputs]               # per layer: (q [b, H, D], k [b, KH, D], v [b, KH, D]) written by piece i
    hidden: torch.Tensor             # [b, hidden] written by the last piece


class PiecewiseGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, max_tokens: int, device: torch.device,
                 capture: Capture = cuda_capture) -> None:
        decoder = model.model  # CausalLM -> DecoderModel
        self.embed, self.rotary, self.layers, self.norm = (decoder.embed_tokens, decoder.rotary,
                                                           list(decoder.layers), decoder.norm)
        attn = self.layers[0].self_attn
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.kv_caches = kv_caches
        self.max_tokens = max_tokens
        self.device = device
        self._capture = capture
        self._pool = None
        self._buckets: dict[int, _Bucket] = {}
        self._dtype = next(model.parameters()).dtype

    def capture(self) -> float:
        """Capture every bucket now (start-up), smallest first; returns seconds."""
        start = time.perf_counter()
        for size in range(BUCKET, self.max_tokens + 1, BUCKET):
            if size not in self._buckets:
                self._capture_bucket(size)
        elapsed = time.perf_counter() - start
        logger.info("captured piecewise CUDA graphs for mixed steps of up to %d tokens (%d buckets) in %.1f s",
                    self.max_tokens, len(self._buckets), elapsed)
        return elapsed

    def can_run(self, layout: BatchLayout) -> bool:
        return not layout.is_decode_only and 0 < layout.num_tokens <= self.max_tokens

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden states [T, hidden] (a view of a static buffer)."""
        t = token_ids.shape[0]
        size = -(-t // BUCKET) * BUCKET
        bucket = self._buckets.get(size) or self._capture_bucket(size)
        bucket.token_ids[:t].copy_(token_ids)
        bucket.positions[:t].copy_(positions)
        if size > t:
            bucket.token_ids[t:].zero_()
            bucket.positions[t:].zero_()
        for i, replay in enumerate(bucket.replays):
            replay()
            if i < len(self.layers):
                q, k, v = bucket.qkv[i]
                k_cache, v_cache = self.kv_caches[i]
                bucket.attn[:t].copy_(ctx.backend.forward(q[:t], k[:t], v[:t], k_cache, v_cache, ctx.meta))
        return bucket.hidden[:t]

    def _capture_bucket(self, size: int) -> _Bucket:
        start = time.perf_counter()
        i32 = dict(dtype=torch.int32, device=self.device)
        token_ids, positions = torch.zeros(size, **i32), torch.zeros(size, **i32)
        attn = torch.zeros(size, self.num_heads, self.head_dim, dtype=self._dtype, device=self.device)
        replays: list[Callable[[], None]] = []
        qkv: list[Outputs] = []
        residual: torch.Tensor | None = None
        hidden = None
        for i in range(len(self.layers) + 1):
            piece = self._piece(i, token_ids, positions, attn, residual)
            replay, outputs, self._pool = self._capture(piece, self._pool)
            replays.append(replay)
            if i < len(self.layers):
                *q_k_v, residual = outputs
                qkv.append(tuple(q_k_v))
            else:
                hidden = outputs[0]
        logger.debug("captured the %d pieces of a %d-token mixed step in %.2f s", len(replays), size,
                     time.perf_counter() - start)
        bucket = self._buckets[size] = _Bucket(token_ids, positions, attn, replays, qkv, hidden)
        return bucket

    def _piece(self, i: int, token_ids, positions, attn, residual) -> Callable[[], Outputs]:
        """The work between attention i - 1 and attention i (i == num_layers: up to the final norm)."""
        layers = self.layers

        def piece() -> Outputs:
            rope = self.rotary.for_positions(positions)
            if i == 0:
                x, res = self.embed(token_ids), None  # [b, hidden]
            else:
                x, res = layers[i - 1].post_attention(attn, residual)
            if i == len(layers):
                return (self.norm(x, res)[0],)
            return layers[i].pre_attention(rope, x, res)  # q, k, v, residual
        return piece
