"""SiLU-and-multiply, the gated activation of Llama-style MLPs (Triton).

x `[num_tokens, 2 * I]` holds the gate projection then the up projection (the
merged gate_up output); out `[num_tokens, I]` = silu(gate) * up, computed in float32
and stored in x's dtype.

Grid: (token, block of BLOCK columns).
"""

from __future__ import annotations

import torch

from kestrel.kernels.triton_compat import tl, triton

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_x + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + token * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(x[:, :I]) * x[:, I:]. x: [T, 2 * I], out: [T, I] in x's dtype; last dims contiguous."""
    if x.dim() != 2 or x.shape[1] % 2 != 0:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate]; got {tuple(x.shape)}")
    num_tokens, width = x.shape
    intermediate = width // 2
    if out is None:
        out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    if out.shape != (num_tokens, intermediate) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{num_tokens}, {intermediate}] {x.dtype}; got {tuple(out.shape)} {out.dtype}")
    if num_tokens > 0 and (x.stride(1) != 1 or out.stride(1) != 1):
        raise ValueError(f"x and out need a contiguous last dim; got strides {x.stride()} and {out.stride()}")
    if out.device != x.device:
        raise ValueError(f"x and out must be on one device; got {x.device} and {out.device}")
    if num_tokens == 0 or intermediate == 0:
        return out
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, _BLOCK))](
        x, out, x.stride(0), out.stride(0), INTERMEDIATE=intermediate, BLOCK=_BLOCK, num_warps=4,
    )
    return out
