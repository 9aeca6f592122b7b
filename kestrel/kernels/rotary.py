"""Rotary position embedding applied in place to q and k, rotate-half (NeoX) layout (Triton).

The first and second halves of head_dim pair up, as in Hugging Face Llama:
out1 = x1 * cos - x2 * sin, out2 = x2 * cos + x1 * sin, in float32, cast back to the
input dtype. cos/sin are float32 tables `[max_position, head_dim // 2]` that already
hold any frequency scaling (llama3, linear); row `positions[t]` is used for token t.

One program per token rotates all of its q heads and k heads, reading its cos/sin
row once. q and k may be strided views into one fused qkv buffer.
"""

from __future__ import annotations

import torch

from kestrel.kernels.launch_checks import check_index, check_one_device
from kestrel.kernels.triton_compat import tl, triton


@triton.jit
def _rotate_heads(x_ptr, stride_head, cos, sin, j,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the [NUM_HEADS, 2 * HALF] heads at x_ptr (one token) in place."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < NUM_HEADS) & (j[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
    ptrs = x_ptr + heads[:, None] * stride_head + j[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(ptrs, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_table,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_table + j, mask=j < HALF, other=0.0)  # [BLOCK_HALF] float32
    sin = tl.load(sin_ptr + pos * stride_table + j, mask=j < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, cos, sin, j, NUM_HEADS, HALF, BLOCK_H)
    _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, cos, sin, j, NUM_KV_HEADS, HALF, BLOCK_KH)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KH, D] in place by the angles of `positions` [T].

    q, k: last dim contiguous (any token/head strides), one dtype. positions: int32 or int64, each
    < max_position (not checked: no host sync). cos, sin: contiguous float32 [max_position, D // 2].
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim]; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"q and k need a contiguous last dim; got strides {q.stride()} and {k.stride()}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share one dtype; got {q.dtype} and {k.dtype}")
    check_index("positions", positions, num_tokens)
    check_one_device("apply_rotary", q, k, positions, cos, sin)
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != half or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [max_position, {half}] table; got "
                             f"{tuple(t.shape)} {t.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
