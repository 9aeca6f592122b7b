"""Decode attention over the slot-table KV cache: split-K flash-decoding, GQA-aware (Triton).

Each request b has one query token, `q[b] [num_heads, head_dim]`, that attends all
positions [0, seq_lens[b]) of its KV, read from `k_cache`/`v_cache [num_slots,
num_kv_heads, head_dim]` at slots `req_to_token[req_rows[b], position]`.

Two kernels:
1. `_decode_partial_kernel`, one program per (request, kv head, split): the split's
   positions are attended by all query heads of that kv head at once (the group is
   padded to at least 16 rows so that tl.dot applies), so each key/value row is loaded
   once per group. It writes the split's normalized output and its log-sum-exp to a
   float32 workspace.
2. `_decode_reduce_kernel`, one program per (request, head): merges the splits. With one split
   (large batches) the partial kernel writes the output directly and this kernel is not launched.

Workspace layout (float32, `decode_workspace_size` elements for the largest batch):
`[B, H, S, D]` partial outputs, then `[B, H, S]` base-2 log-sum-exps of the scaled
scores (S = num_kv_splits). An empty split writes a zero output and -inf.

Block sizes: BLOCK_H = max(16, next_pow2(num_heads // num_kv_heads)) query rows; BLOCK_N, warps and
stages from `kestrel/kernels/tuning.py`. float32 dots use 3xTF32
on the GPU (about float32 accuracy), 16-bit dots the tensor cores with float32 accumulation.

CUDA graphs: the launcher reads no device value on the host. Each request's split
length is computed on the device from its seq_len (ceil(seq_len / S), rounded up to
BLOCK_N), so a graph captured once serves any lengths. A request with seq_len 0
(padding) reads no KV and gets a zero output.
"""

from __future__ import annotations

import torch

from kestrel.kernels.attention_common import attend_block
from kestrel.kernels.launch_checks import check_attention, check_index, check_one_device
from kestrel.kernels.triton_compat import tl, triton
from kestrel.kernels.tuning import AttentionTuning, decode_tuning

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, req_to_token_ptr, req_rows_ptr, seq_lens_ptr,
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_q_req, stride_q_head, stride_o_req, stride_o_head, stride_table_row,
    qk_scale, num_splits,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    row = tl.load(req_rows_ptr + req).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    head_ok = g < GROUP
    dim_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g  # [BLOCK_H] query heads served by this kv head (padded)
    q = tl.load(q_ptr + req * stride_q_req + heads[:, None] * stride_q_head + d[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of scaled scores (base 2)
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # running sum of p @ v
    table_ptr = req_to_token_ptr + row * stride_table_row
    kv_head_offset = kv_head * HEAD_DIM
    last = tl.zeros([BLOCK_H], tl.int32) + (end - 1)  # every head's query sits at the last position
    for block_start in range(start, end, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, last, block_start, end, table_ptr, k_cache_ptr, v_cache_ptr,
                                     kv_head_offset, d, dim_ok, qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, True,
                                     DOT_PRECISION, UPCAST_DOT)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [BLOCK_H, BLOCK_D], zeros for an empty split
    if DIRECT_OUT:  # one split: this is the final output, no merge
        o_rows = req * stride_o_req + heads * stride_o_head  # [BLOCK_H]
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=head_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # [BLOCK_H]
        part = (req * NUM_HEADS + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=head_ok[:, None] & dim_ok[None, :])
        tl.store(part_lse_ptr + part, lse, mask=head_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_o_req, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    split_ok = s < NUM_SPLITS
    dim_ok = d < HEAD_DIM
    part = (req * NUM_HEADS + head) * NUM_SPLITS + s  # [BLOCK_S]
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))  # [BLOCK_S]
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                    mask=split_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: weights all 0
    weights = tl.exp2(lse - lse_max)  # [BLOCK_S]
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + req * stride_o_req + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def decode_workspace_size(max_batch: int, num_heads: int, head_dim: int, num_kv_splits: int) -> int:
    """Float32 elements of the workspace `decode_attention` needs for up to `max_batch` requests."""
    return max_batch * num_heads * num_kv_splits * (head_dim + 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, sm_scale: float,
                     num_kv_splits: int, workspace: torch.Tensor | None = None,
                     tuning: AttentionTuning | None = None) -> torch.Tensor:
    """out[b] = softmax(q[b] k^T * sm_scale) v over positions [0, seq_lens[b]) of request b; returns out.

    q, out: [B, num_heads, head_dim], last dim contiguous (q may be a view into a qkv buffer).
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], contiguous, q's dtype; num_heads % num_kv_heads == 0.
    req_to_token: [max_num_seqs, max_model_len] int32 (or int64), last dim contiguous.
    req_rows, seq_lens: [B] int32 (or int64). seq_lens[b] <= max_model_len is not checked (no host sync).
    workspace: float32, contiguous, >= decode_workspace_size(B, num_heads, head_dim, num_kv_splits)
    elements; allocated here when None (pass one for CUDA graphs). With one split the partial kernel
    writes `out` itself and the workspace is not touched.
    tuning: launch settings; `kestrel.kernels.tuning.decode_tuning` when None.
    """
    num_heads, num_kv_heads, head_dim = check_attention(q, out, k_cache, v_cache, req_to_token, "batch")
    batch = q.shape[0]
    check_index("req_rows", req_rows, batch)
    check_index("seq_lens", seq_lens, batch)
    if not isinstance(num_kv_splits, int) or not 1 <= num_kv_splits <= 256:
        raise ValueError(f"num_kv_splits must be an int in [1, 256]; got {num_kv_splits!r}")
    check_one_device("decode_attention", q, k_cache, v_cache, req_to_token, req_rows, seq_lens, out)

    direct = num_kv_splits == 1
    num_parts = batch * num_heads * num_kv_splits
    needed = 0 if direct else num_parts * (head_dim + 1)
    if workspace is None:
        workspace = torch.empty(max(1, needed), dtype=torch.float32, device=q.device)
    elif (workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < needed
          or workspace.device != q.device):
        raise ValueError(f"workspace must be a contiguous float32 tensor on {q.device} with >= {needed} elements; "
                         f"got {workspace.dtype}, {workspace.numel()} elements on {workspace.device}")
    if batch == 0:
        return out
    workspace = workspace.view(-1)
    # One split writes `out` directly; the (unused) partial pointers then point at the workspace's start.
    part_out = workspace if direct else workspace[:num_parts * head_dim]  # [B, H, S, D]
    part_lse = workspace if direct else workspace[num_parts * head_dim:needed]  # [B, H, S]

    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    is_fp32 = q.dtype == torch.float32
    tuning = tuning or decode_tuning(q.dtype, head_dim, batch)
    _decode_partial_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_cache, v_cache, req_to_token, req_rows, seq_lens, part_out, part_lse, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        sm_scale * _LOG2E, num_kv_splits,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=tuning.block_n, BLOCK_D=block_d,
        DIRECT_OUT=direct, DOT_PRECISION="tf32x3" if is_fp32 else "tf32",
        UPCAST_DOT=q.device.type == "cpu",  # the interpreter of Triton 3.9 multiplies bf16 dots as integers
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    if direct:
        return out
    _decode_reduce_kernel[(batch, num_heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_kv_splits,
        BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=block_d,
        num_warps=4 if head_dim >= 128 else 2,
    )
    return out
