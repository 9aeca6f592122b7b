"""How big the worker's memory is: its device, the dtype it computes in, the KV pool, the context.

`auto` device is cuda when a GPU is visible, else cpu. `auto` dtype is float32 on CPU (exact
against transformers, batch-invariant) and the checkpoint's dtype on other devices (bfloat16 for
float32 checkpoints). The pool holds `num_kv_slots` tokens, or as many as `kv_cache_memory_gb`
allows, or (GPU, neither given) what `gpu_memory_utilization` of the device leaves after the
weights, the memory others hold and the peak of a profiled forward pass at the largest step. The
context length is capped at the pool size so a lone request always fits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from kestrel.config import EngineConfig, ModelConfig
from kestrel.kvcache.pool import KVPool

logger = logging.getLogger(__name__)

_CPU_KV_GB = 1.0
"""KV memory on CPU when nothing is said."""
_GPU_HEADROOM_BYTES = 512 * 2**20
"""Kept free on a GPU beyond the profiled peak: CUDA graphs' private pools, cuBLAS workspaces."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is visible")
    return device


def resolve_backend(name: str, device: torch.device) -> str:
    """auto: triton on CUDA, torch elsewhere. Triton on CPU only under TRITON_INTERPRET=1 (tests)."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention backend needs a CUDA device; use --attention-backend torch")
    return name


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if cfg.torch_dtype in ("float32", "float") else getattr(torch, cfg.torch_dtype)
    return getattr(torch, name)


def resolve_max_model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} is larger than the model's context "
                         f"length {cfg.max_position_embeddings}")
    return config.max_model_len or cfg.max_position_embeddings


def resolve_num_slots(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      profile: Callable[[], None]) -> int:
    """KV slots for the pool; `profile` runs the largest step once (GPU sizing only)."""
    if config.num_kv_slots is not None:
        return config.num_kv_slots
    per_slot = KVPool.bytes_per_slot(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    if config.kv_cache_memory_gb is not None or device.type != "cuda":
        return int((config.kv_cache_memory_gb or _CPU_KV_GB) * 2**30) // per_slot
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    budget = int(total * config.gpu_memory_utilization) - others - peak - _GPU_HEADROOM_BYTES
    if budget < per_slot:
        raise ValueError(f"no GPU memory is left for the KV cache: {total / 2**30:.1f} GiB x "
                         f"gpu_memory_utilization {config.gpu_memory_utilization} holds the weights and a "
                         f"{peak / 2**30:.1f} GiB forward peak; raise --gpu-memory-utilization or lower "
                         f"--max-num-batched-tokens")
    num_slots = budget // per_slot
    most_usable = config.max_num_seqs * resolve_max_model_len(config, cfg)  # every row full
    if num_slots > most_usable:
        num_slots = most_usable
        logger.info("KV pool capped at max_num_seqs x max_model_len = %d slots", most_usable)
    logger.info("KV pool: %d slots (%.1f GiB); weights + profiled peak %.1f GiB, others %.1f GiB, of %.1f GiB",
                num_slots, num_slots * per_slot / 2**30, peak / 2**30, others / 2**30, total / 2**30)
    return num_slots


def cap_max_model_len(max_len: int, num_slots: int) -> int:
    if num_slots < max_len:
        logger.warning("KV pool holds %d tokens, fewer than max_model_len %d: capping max_model_len",
                       num_slots, max_len)
        return num_slots
    return max_len
