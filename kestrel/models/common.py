"""Blocks shared by decoder-only architectures, so each architecture is a short file of its own.

- `RotaryAttention`: fused qkv projection and RoPE on q and k (`project`), output projection (`output`);
  the attention backend runs between the two (`DecoderLayer`).
- `GatedMLP`: gate_up projection, SiLU-and-mul, down projection (Llama, Qwen2, Mistral, ...).
- `DecoderLayer`: pre-norm attention and MLP with the residual carried through fused RMSNorms.
- `DecoderModel`: embedding, RoPE tables, the layers, the final norm.
- `CausalLM`: a `DecoderModel` plus the LM head (tied or not) and name-mapped weight loading.

Input is a flat batch of tokens (no padding); attention gets its per-step metadata and KV caches
through an explicit `AttentionContext`. Every parallel layer is built for the `TPGroup` it is given;
`use_triton` swaps RMSNorm, RoPE and SiLU-and-mul for their fused Triton kernels (the GPU path).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kestrel.attention.backend import AttentionContext
from kestrel.config import ModelConfig
from kestrel.distributed.parallel_state import SINGLE_RANK, TPGroup
from kestrel.layers.activation import silu_and_mul
from kestrel.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kestrel.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kestrel.layers.norm import RMSNorm
from kestrel.layers.rotary import Rope, RotaryEmbedding
from kestrel.models.weights import StackedParam, load_named_int4, load_named_weights


class RotaryAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, tp=tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp=tp)

    def project(self, rope: Rope, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q [T, H, D], k [T, KH, D] (rotated), v [T, KH, D]."""
        num_tokens, num_heads, num_kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, num_heads + 2 * num_kv_heads, self.head_dim)
        q, k = rope.rotate(qkv[:, : num_heads + num_kv_heads], num_heads)  # [T, H, D], [T, KH, D]
        return q, k, qkv[:, num_heads + num_kv_heads:]

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [T, H, D] -> [T, hidden]."""
        return self.o_proj(attn.reshape(attn.shape[0], self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, use_triton: bool) -> None:
        super().__init__()
        self.use_triton = use_triton
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.use_triton))  # [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup, use_triton: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_triton)
        self.self_attn = RotaryAttention(cfg, layer_id, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_triton)
        self.mlp = GatedMLP(cfg, tp, use_triton)

    def forward(self, rope, x, residual, ctx: AttentionContext, kv_cache):
        """kv_cache: this layer's (k_cache, v_cache) (the layer never indexes the context by its id, so
        one compiled layer serves all of them: see worker/compiled_decode.py)."""
        q, k, v, residual = self.pre_attention(rope, x, residual)
        k_cache, v_cache = kv_cache  # this layer's, [num_slots, KH, D] each
        return self.post_attention(ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta), residual)

    def pre_attention(self, rope, x, residual):
        """Everything before attention: (q, k, v, residual). Split out so that mixed steps can run the
        parts between attention calls as CUDA graphs (worker/piecewise_graphs.py)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.project(rope, x)
        return q, k, v, residual

    def post_attention(self, attn, residual):
        """attn [T, H, D] -> (the layer's output, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.output(attn), residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, tp: TPGroup, use_triton: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling_dict, use_triton)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, use_triton) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_triton)

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.for_positions(positions)  # shared by every layer
        residual = None
        for layer, kv_cache in zip(self.layers, ctx.kv_caches, strict=True):
            x, residual = layer(rope, x, residual, ctx, kv_cache)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A decoder with an LM head. Subclasses name their checkpoint layout in `stacked_params`."""

    stacked_params: tuple[StackedParam, ...] = ()
    """Checkpoint name fragments merged into one of our parameters (q/k/v -> qkv_proj, ...)."""
    config_defaults: dict = {}
    """ModelConfig fields this architecture implies when config.json does not say (e.g. q/k/v bias)."""

    def __init__(self, cfg: ModelConfig, max_position: int, tp: TPGroup = SINGLE_RANK,
                 use_triton: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg, max_position, tp, use_triton)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, hidden] -> logits [R, vocab]."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors; raise ValueError if any parameter is left unset."""
        skip = {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()
        load_named_weights(self, weights, self.stacked_params, skip)

    def load_int4_weights(self, weights: Iterable[tuple[str, object]]) -> int:
        """Take a checkpoint's own int4 codes (HF names, `Int4Weight`s) for the layers they fill.

        A tied LM head takes the embedding's. Returns how many tensors were taken.
        """
        def rename(items):
            for name, weight in items:
                if name == "model.embed_tokens.weight":
                    if not self.cfg.tie_word_embeddings:
                        continue  # the lookup table stays float
                    name = "lm_head.weight"
                elif name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                    continue
                yield name, weight
        return load_named_int4(self, rename(weights), self.stacked_params)
