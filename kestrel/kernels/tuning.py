"""Launch settings of the attention kernels (block sizes, warps, pipeline stages), chosen by shape.

One owner for these numbers: `decode_attention` and `extend_attention` call `decode_tuning` /
`extend_tuning` unless the caller passes its own `AttentionTuning` (what the sweep
`benchmarks/gpu/attn_sweep.py` does to time every candidate). The GPU defaults are the sweep's
winners on an H200 (bf16, head_dim 128, Llama-3.1-8B's 32 query / 8 KV heads; results in
benchmarks/gpu/README.md); float32 keeps smaller blocks (register pressure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionTuning:
    block_n: int       # keys per inner step
    num_warps: int
    num_stages: int    # software-pipelining depth of the key loop
    block_m: int = 0   # extend only: (token, query head) rows per program; 0 for decode

    def __post_init__(self) -> None:
        for name in ("block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1; got {value}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1; got {self.num_stages}")
        if self.block_m and self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two; got {self.block_m}")


def decode_tuning(dtype: torch.dtype, head_dim: int, batch: int) -> AttentionTuning:
    """Settings of the decode partial kernel for `batch` requests.

    H200 sweep (2026-12-02, one KV split): at 256 requests 128-key blocks with 3 stages beat 64 with 2 by
    3-5% (116 vs 120 us at ~384 keys, 393 vs 414 us at ~1536: 4.09 TB/s); at 64 requests x ~536 keys
    64 keys / 2 stages stayed best (48.8 us). Batch-1 timings were too noisy to change anything.
    The threshold sits on a CUDA-graph bucket (multiples of 16), so a padded graph replay and an eager step
    of the same requests pick the same settings (same rounding): every batch <= 128 pads to a bucket <= 128.
    """
    if dtype == torch.float32 or head_dim > 128:
        return AttentionTuning(block_n=32, num_warps=4, num_stages=2)
    if batch > 128:
        return AttentionTuning(block_n=128, num_warps=4, num_stages=3)
    return AttentionTuning(block_n=64, num_warps=4, num_stages=2)


def extend_tuning(dtype: torch.dtype, head_dim: int) -> AttentionTuning:
    """Settings of the extend (prefill) kernel.

    H200 sweep (2026-12-02): 128 rows, 64 keys, 4 warps, 3 stages was the fastest of 36 candidates on
    4 x 2048 fresh prompts (436 vs 522 us with the former 8 warps / 2 stages: 316 TFLOP/s) and on 16 x 128
    new tokens after 2048 cached (210 vs 297 us), and within 4% of the best on 1 x 2048 (151 vs 145 us).
    """
    if dtype == torch.float32:
        return AttentionTuning(block_n=32, num_warps=8 if head_dim > 64 else 4, num_stages=2, block_m=64)
    return AttentionTuning(block_n=64, num_warps=4, num_stages=3, block_m=128)
