"""Matmuls of a few rows against a large weight (decode at small batch): y = x @ w.T (+ bias) (Triton).

x `[M, K]` with M <= 16, w `[N, K]` (the checkpoint layout, K contiguous), y `[M, N]` in x's dtype, fp32
accumulation. Such a step reads the whole weight once and does little arithmetic per byte, so its speed
is the rate at which the weight streams in from memory; cuBLAS runs these shapes at ~91% of the H200's
copy bandwidth (benchmarks/gpu/README.md), plus a split-K reduce kernel for some shapes.

Grid: one program per BLOCK_N output columns, each looping over all of K in BLOCK_K steps (no split-K,
so there is nothing to reduce afterwards). Two inner products, chosen by `SkinnyTuning.use_dot`:
- broadcast-multiply-and-sum in registers (`use_dot=False`, BLOCK_M = the rows rounded up to a power of
  two: best for one or two rows);
- `tl.dot` on a 16-row tile with the missing rows masked to zero (`use_dot=True`: tensor cores, so the
  row count costs nothing up to 16).

Launch settings come from `skinny_tuning` unless given. `kestrel.layers.linear.linear` (what the model's layers call)
takes this kernel on a GPU only for the shapes where the H200 sweep (`benchmarks/gpu/gemv_probe.py`, 32 weights
per shape in one CUDA graph, `benchmarks/gpu/h200-2026-12-02d/gemv.json`) found it faster than cuBLAS:

| Llama-3.1-8B shape (N x K) | rows 1 / 16, cuBLAS us | this kernel us |
|---|---|---|
| o_proj 4096 x 4096 | 12.7 / 13.2 | 11.3 / 11.7 |
| LM head 128256 x 4096 | 281.8 / 263.9 | 238.4 / 250.8 (4.41 TB/s at one row) |
| qkv 6144 x 4096 | 15.6 / 15.9 | 15.6 / 15.9 (a tie: cuBLAS kept) |
| gate_up 28672 x 4096, down 4096 x 14336 | 56.3, 31.1 | 57.0, 32.0 at 2-8 rows (cuBLAS kept) |
"""

from __future__ import annotations

from dataclasses import dataclass

import os

import torch

from kestrel.kernels.triton_compat import tl, triton

ENABLED = os.environ.get("KESTREL_SKINNY_GEMM", "0") == "1"
"""Opt-in (KESTREL_SKINNY_GEMM=1). On: batch-1 decode on an H200 4.68 -> 4.61 ms per token, but a request's
o_proj and logits then come from a different kernel alone (this one) than in a batch of more than 16
(cuBLAS), and `benchmarks/gpu/correctness.py`'s bf16 batch vs one-at-a-time first-token agreement fell
from 1.0 to 0.969 (identical 32-token sequences 0.84 -> 0.31-0.34; fp32 logits from both kernels did
not restore it). Off until both paths round alike."""
MAX_ROWS = 16
"""The most rows this kernel takes; larger batches go to cuBLAS (compute starts to matter)."""


@dataclass(frozen=True, slots=True)
class SkinnyTuning:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_dot: bool

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1; got {value}")
        if self.use_dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError("tl.dot needs block_n and block_k >= 16")


SMALL_WEIGHT = 4096 * 4096
"""Weights of at most this many elements (32 MiB in bf16) are read in ~10 us, where cuBLAS loses ~1.5 us."""
WIDE_OUTPUT = 65536
"""Outputs at least this wide (vocabulary heads): cuBLAS read the 8B's LM head at 3.7 TB/s, this kernel 4.4."""


def skinny_tuning(rows: int, n: int, k: int) -> SkinnyTuning:
    """Launch settings for `rows` x `k` against `n` x `k`: one setting, within 2% of the best of 46 at every
    Llama-3.1-8B shape and row count 1-16 in the sweep (the register-sum variant won by <= 0.4 us at one row)."""
    return SkinnyTuning(block_n=32, block_k=128, num_warps=4, num_stages=6, use_dot=True)


def wanted(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` sends this matmul here: a CUDA bf16/fp16 matmul of <= 16 rows whose weight is small
    or whose output is wide (see the module docstring), in shapes the kernel takes."""
    if not ENABLED or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return False
    return faster_here(x.shape[0], *w.shape) and supports(x, w)


def faster_here(rows: int, n: int, k: int) -> bool:
    """The sweep's rule: <= 16 rows, and a small weight or a wide output."""
    return 1 <= rows <= MAX_ROWS and (n * k <= SMALL_WEIGHT or n >= WIDE_OUTPUT)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns = weight rows
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]  # [BN, BK]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BM, BK]
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):  # K % BLOCK_K == 0 (checked by the launcher)
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=col_mask, other=0.0)
        x = tl.load(x_ptrs, mask=row_mask, other=0.0)
        if USE_DOT and UPCAST_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee" if x.dtype == tl.float32 else "tf32")
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask & (cols[None, :] < N))


def supports(x: torch.Tensor, w: torch.Tensor, tuning: SkinnyTuning | None = None) -> bool:
    """Whether `skinny_linear(x, w)` takes these shapes (else use F.linear)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or not 1 <= x.shape[0] <= MAX_ROWS:
        return False
    tuning = tuning or skinny_tuning(x.shape[0], w.shape[0], w.shape[1])
    return w.shape[1] % tuning.block_k == 0 and x.stride(1) == 1 and w.stride(1) == 1


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  tuning: SkinnyTuning | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K].T (+ bias [N]); 1 <= M <= 16, K a multiple of the tuning's block_k."""
    m, k = x.shape
    n = w.shape[0]
    tuning = tuning or skinny_tuning(m, n, k)
    if not supports(x, w, tuning):
        raise ValueError(f"skinny_linear takes x [1..{MAX_ROWS}, K] and w [N, K] with K a multiple of "
                         f"{tuning.block_k} and contiguous last dims; got {tuple(x.shape)} and {tuple(w.shape)}")
    if w.dtype != x.dtype or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"w must be {x.dtype} and bias [{n}]; got {w.dtype} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if tuning.use_dot else triton.next_power_of_2(m)
    _skinny_kernel[(triton.cdiv(n, tuning.block_n),)](
        x, w, bias if bias is not None else w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_N=n % tuning.block_n == 0, BLOCK_M=block_m, BLOCK_N=tuning.block_n,
        BLOCK_K=tuning.block_k, USE_DOT=tuning.use_dot,
        UPCAST_DOT=x.device.type == "cpu",  # the interpreter of Triton 3.9 multiplies bf16 dots as integers
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    return out
