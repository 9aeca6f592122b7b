"""Checks the Triton launchers share: shapes, dtypes, strides and devices of their arguments.

Each raises ValueError naming the argument and what it must be; none reads a device value (no
host sync), so the launchers stay CUDA-graph capturable.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_index(name: str, t: torch.Tensor, n: int, what: str = "") -> None:
    """`t` is an [n] int32 (or int64) vector."""
    if t.shape != (n,) or t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be [{n}] int32 or int64{what}; got {tuple(t.shape)} {t.dtype}")


def check_one_device(kernel: str, *tensors: torch.Tensor) -> None:
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors of {kernel} must be on one device")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int, num_kv_heads: int | None = None) -> int:
    """Both `[num_slots, num_kv_heads, head_dim]`, contiguous; returns num_kv_heads."""
    heads = k_cache.shape[1] if k_cache.dim() == 3 else -1
    want = (num_kv_heads if num_kv_heads is not None else heads, head_dim)
    if k_cache.dim() != 3 or tuple(k_cache.shape[1:]) != want or v_cache.shape != k_cache.shape:
        kv = "num_kv_heads" if num_kv_heads is None else num_kv_heads
        raise ValueError(f"k_cache and v_cache must both be [num_slots, {kv}, {head_dim}]; got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    return heads


def check_last_dim_contiguous(names: str, *tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError(f"{names} need a contiguous last dim (stride 1); got strides "
                         f"{' and '.join(str(t.stride()) for t in tensors)}")


def check_one_dtype(names: str, *tensors: torch.Tensor) -> None:
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"{names} must share one dtype; got {', '.join(str(t.dtype) for t in tensors)}")


def check_attention(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    req_to_token: torch.Tensor, rows: str) -> tuple[int, int, int]:
    """q and out `[rows, num_heads, head_dim]`, the KV caches, the slot table; returns (H, KH, D)."""
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError(f"q and out must both be [{rows}, num_heads, head_dim]; got {tuple(q.shape)} "
                         f"and {tuple(out.shape)}")
    _, num_heads, head_dim = q.shape
    num_kv_heads = check_kv_cache(k_cache, v_cache, head_dim)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in [16, 256]; got {head_dim}")
    check_last_dim_contiguous("q and out", q, out)
    check_one_dtype("q, out, k_cache, v_cache", q, out, k_cache, v_cache)
    if req_to_token.dim() != 2 or req_to_token.stride(1) != 1 or req_to_token.dtype not in INDEX_DTYPES:
        raise ValueError("req_to_token must be a [max_num_seqs, max_model_len] int32 table with a contiguous last dim")
    return num_heads, num_kv_heads, head_dim
