"""RMSNorm, alone and with the residual add fused in front of it (Triton).

Numerics as Hugging Face Llama: sum of squares and normalization in float32, the
normalized row cast to the input dtype, then multiplied by the weight (input dtype).
The fused version first forms `residual = x + residual` rounded to the input dtype
(as torch's `x + residual` would), writes it back, and normalizes that.

One program per row; the whole row is held at once, so rows are limited to
65536 elements.
"""

from __future__ import annotations

import torch

from kestrel.kernels.triton_compat import tl, triton

_MAX_ROW_LEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    stride_x, stride_residual, stride_out, eps,
    ROW_LEN: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW_LEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)  # [BLOCK]
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / ROW_LEN + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # cast to the input dtype before the weight, as HF does
    tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor) -> None:
    """Check shapes/dtypes/strides of both public launchers and run the kernel."""
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden]; got {tuple(x.shape)}")
    num_tokens, row_len = x.shape
    if row_len > _MAX_ROW_LEN:
        raise ValueError(f"rows of more than {_MAX_ROW_LEN} elements are not supported; got {row_len}")
    if weight.shape != (row_len,) or not weight.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError(f"weight must be a contiguous [{row_len}] {x.dtype} tensor; got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    for name, t in (("out", out), ("residual", residual)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"{name} must be {tuple(x.shape)} {x.dtype}; got {tuple(t.shape)} {t.dtype}")
    tensors = [t for t in (x, residual, out) if t is not None]
    if any(t.stride(1) != 1 for t in tensors if t.shape[0] > 0):
        raise ValueError("x, residual and out need a contiguous last dim (stride 1)")
    if len({t.device for t in tensors + [weight]}) != 1:
        raise ValueError("x, residual, weight and out must be on one device")
    if num_tokens == 0:
        return
    block = triton.next_power_of_2(row_len)
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        ROW_LEN=row_len, ADD_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = rmsnorm(x) * weight. x, out: [num_tokens, hidden], last dim contiguous; weight: [hidden], x's dtype."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual = x + residual (x's dtype), x = rmsnorm(residual) * weight; returns (x, residual)."""
    _launch(x, residual, weight, eps, x)
    return x, residual
