"""Weight-only quantized GEMMs for small CPU steps: torch's int4 and int8 kernels and their formats.

A decode step of a small model on a CPU is bound by reading the weights (fp32: 4 bytes a weight).
Two torch kernels read fewer, with activations in bf16 (with fp32 ones torch takes a scalar path
10-100x slower) and the result returned in the input's dtype:

- int4, `_weight_int4pack_mm_for_cpu`: half a byte a weight plus a bf16 scale and zero per group
  of 32 inputs. Its format (found by experiment against torch 2.13's kernel), for output row n and
  input column k: ``w[n, k] = (q[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n]``, q in 0..15.
  GGUF's 4-bit blocks (32 weights along the input) map onto it exactly, up to the bf16 rounding of
  their fp16 scales (`from_gguf_q4_0`, `from_gguf_q4_1`).
- int8, `_weight_int8pack_mm`: one byte a weight, one bf16 scale per output row:
  ``w[n, k] = q[n, k] * scale[n]``, q in -127..127. Every layer weight that is not stored in 4 bits
  is rounded to it (`quantize_int8`): rounding to int4 instead costs too much (SmolLM2's Q8_0 LM head
  rounded to int4, with nothing recomputed, changed 17% of teacher-forced greedy tokens).
- The LM head is the exception: its top logits are recomputed from the plain weight
  (`cpu_linear.PackedLinear.refine_top_k`), so it is rounded to int4 (`quantize_int4`) where the
  checkpoint has no 4-bit codes for it, at half int8's bytes and less than half its time (torch's
  int8 kernel is compute-bound: SmolLM2's 49152 x 576 head took 2.4 ms at 2 rows, int4 1.0 ms).

Results differ slightly from the fp32 matmul, so this path is opt-in (`--cpu-quantized-decode`).
Both kernels dequantize on the fly (AVX2 on the machine measured) and are compute-bound, so they
win only for a few rows: `kernels/cpu_linear.py` uses them up to `max_rows` rows and its fp32
packed weight beyond (measured on a 2-core Zen 3, weights streamed from memory: see
benchmarks/cpu/README.md). Shapes: in_features a multiple of 32 (int4); out_features is padded
to a multiple of 16 for the int4 kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

GROUP_SIZE = 32
"""Input columns sharing one int4 scale and zero (GGUF's Q4 block size)."""
_N_ALIGN = 16  # the int4 kernel's packing needs out_features % 16 == 0


class Int4Weight(NamedTuple):
    """A weight [N, K] as 4-bit codes: w = (codes - 8) * scales + zeros, per group of 32 columns."""

    codes: torch.Tensor
    """[N, K] uint8 in 0..15."""
    scales: torch.Tensor
    """[N, K // 32] float32."""
    zeros: torch.Tensor
    """[N, K // 32] float32."""

    def dequantize(self, bf16_params: bool = True) -> torch.Tensor:
        """[N, K] float32; with `bf16_params` the scales and zeros rounded as the kernel reads them."""
        scales, zeros = self.scales, self.zeros
        if bf16_params:
            scales, zeros = scales.bfloat16().float(), zeros.bfloat16().float()
        expand = lambda t: t.repeat_interleave(GROUP_SIZE, dim=1)  # noqa: E731  [N, K//32] -> [N, K]
        return (self.codes.float() - 8) * expand(scales) + expand(zeros)


class Int8Weight(NamedTuple):
    """A weight [N, K] as 8-bit codes and one scale per output row: w = codes * scales[:, None]."""

    codes: torch.Tensor
    """[N, K] int8 in -127..127."""
    scales: torch.Tensor
    """[N] float32 (already rounded to bf16, as the kernel reads them)."""

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]  # [N, K]


QuantizedWeight = Int4Weight | Int8Weight


