"""bf16 matmuls of few rows on CPUs with AVX512-BF16, as a C++ op (`torch.ops.kestrel_cpu_gemm.linear`).

oneDNN's bf16 GEMM reaches ~420 GFLOP/s on a 2-core Zen 4 at 128+ rows, but at decode sizes it is
neither compute- nor bandwidth-bound: SmolLM2's 30 layers of matmuls (212 MB of bf16 weights) took
18.5 ms at one row (11 GB/s, where the machine copies ~40 GB/s) and 19.3 ms at 16 rows
(~200 GFLOP/s). This kernel streams the weight once per call in a layout made for `vdpbf16ps`:

    packed [N' / 64, K / 2, 64, 2] bf16: for each tile of 64 output columns, each pair of input
    columns holds the 64 weights' two values side by side (one 32-bit lane each, four zmm registers)

so one 256-byte sequential read per input pair feeds 4 x MR dot-product instructions, MR = 4 rows of
x broadcast as bf16 pairs; fp32 accumulators, + bias, rounded to bf16 once at the end (as oneDNN's
bf16 GEMM does). Tiles of 64 columns are split over threads; a tile's weights (73-196 KB for
SmolLM2) stay in L2 while the row blocks of a larger call reuse them. N' is N padded to 64 (zero
columns, never stored).

Used by `cpu_linear.PackedLinear` for bf16 weights at up to `MAX_ROWS` rows where `use()` says yes
(built, and the CPU has AVX512-BF16); otherwise oneDNN runs every matmul. Same maths as oneDNN's
bf16 GEMM up to the order of fp32 additions. Built into `cpu_attention.load()`'s extension.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kestrel.kernels import cpu_attention

TILE_N = 64
"""Output columns per packed tile (four zmm registers of 16 fp32)."""


@functools.cache
def has_amx() -> bool:
    """The CPU has AMX bf16 tiles (oneDNN's matmuls and torch's bf16 flash attention use them)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


AMX_MAX_ROWS = 5
"""On CPUs with AMX, oneDNN's prepacked bf16 matmuls run SmolLM2's 30 layers in ~10.5 ms at any row count
from 1 to 16 (an Intel Xeon with amx_bf16, 2 threads, `benchmarks/cpu/gemm_stack.py`), and this kernel
passes that at 6 rows (10.7 ms; 7.0 at one row, 20.0 at 16)."""
MAX_ROWS = AMX_MAX_ROWS if has_amx() else 64
"""Most rows a call runs here; larger matmuls go to oneDNN. 64 on AVX512-BF16 without AMX (a Zen 4: the
kernel was 1.1-2x faster than oneDNN up to 64 rows, see benchmarks/cpu/README.md), AMX_MAX_ROWS with."""

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace kestrel_gemm {
namespace {

constexpr int64_t NT = 64;  // columns per packed tile
constexpr int64_t MR = 4;   // rows per register block
constexpr int64_t KC = 64;  // input pairs per chunk (16 KB of a tile's weights)
constexpr int64_t PF = NT * KC;  // prefetch distance, in pairs of a tile: the next chunk

#if defined(__AVX512BF16__)
// acc[R][64] (+)= x[R][pairs i0..i1) . w[pairs i0..i1) (one packed tile [K/2][64] of bf16 pairs), R <= MR rows.
template <int R>
inline void accumulate(const uint16_t* x, int64_t ldx, const uint32_t* w, int64_t i0, int64_t i1, float* acc_mem,
                       bool first, bool prefetch) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_mem + r * NT + 16 * c);
  const int32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = reinterpret_cast<const int32_t*>(x + r * ldx);
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t* wi = w + i * NT;
    if (prefetch) {  // the next chunk's weights, while the other row blocks compute on this one
      const char* p = reinterpret_cast<const char*>(wi + PF);
      _mm_prefetch(p, _MM_HINT_T1);
      _mm_prefetch(p + 64, _MM_HINT_T1);
      _mm_prefetch(p + 128, _MM_HINT_T1);
      _mm_prefetch(p + 192, _MM_HINT_T1);
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wi);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wi + 16);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wi + 32);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(wi + 48);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[r][i]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc_mem + r * NT + 16 * c, acc[r][c]);
}

template <int R>
inline void accumulate_rows(const uint16_t* x, int64_t ldx, const uint32_t* w, int64_t i0, int64_t i1,
                            float* acc_mem, bool first, bool prefetch, int64_t rows) {
  // rows < R remainder dispatch
  switch (rows) {
    case 4: accumulate<4>(x, ldx, w, i0, i1, acc_mem, first, prefetch); break;
    case 3: accumulate<3>(x, ldx, w, i0, i1, acc_mem, first, prefetch); break;
    case 2: accumulate<2>(x, ldx, w, i0, i1, acc_mem, first, prefetch); break;
    case 1: accumulate<1>(x, ldx, w, i0, i1, acc_mem, first, prefetch); break;
    default: break;
  }
}

