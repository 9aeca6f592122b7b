"""How big the worker's memory is: the dtype it computes in, the KV pool and the context length.

`auto` dtype is float32 on CPU (exact against transformers, batch-invariant) and the checkpoint's
dtype on other devices (bfloat16 for float32 checkpoints). The pool holds `num_kv_slots` tokens, or
as many as `kv_cache_memory_gb` allows; the context length is capped at the pool size so a lone
request always fits.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from kestrel.config import EngineConfig, ModelConfig
from kestrel.kvcache.pool import KVPool

logger = logging.getLogger(__name__)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if cfg.torch_dtype in ("float32", "float") else getattr(torch, cfg.torch_dtype)
    return getattr(torch, name)


class Sizes(NamedTuple):
    max_model_len: int
    num_slots: int


def resolve_sizes(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype) -> Sizes:
    if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} is larger than the model's context "
                         f"length {cfg.max_position_embeddings}")
    max_len = config.max_model_len or cfg.max_position_embeddings
    num_slots = config.num_kv_slots
    if num_slots is None:
        per_slot = KVPool.bytes_per_slot(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        num_slots = int(config.kv_cache_memory_gb * 2**30) // per_slot
    if num_slots < max_len:
        logger.warning("KV pool holds %d tokens, fewer than max_model_len %d: capping max_model_len",
                       num_slots, max_len)
        max_len = num_slots
    return Sizes(max_len, num_slots)
