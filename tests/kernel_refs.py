"""Plain-torch references for the Triton kernels in `kestrel/kernels/`, and random inputs for them.

Shared by `tests/test_triton_kernels.py` (tiny shapes, on CPU under the Triton
interpreter) and `benchmarks/gpu/kernels_check.py` (Llama-3.1-8B shapes on a GPU).
Every reference computes in float32 and returns float32 unless it says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; NaN/inf in `out` (an unwritten element) give inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------

def make_kv_cache(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random k_cache, v_cache, each [num_slots, num_kv_heads, head_dim]."""
    shape = (num_slots, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device=device).to(dtype)
    v = torch.randn(shape, generator=gen, device=device).to(dtype)
    return k, v


def make_req_to_token(seq_lens: list[int], num_slots: int, max_model_len: int, device,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A table that gives each request distinct random (scrambled) slots, and its rows (`gen` on CPU).

    Returns req_to_token [len(seq_lens) + 2, max_model_len] int32 and req_rows [R] int32, a random
    permutation of the rows (so rows are not in request order and two rows are unused). Unused
    table entries hold num_slots + 7, an out-of-bounds slot, so a kernel that reads past seq_len
    reads garbage or faults instead of passing by luck.
    """
    num_reqs = len(seq_lens)
    if sum(seq_lens) > num_slots:
        raise ValueError(f"{sum(seq_lens)} positions do not fit in {num_slots} slots")
    num_rows = num_reqs + 2
    table = torch.full((num_rows, max_model_len), num_slots + 7, dtype=torch.int32)
    req_rows = torch.randperm(num_rows, generator=gen)[:num_reqs].to(torch.int32)
    slots = torch.randperm(num_slots, generator=gen).to(torch.int32)
    start = 0
    for r, seq_len in enumerate(seq_lens):
        table[int(req_rows[r]), :seq_len] = slots[start:start + seq_len]
        start += seq_len
    return table.to(device), req_rows.to(device)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def ref_store_kv(k, v, k_cache, v_cache, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches after writing k/v at slot_mapping; negative slots are skipped."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = k[keep]
    v_cache[slots] = v[keep]
    return k_cache, v_cache


def _gather_kv(k_cache, v_cache, req_to_token, row: int, seq_len: int, num_heads: int):
    """Keys/values of one request as [num_heads, seq_len, head_dim] float32 (kv heads repeated)."""
    slots = req_to_token[row, :seq_len].long()
    group = num_heads // k_cache.shape[1]
    k = k_cache[slots].float().transpose(0, 1).repeat_interleave(group, dim=0)  # [H, seq_len, D]
    v = v_cache[slots].float().transpose(0, 1).repeat_interleave(group, dim=0)  # [H, seq_len, D]
    return k, v


def ref_decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens, sm_scale: float) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D] float32; a request with seq_len 0 gives zeros."""
    num_reqs, num_heads, head_dim = q.shape
    out = torch.zeros(num_reqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    rows, lens = req_rows.tolist(), seq_lens.tolist()
    for b in range(num_reqs):
        if lens[b] == 0:
            continue
        k, v = _gather_kv(k_cache, v_cache, req_to_token, rows[b], lens[b], num_heads)
        qb = q[b].float().unsqueeze(1)  # [H, 1, D]
        out[b] = F.scaled_dot_product_attention(qb, k, v, scale=sm_scale).squeeze(1)
    return out


def ref_extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens,
                         sm_scale: float) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D] float32. Request r's queries sit at the last q_len of its positions."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    rows, starts, lens = req_rows.tolist(), q_start_loc.tolist(), seq_lens.tolist()
    for r in range(len(rows)):
        q_len = starts[r + 1] - starts[r]
        if q_len == 0:
            continue
        seq_len = lens[r]
        k, v = _gather_kv(k_cache, v_cache, req_to_token, rows[r], seq_len, num_heads)
        qr = q[starts[r]:starts[r + 1]].float().transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, scale=sm_scale)  # [H, q_len, D]
        out[starts[r]:starts[r + 1]] = o.transpose(0, 1)
    return out


def ref_rms_norm(x, weight, eps: float) -> torch.Tensor:
    """Hugging Face Llama's RMSNorm: normalize in float32, cast to x's dtype, then scale (x's dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def ref_fused_add_rms_norm(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype first."""
    total = x + residual
    return ref_rms_norm(total, weight, eps), total


def ref_rotary(x, positions, cos, sin) -> torch.Tensor:
    """x: [T, heads, D] -> rotated copy (rotate-half layout), computed in float32, cast back."""
    c = cos[positions.long()].unsqueeze(1)  # [T, 1, D/2]
    s = sin[positions.long()].unsqueeze(1)  # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def ref_silu_and_mul(x) -> torch.Tensor:
    """x: [T, 2 * I] (gate, then up) -> silu(gate) * up in float32, cast to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def make_rope_tables(max_position: int, head_dim: int, theta: float = 500000.0, device=None):
    """Plain RoPE cos/sin tables, each [max_position, head_dim // 2] float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return freqs.cos().to(device), freqs.sin().to(device)
