"""Write a step's new keys and values into one layer's KV cache (Triton).

Inputs: k, v `[num_tokens, num_kv_heads, head_dim]`, possibly strided views into a
fused qkv buffer, and `slot_mapping [num_tokens]` (the cache slot of each token).
Output: `k_cache[slot_mapping[t]] = k[t]` and the same for v, in place. A negative
slot marks a padding token (CUDA-graph padding uses -1): nothing is written for it.

One program per token copies all of its heads, for k and for v.
"""

from __future__ import annotations

import torch

from kestrel.kernels.launch_checks import (check_index, check_kv_cache, check_last_dim_contiguous, check_one_device,
                                           check_one_dtype)
from kestrel.kernels.triton_compat import tl, triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]

    k = tl.load(k_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache[slot_mapping[t]] = k[t], v_cache[slot_mapping[t]] = v[t] for every t whose slot is >= 0.

    k, v: [num_tokens, num_kv_heads, head_dim], last dim contiguous (any token and head strides).
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], contiguous, same dtype as k and v.
    slot_mapping: [num_tokens] int32 or int64; slots must be < num_slots (not checked: no host sync).
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [num_tokens, num_kv_heads, head_dim]; got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    check_kv_cache(k_cache, v_cache, head_dim, num_kv_heads)
    check_last_dim_contiguous("k and v", k, v)
    check_one_dtype("k, v, k_cache, v_cache", k, v, k_cache, v_cache)
    check_index("slot_mapping", slot_mapping, num_tokens)
    check_one_device("store_kv", k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
