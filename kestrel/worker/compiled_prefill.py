"""Compiled prefill and mixed steps on CPU: the parts between attention calls, torch.compile'd.

An eager prefill step of SmolLM2 spends a quarter of its time outside the matmuls and attention
(128 tokens, bf16, 2-core Zen 4: ~25 of ~105 ms): each layer's RMSNorms with their residual adds,
RoPE, the q/k/v split, SiLU-and-mul are a dozen separate passes over [T, hidden]-sized tensors,
each with its own dispatch and temporaries. Inductor fuses them into a few C++ loops around the
matmuls (oneDNN-packed weights, through `kestrel::packed_linear`). Attention stays eager: a mixed
step's attention depends on per-request query lengths (`TorchAttentionBackend`, with its C++
kernels), so, as the GPU's piecewise graphs do (`piecewise_graphs.py`), one graph runs everything
between two attention calls:

    layer 0 before attention (eager: input norm, qkv, RoPE)      -> q, k, v, residual
    attention 0 (eager, the torch backend)                       -> attn
    piece i (compiled): layer i-1 o_proj -> norm -> MLP -> layer i norm -> qkv -> RoPE -> q, k, v, residual
    ...
    layer L-1 after attention and the final norm (eager)         -> hidden

Every layer's piece shares one graph (the two layers' parameters are its inputs), and the token
count is a dynamic dimension: one compile (~20 s on 2 cores, cached on disk by inductor), done by
`warmup()` at start-up; guard evaluation is skipped from then on (`unguarded.py`). Steps of at least
`MIN_TOKENS` tokens that are not pure decodes take it (a decode step has its own runner,
`compiled_decode.py`, or runs eagerly). Fused loops reorder float arithmetic (~1 ulp), so the path
is opt-in (`--compile-prefill`) like `--compile-decode`.
"""

from __future__ import annotations

import logging
import time

import torch

from kestrel.attention import AttentionContext, BatchLayout
from kestrel.worker.unguarded import UnguardedCalls

logger = logging.getLogger(__name__)

MIN_TOKENS = 2
"""Fewest tokens a step must have (a 1-token size would be specialised: a second compile)."""


class CompiledPrefillRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._piece = torch.compile(_between_attention, fullgraph=True)
        self._calls = UnguardedCalls("prefill piece")
        self._layered = len(model.model.layers) > 1
        """The piece runs between two layers: a one-layer model has none."""
        self.num_runs = 0
        """Steps run with compiled pieces (for tests and logs)."""

    def can_run(self, layout: BatchLayout) -> bool:
        return self._layered and not layout.is_decode_only and layout.num_tokens >= MIN_TOKENS

    def warmup(self) -> float:
        """Compile the piece now, on zeros (it touches no KV); returns seconds."""
        start = time.perf_counter()
        decoder = self.model.model
        layer = decoder.layers[0]
        attn_cfg = layer.self_attn
        tokens = 16
        with torch.inference_mode():  # as the steps: tensors made outside would not match the guards
            x = decoder.embed_tokens(torch.zeros(tokens, dtype=torch.int32, device=self.device))
            rope = decoder.rotary.for_positions(torch.arange(tokens, dtype=torch.int32, device=self.device))
            attn = x.new_zeros(tokens, attn_cfg.num_heads, attn_cfg.head_dim)
            self._call(layer, decoder.layers[1], rope, attn, torch.zeros_like(x), mark=True)
        self._calls.warm = True
        elapsed = time.perf_counter() - start
        logger.info("compiled the CPU prefill piece in %.1f s", elapsed)
        return elapsed

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden states [T, hidden] (what `DecoderModel.forward` returns)."""
        self.num_runs += 1
        decoder = self.model.model
        layers = decoder.layers
        x = decoder.embed_tokens(token_ids)  # [T, hidden]
        rope = decoder.rotary.for_positions(positions)
        q, k, v, residual = layers[0].pre_attention(rope, x, None)
        last = len(layers) - 1
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, ctx.kv_caches, strict=True)):
            attn = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta)  # [T, H, D]
            if i < last:
                q, k, v, residual = self._call(layer, layers[i + 1], rope, attn, residual)
            else:
                x, residual = layer.post_attention(attn, residual)
        x, _ = decoder.norm(x, residual)
        return x

    def _call(self, layer, following, rope, attn, residual, mark: bool = False):
        if mark:  # the token count is dynamic: one graph for every step
            for t in (attn, residual, rope.positions, rope.cos, rope.sin):
                torch._dynamo.mark_dynamic(t, 0)
        return self._calls(self._piece, layer, following, rope, attn, residual)  # the piece is pure


def _between_attention(layer, following, rope, attn, residual):
    """Layer `layer` after its attention, then `following` up to its attention: (q, k, v, residual)."""
    x, residual = layer.post_attention(attn, residual)
    return following.pre_attention(rope, x, residual)
