"""Prefill / extend attention over the slot-table KV cache: causal flash attention, GQA-aware (Triton).

The batch is flat: request r owns query tokens [q_start_loc[r], q_start_loc[r + 1]),
q_len of them, at positions [seq_len - q_len, seq_len) after a cached prefix of
seq_len - q_len positions. All keys/values, the new tokens' included (store_kv has
already written them), are read from `k_cache`/`v_cache [num_slots, num_kv_heads,
head_dim]` at slots `req_to_token[req_rows[r], position]`. The query at position p
attends the positions <= p. This one kernel covers a fresh prompt (prefix 0), a
chunk of a chunked prefill, a prompt whose prefix is cached, and q_len == 1 requests
mixed into a prefill step.

One program per (tile of BLOCK_T query tokens, request, kv head). Its BLOCK_M =
BLOCK_T * GROUP_PAD rows are (token, query head) pairs: all query heads that share
the kv head, padded to a power of two, so each key/value block is loaded once for
the whole group. Online softmax in float32 (base 2), tl.dot for q k^T and p v.
Keys below the tile's first query position are visible to every row and take an
unmasked loop; only the last blocks (the diagonal) are masked. Tiles are started
last-first, so the longest (most keys) run first.

Block sizes: BLOCK_M rows, BLOCK_N keys per step, warps and stages from `kestrel/kernels/tuning.py`;
BLOCK_T = BLOCK_M // GROUP_PAD query tokens. float32 dots use 3xTF32 on the GPU (about float32 accuracy).
"""

from __future__ import annotations

import torch

from kestrel.kernels.attention_common import attend_block
from kestrel.kernels.launch_checks import check_attention, check_index, check_one_device
from kestrel.kernels.triton_compat import tl, triton
from kestrel.kernels.tuning import AttentionTuning, extend_tuning

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, req_to_token_ptr, req_rows_ptr, q_start_loc_ptr, seq_lens_ptr, out_ptr,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_table_row,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # last tiles (most keys) first
    req = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(q_start_loc_ptr + req)
    q_len = tl.load(q_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_T >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - q_len
    row = tl.load(req_rows_ptr + req).to(tl.int64)

    m = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_T + m // GROUP_PAD  # [BLOCK_M] query token within the request
    g = m % GROUP_PAD
    d = tl.arange(0, BLOCK_D)
    dim_ok = d < HEAD_DIM
    row_ok = (tok < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    q_rows = (q_start + tok).to(tl.int64) * stride_q_tok + head * stride_q_head  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    q_pos = prefix_len + tok  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_ptr = req_to_token_ptr + row * stride_table_row
    kv_head_offset = kv_head * HEAD_DIM
    kv_end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_T)  # past the tile's last query
    # Every row of the tile sees the positions before its first query.
    unmasked_end = (prefix_len + tile * BLOCK_T) // BLOCK_N * BLOCK_N
    for block_start in range(0, unmasked_end, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, q_pos, block_start, kv_end, table_ptr, k_cache_ptr,
                                      v_cache_ptr, kv_head_offset, d, dim_ok, qk_scale, NUM_KV_HEADS, HEAD_DIM,
                                      BLOCK_N, False, DOT_PRECISION, UPCAST_DOT)
    for block_start in range(unmasked_end, kv_end, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, q_pos, block_start, kv_end, table_ptr, k_cache_ptr,
                                      v_cache_ptr, kv_head_offset, d, dim_ok, qk_scale, NUM_KV_HEADS, HEAD_DIM,
                                      BLOCK_N, True, DOT_PRECISION, UPCAST_DOT)

    out = acc / l_i[:, None]  # every row saw position 0, so l_i > 0
    o_rows = (q_start + tok).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, q_start_loc: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                     sm_scale: float, max_query_len: int, tuning: AttentionTuning | None = None) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached prefix and themselves; returns out.

    q, out: [num_tokens, num_heads, head_dim], last dim contiguous (q may be a view into a qkv buffer).
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], contiguous, q's dtype; num_heads % num_kv_heads == 0.
    req_to_token: [max_num_seqs, max_model_len] int32 (or int64), last dim contiguous.
    req_rows, seq_lens: [R] int32 (or int64); q_start_loc: [R + 1] int32 (or int64), q_start_loc[R] ==
    num_tokens and 1 <= q_len <= seq_len for every request (not checked: no host sync).
    max_query_len: the largest q_len (host int), used only to size the grid.
    tuning: launch settings (block_m rows, block_n keys, warps, stages); `extend_tuning` when None.
    """
    num_heads, num_kv_heads, head_dim = check_attention(q, out, k_cache, v_cache, req_to_token, "num_tokens")
    num_tokens = q.shape[0]
    num_reqs = req_rows.shape[0] if req_rows.dim() == 1 else -1
    shapes = " (req_rows [R], seq_lens [R], q_start_loc [R + 1])"
    check_index("req_rows", req_rows, num_reqs, shapes)
    check_index("seq_lens", seq_lens, num_reqs, shapes)
    check_index("q_start_loc", q_start_loc, num_reqs + 1, shapes)
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a non-negative int; got {max_query_len!r}")
    check_one_device("extend_attention", q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out)
    if num_tokens == 0 or num_reqs == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    is_fp32 = q.dtype == torch.float32
    tuning = tuning or extend_tuning(q.dtype, head_dim)
    block_t = max(1, tuning.block_m // group_pad)  # query tokens per program
    block_d = triton.next_power_of_2(head_dim)
    grid = (triton.cdiv(max_query_len, block_t), num_reqs, num_kv_heads)
    _extend_attention_kernel[grid](
        q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        sm_scale * _LOG2E,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_T=block_t, BLOCK_M=block_t * group_pad, BLOCK_N=tuning.block_n, BLOCK_D=block_d,
        DOT_PRECISION="tf32x3" if is_fp32 else "tf32",
        UPCAST_DOT=q.device.type == "cpu",  # the interpreter of Triton 3.9 multiplies bf16 dots as integers
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    return out
