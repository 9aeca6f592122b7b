"""The flash-attention inner step both attention kernels share (Triton)."""

from __future__ import annotations

from kestrel.kernels.triton_compat import tl, triton


@triton.jit
def softmax_accumulate(scores, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold one block of keys into a running softmax: flash attention's inner step.

    scores: [M, N] float32, scaled for exp2, -inf where a key is not visible; v: [N, D] values;
    m_i, l_i: [M] running max and sum of exp2(score - m_i); acc: [M, D] running sum of p @ v.
    Returns (acc, l_i, m_i) after the block.
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST_DOT:  # the interpreter of Triton 3.9 multiplies 16-bit dots as integers
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_block(
    acc, l_i, m_i, q, q_pos, block_start, kv_end, table_ptr, k_cache_ptr, v_cache_ptr, kv_head_offset,
    d, dim_ok, qk_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key/value block, read through the slot table, folded into the running softmax.

    Positions [block_start, block_start + BLOCK_N) below kv_end; MASKED applies causality (a query at
    q_pos sees keys at positions <= q_pos) and the kv_end bound.
    """
    pos = block_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    pos_ok = pos < kv_end
    slots = tl.load(table_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    row_offsets = slots * (NUM_KV_HEADS * HEAD_DIM) + kv_head_offset
    k = tl.load(k_cache_ptr + row_offsets[None, :] + d[:, None],
                mask=dim_ok[:, None] & pos_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_cache_ptr + row_offsets[:, None] + d[None, :],
                mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST_DOT:
        k = k.to(tl.float32)
    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    return softmax_accumulate(scores, v, m_i, l_i, acc, DOT_PRECISION, UPCAST_DOT)
