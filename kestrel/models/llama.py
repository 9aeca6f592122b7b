"""Llama-family decoder: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, SmolLM,
TinyLlama, and Qwen2 (q/k/v bias). Read top to bottom like the paper.

Input is a flat batch of tokens (no padding); attention gets its per-step
metadata and KV caches through an explicit `AttentionContext`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kestrel.attention.backend import AttentionContext
from kestrel.config import ModelConfig
from kestrel.layers.activation import silu_and_mul
from kestrel.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kestrel.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kestrel.layers.norm import RMSNorm
from kestrel.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        num_tokens, num_heads, num_kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, num_heads + 2 * num_kv_heads, self.head_dim)
        qk = RotaryEmbedding.rotate(qkv[:, : num_heads + num_kv_heads], rope)  # q and k heads at once
        q, k = qk[:, :num_heads], qk[:, num_heads:]     # [T, H, D], [T, KH, D]
        v = qkv[:, num_heads + num_kv_heads:]          # [T, KH, D]
        k_cache, v_cache = ctx.kv_caches[self.layer_id]
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, rope, x, residual, ctx: AttentionContext):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling_dict)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.cos_sin(positions)  # shared by every layer
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = (
        (".q_proj", ".qkv_proj", "q"),
        (".k_proj", ".qkv_proj", "k"),
        (".v_proj", ".qkv_proj", "v"),
        (".gate_proj", ".gate_up_proj", 0),
        (".up_proj", ".gate_up_proj", 1),
    )

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, max_position)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
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
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            target, shard = name, None
            for ckpt_part, our_part, shard_id in self.stacked_params:
                if ckpt_part in name:
                    target, shard = name.replace(ckpt_part, our_part), shard_id
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                _copy_plain(param, tensor)
            elif shard is None:
                loader(param, tensor.to(param.dtype))
            else:
                loader(param, tensor.to(param.dtype), shard)
            loaded.add(f"{target}:{shard}")
        self._check_all_loaded(params, loaded)

    def _check_all_loaded(self, params: dict, loaded: set[str]) -> None:
        got = {key.split(":")[0] for key in loaded}
        missing = [n for n in params if n not in got and not (n == "lm_head.weight" and self.cfg.tie_word_embeddings)]
        for name in ("qkv_proj", "gate_up_proj"):
            shards = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("0", "1")}[name]
            for n in params:
                if name in n and n in got and any(f"{n}:{s}" not in loaded for s in shards):
                    missing.append(n)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}")


def _copy_plain(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(tensor)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: the Llama layout with q/k/v bias (ModelConfig.attention_bias)."""
