"""RMSNorm with an optional fused residual add (one Triton kernel when `use_triton`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, use_triton: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.use_triton = use_triton
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [T, hidden]. With `residual`, returns (norm(x + residual), x + residual).

        With `use_triton` one kernel does the add and the norm (in place on x and residual).
        """
        if self.use_triton:
            from kestrel.kernels.rmsnorm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:
            out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        else:  # normalise in float32, scale in the model dtype, as Hugging Face does
            out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight
        return out if residual is None else (out, residual)