def int4_supported(in_features: int) -> bool:
    """The int4 kernel runs this input width (and this build of torch has it)."""
    return in_features % GROUP_SIZE == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def from_gguf_q4_0(d: torch.Tensor, q: torch.Tensor) -> Int4Weight:
    """GGUF Q4_0, w = d * (q - 8): d [N, K//32] (the fp16 block scales), q [N, K] codes."""
    return Int4Weight(q.to(torch.uint8), d.float(), torch.zeros_like(d, dtype=torch.float32))


def from_gguf_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> Int4Weight:
    """GGUF Q4_1, w = d * q + m = d * (q - 8) + (m + 8 d): d, m [N, K//32] fp16, q [N, K] codes."""
    d, m = d.float(), m.float()
    return Int4Weight(q.to(torch.uint8), d, m + 8 * d)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Round-to-nearest symmetric int8 per output row, against the bf16-rounded scale."""
    w = weight.detach().float()  # [N, K]
    scales = (w.abs().amax(dim=1) / 127).bfloat16().float()  # [N]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return Int8Weight(codes, scales)


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Round-to-nearest asymmetric int4 per group of 32 inputs (the range of each group onto codes 0..15).

    For the LM head only, whose top logits are recomputed from the plain weight (`refine_top_k`): then
    the greedy tokens of SmolLM2 are those of its int8 head (8 prompts x 48 tokens, all equal) and the
    head reads half the bytes. Layers without that refinement keep int8.
    """
    w = weight.detach().float()  # [N, K]
    n, k = w.shape
    groups = w.view(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = groups.amin(-1), groups.amax(-1)  # [N, K//32]
    scales = ((hi - lo) / 15).bfloat16().float()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round((groups - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return Int4Weight(codes.view(n, k), scales, lo + 8 * scales)


def choose_quantized(weight: torch.Tensor, int4: Int4Weight | None) -> QuantizedWeight:
    """The checkpoint's int4 codes where given and the kernel runs them, else int8 rounded from `weight`."""
    if int4 is not None and int4_supported(weight.shape[1]):
        return int4
    return quantize_int8(weight)


class Int4Linear:
    """y = x @ W.T with W in torch's packed int4 layout; x [rows, in] of any float dtype."""

    max_rows = 8
    """Most rows that run here; more run on the fp32 packed weight (see benchmarks/cpu/README.md)."""

    def __init__(self, weight: Int4Weight) -> None:
        n, k = weight.codes.shape
        if not int4_supported(k):
            raise ValueError(f"the int4 kernel needs in_features divisible by {GROUP_SIZE}, got {k}")
        self.out_features, self.in_features = n, k
        pad = -n % _N_ALIGN  # padding rows: code 8, scale 0, zero 0 (weight 0), sliced off the output
        codes = F.pad(weight.codes.int(), (0, 0, 0, pad), value=8)  # [N', K]
        scales = F.pad(weight.scales, (0, 0, 0, pad))  # [N', K//32]
        zeros = F.pad(weight.zeros, (0, 0, 0, pad))
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # [N', K/2] uint8
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).bfloat16().contiguous()  # [K//32, N', 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, in] -> [rows, out], in x's dtype
        out = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, GROUP_SIZE, self.scales_zeros)
        if out.shape[-1] != self.out_features:
            out = out[:, : self.out_features]
        return out.to(x.dtype).contiguous()


class Int8Linear:
    """y = x @ W.T with W as int8 codes and per-row bf16 scales; x [rows, in] of any float dtype."""

    max_rows = 4
    """Most rows that run here; more run on the fp32 packed weight (see benchmarks/cpu/README.md)."""

    def __init__(self, weight: Int8Weight) -> None:
        self.out_features, self.in_features = weight.codes.shape
        self.codes = weight.codes.contiguous()  # [N, K] int8
        self.scales = weight.scales.bfloat16().contiguous()  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, in] -> [rows, out], in x's dtype
        return torch._weight_int8pack_mm(x.bfloat16(), self.codes, self.scales).to(x.dtype)


def quantized_linear(weight: QuantizedWeight) -> Int4Linear | Int8Linear:
    """The kernel for a quantized weight."""
    return Int4Linear(weight) if isinstance(weight, Int4Weight) else Int8Linear(weight)