// One tile of 64 columns for all M rows: the K loop runs in chunks of KC pairs (KC x 256 bytes of
// weights, read from memory once, stay in L1 while every block of MR rows uses them).
inline void tile(const uint16_t* x, int64_t M, int64_t K, const uint32_t* w, const float* bias, uint16_t* out,
                 int64_t ldo, int64_t cols, float* acc_mem) {
  const int64_t K2 = K / 2;
  for (int64_t i0 = 0; i0 < K2; i0 += KC) {
    const int64_t i1 = std::min(K2, i0 + KC);
    for (int64_t m = 0; m < M; m += MR)
      accumulate_rows<MR>(x + m * K, K, w, i0, i1, acc_mem + m * NT, i0 == 0, m == 0, std::min(MR, M - m));
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int c = 0; c < 4; ++c) {
      const int64_t col = 16 * c;
      if (col >= cols) break;
      __m512 v = _mm512_loadu_ps(acc_mem + m * NT + col);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + col));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
      const int64_t left = cols - col;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
      _mm256_mask_storeu_epi16(out + m * ldo + col, mk, b);
    }
  }
}
#endif

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                  int64_t n) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == NT && packed.size(3) == 2, "packed [N'/64, K/2, 64, 2]");
  const int64_t tiles = packed.size(0), K2 = packed.size(1), K = 2 * K2;
  TORCH_CHECK(x.size(-1) == K && n > 0 && n <= tiles * NT, "shapes do not match");
  const auto xc = x.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto out = at::empty({M, n}, x.options());
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == tiles * NT, "bias: fp32, padded to the tiles");
    b = bc.data_ptr<float>();
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (M > 0) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(static_cast<size_t>(M) * NT);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t col0 = t * NT;
        tile(xp, M, K, wp + t * K2 * NT, b == nullptr ? nullptr : b + col0, op + col0, n,
             std::min<int64_t>(NT, n - col0), acc.data());
      }
    });
  }
  return out.view(sizes);
#else
  TORCH_CHECK(false, "kestrel_cpu_gemm.linear needs AVX512-BF16");
#endif
}

bool fast() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace kestrel_gemm

TORCH_LIBRARY(kestrel_cpu_gemm, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(kestrel_gemm::linear));
  m.def("fast() -> bool");
  m.impl("fast", c10::DispatchKey::CatchAll, TORCH_FN(kestrel_gemm::fast));
}
"""


class PackedBf16(NamedTuple):
    """A bf16 weight [N, K] in the kernel's layout (see the module docstring)."""

    packed: torch.Tensor
    """[N' / 64, K / 2, 64, 2] bf16, N' = N rounded up to 64."""
    bias: torch.Tensor | None
    """[N'] float32, or None."""
    out_features: int


@functools.cache
def use() -> bool:
    """Whether bf16 matmuls of few rows should take this op: it is built and the CPU has AVX512-BF16
    (KESTREL_CPU_BF16_GEMM=0 says no, for A/B runs)."""
    if os.environ.get("KESTREL_CPU_BF16_GEMM", "1") == "0":
        return False
    if not (cpu_attention.load() and bool(torch.ops.kestrel_cpu_gemm.fast())):
        return False

    @torch.library.register_fake("kestrel_cpu_gemm::linear")
    def _(x, packed, bias, n):  # compiled decode graphs call the op itself
        return x.new_empty(*x.shape[:-1], n)

    return True


def supports(weight: torch.Tensor) -> bool:
    """The kernel runs this weight: bf16 [N, K] on the CPU, K even."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 2 == 0
            and weight.device.type == "cpu")


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedBf16:
    """weight [N, K] bf16 (K even), bias [N] or None -> the kernel's layout."""
    n, k = weight.shape
    pad = -n % TILE_N
    w = F.pad(weight.detach(), (0, 0, 0, pad))  # [N', K], zero columns of the output
    packed = w.view(-1, TILE_N, k // 2, 2).permute(0, 2, 1, 3).contiguous()  # [N'/64, K/2, 64, 2]
    b = None if bias is None else F.pad(bias.detach().float(), (0, pad)).contiguous()
    return PackedBf16(packed, b, n)


def linear(x: torch.Tensor, weight: PackedBf16) -> torch.Tensor:
    """x [..., K] bf16 -> [..., N] bf16. Needs `use()`."""
    return torch.ops.kestrel_cpu_gemm.linear(x, weight.packed, weight.bias, weight.out_features)
