"""SiLU-and-multiply: the gated activation of Llama-style MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """x: [T, 2 * I] (gate then up) -> [T, I]; one Triton kernel when `use_triton`."""
    if use_triton:
        from kestrel.kernels.silu_and_mul import silu_and_mul as fused

        return fused(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
