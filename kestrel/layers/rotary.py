"""Rotary position embedding (neox / rotate-half layout, as Hugging Face Llama uses).

Supports plain RoPE, "linear" scaling and Llama 3's "llama3" frequency scaling.
cos/sin are precomputed once for every position up to max_position. A forward pass asks once for
the `Rope` of its positions; each layer then rotates its stacked q and k heads with it: in torch
(cos/sin gathered once per forward), or in place with a Triton kernel when `use_triton`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None,
                 use_triton: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.use_triton = use_triton
        inv_freq = _inv_freq(head_dim, theta, scaling)
        pos = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [max_position, head_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def for_positions(self, positions: torch.Tensor) -> Rope:
        """positions: [T] -> the `Rope` every layer of this forward pass uses."""
        if self.use_triton:
            return Rope(positions, self.cos, self.sin, None, None)
        return Rope(positions, self.cos, self.sin, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


class Rope(NamedTuple):
    """RoPE for one forward pass's positions."""

    positions: torch.Tensor   # [T]
    cos_table: torch.Tensor   # [max_position, D/2] float32
    sin_table: torch.Tensor
    cos: torch.Tensor | None  # [T, 1, D/2] gathered (torch path); None: the kernel reads the tables
    sin: torch.Tensor | None

    def rotate(self, qk: torch.Tensor, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """qk: [T, H + KH, D], the q heads then the k heads -> (q [T, H, D], k [T, KH, D]) rotated.

        The Triton kernel rotates in place; the torch path makes a rotated copy.
        """
        if self.cos is None:
            from kestrel.kernels.rotary import apply_rotary

            q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
            apply_rotary(q, k, self.positions, self.cos_table, self.sin_table)
            return q, k
        x1, x2 = qk.float().chunk(2, dim=-1)
        out = torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1).to(qk.dtype)
        return out[:, :num_q_heads], out[:, num_q_heads:]
