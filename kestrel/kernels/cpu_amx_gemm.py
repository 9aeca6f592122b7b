"""Matmuls of decode-sized row counts on AMX tiles, as C++ ops (`torch.ops.kestrel_cpu_amx`).

On a CPU with AMX, oneDNN's bf16 GEMM runs SmolLM2's 120 layer matmuls in ~11.7 ms at 8 rows: ~18 GB/s of
weights where the machine reads ~22, plus ~17 us of fixed cost a call (measured with a 64 x 64 weight:
descriptor hashing, primitive-cache lookup, memory objects; `benchmarks/cpu/int8_gemm_probe.py`).
A tile multiply-add (`tdpbf16ps`: 16 x 16 x 32 in one instruction) leaves a matmul of up to 16 rows
bound by reading its weight alone, so these kernels do nothing else: the weight is stored once in the
order the tile loads read it, and a call streams it front to back.

    bf16:  packed [N / 16, K / 32, 16, 16, 2]: block j of 16 output columns, k-block kb, row r holds
           for each column n the pair (W[16 j + n, 32 kb + 2 r], W[16 j + n, 32 kb + 2 r + 1])
    int8:  packed [N / 16, K / 64, 16, 16, 4]: the same with quads of int8 weights (`tdpbssd`), one
           fp32 scale per output column; activations rounded to int8 per row (absmax / 127) inside the op

x's rows are copied into a buffer padded to 16 rows (zeros); each thread takes a range of column blocks
and runs them four at a time (four accumulator tiles, one tile of x, the weight tiles streamed) for
each block of 16 rows, or, from 32 rows on, two column blocks by two row blocks (each weight tile loaded
serves two row tiles); fp32 accumulation, + bias, rounded to bf16 once at the end (bf16: the same
maths as oneDNN's bf16 GEMM up to the order of fp32 additions). A row's result does not depend on the
number of rows (each row is its own tile row), so batching changes nothing. N is padded to 16 (zero
columns, never stored); K must be a multiple of 32 (bf16) or 64 (int8).

`cpu_linear.PackedLinear` runs bf16 weights on the bf16 kernel for up to `MAX_ROWS` rows. The int8 kernel
(weights rounded per column, activations per row: ~1% relative error a matmul) halves the bytes again
(SmolLM2's layers 4.5-5.3 ms against 8.7-9.2 at 1-16 rows) but is not wired into the engine: teacher-forced
on text at 8 rows (`benchmarks/cpu/quantized_fidelity.py`), its top-1 agreed with the fp32 engine's for
85.8% of tokens, against 96.0% for bf16 and 93.6% with the int8 weights alone; the activations' rounding
costs too much. It stays, tested, for the probes (`benchmarks/cpu/int8_gemm_probe.py`).

Built into `cpu_attention.load()`'s extension with -march=native: on a CPU without AMX the ops exist but
`available()` is False and nothing calls them.
Linux needs a process to ask for the AMX state once (arch_prctl); the op does so on first use.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kestrel.kernels import cpu_attention

BLOCK_N = 16
"""Output columns per tile."""
MAX_ROWS = 512
"""Most rows a call runs here; more go to oneDNN, whose blocking keeps x in cache where this kernel re-reads it
for every pair of column blocks. SmolLM2's 120 layer matmuls, bf16, this kernel / oneDNN (ms, a 2-core Xeon
with AMX): 9.1 / 14.1 at 16 rows, 13.7 / 18.1 at 64, 20.9 / 24.5 at 128, 60.5 / 70.0 at 512, 135 / 131 at
1024, 303 / 170 at 2048 (`benchmarks/cpu/int8_gemm_probe.py`)."""

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#define KESTREL_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kestrel_amx {
namespace {

#if defined(KESTREL_AMX)
constexpr int64_t BN = 16;  // output columns a tile
constexpr int64_t BM = 16;  // rows a tile

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {  // Linux hands out the tile state only to a process that asks
  static const bool granted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}

// Tiles 0-3 accumulate four column blocks, tile 4 holds x's 16 rows of one k-block, 5-7 the weights.
inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// c[g][16][16] = x block [16 rows][K] . W blocks j0 .. j0 + G (int32 or fp32 accumulators).
// `step` elements of a weight block per k-block (one 1 KB tile), `xstep` bytes of x per k-block.
template <int G, bool INT8>
inline void blocks(const char* x, int64_t ldx, int64_t xstep, const char* w, int64_t block_bytes, int64_t kblocks,
                   void* c) {
  _tile_zero(0);
  if (G > 1) _tile_zero(1);
  if (G > 2) _tile_zero(2);
  if (G > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* wk = w + kb * 1024;
    _tile_loadd(4, x + kb * xstep, ldx);
    _tile_loadd(5, wk, 64);
    if (INT8) _tile_dpbssd(0, 4, 5); else _tile_dpbf16ps(0, 4, 5);
    if (G > 1) {
      _tile_loadd(6, wk + block_bytes, 64);
      if (INT8) _tile_dpbssd(1, 4, 6); else _tile_dpbf16ps(1, 4, 6);
    }
    if (G > 2) {
      _tile_loadd(7, wk + 2 * block_bytes, 64);
      if (INT8) _tile_dpbssd(2, 4, 7); else _tile_dpbf16ps(2, 4, 7);
    }
    if (G > 3) {
      _tile_loadd(5, wk + 3 * block_bytes, 64);
      if (INT8) _tile_dpbssd(3, 4, 5); else _tile_dpbf16ps(3, 4, 5);
    }
  }
  char* cb = static_cast<char*>(c);
  _tile_stored(0, cb, 64);
  if (G > 1) _tile_stored(1, cb + 1024, 64);
  if (G > 2) _tile_stored(2, cb + 2048, 64);
  if (G > 3) _tile_stored(3, cb + 3072, 64);
}

template <bool INT8>
inline void run_blocks(int g, const char* x, int64_t ldx, int64_t xstep, const char* w, int64_t block_bytes,
                       int64_t kblocks, void* c) {
  switch (g) {
    case 4: blocks<4, INT8>(x, ldx, xstep, w, block_bytes, kblocks, c); break;
    case 3: blocks<3, INT8>(x, ldx, xstep, w, block_bytes, kblocks, c); break;
    case 2: blocks<2, INT8>(x, ldx, xstep, w, block_bytes, kblocks, c); break;
    default: blocks<1, INT8>(x, ldx, xstep, w, block_bytes, kblocks, c); break;
  }
}

// c[2][2][16][16]: x rows m0 .. m0 + 32 (two tiles) . W blocks j, j + 1 (two tiles): each weight tile loaded
// serves two row tiles (for calls of many rows, where the weights come from L2 again for every row block).
template <bool INT8>
inline void blocks2x2(const char* x, int64_t ldx, int64_t xstep, const char* w, int64_t block_bytes, int64_t kblocks,
                      void* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* wk = w + kb * 1024;
    _tile_loadd(4, x + kb * xstep, ldx);
    _tile_loadd(5, x + 16 * ldx + kb * xstep, ldx);
    _tile_loadd(6, wk, 64);
    _tile_loadd(7, wk + block_bytes, 64);
    if (INT8) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  char* cb = static_cast<char*>(c);
  _tile_stored(0, cb, 64);
  _tile_stored(1, cb + 1024, 64);
  _tile_stored(2, cb + 2048, 64);
  _tile_stored(3, cb + 3072, 64);
}

// Rows of x rounded to int8 (absmax / 127 a row) into q [Mp][K] (rows past M stay zero), scales into s.
void quantize_rows(const uint16_t* x, int64_t M, int64_t K, int8_t* q, float* s) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* row = x + m * K;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k))), 16));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      }
      const float amax = _mm512_reduce_max_ps(mx);
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      s[m] = scale;
      const __m512 inv = _mm512_set1_ps(1.f / scale);
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k))), 16));
        const __m512i r = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v, inv),
                                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * K + k), _mm512_cvtsepi32_epi8(r));
      }
    }
  });
}
#endif

// x [..., K] bf16 -> [..., n] bf16 on a packed weight (bf16 [N/16, K/32, 16, 16, 2] or int8 [N/16, K/64,
// 16, 16, 4] with w_scale [N'] fp32); bias [N'] fp32 or none.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& w_scale,
                  const c10::optional<at::Tensor>& bias, int64_t n) {
#if defined(KESTREL_AMX)
  TORCH_CHECK(request_amx(), "kestrel_cpu_amx: the kernel did not grant the AMX tile state");
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && (int8 || packed.scalar_type() == at::kBFloat16),
              "x bf16; packed bf16 or int8");
  TORCH_CHECK(packed.dim() == 5 && packed.size(2) == 16 && packed.size(3) == 16 && packed.size(4) == (int8 ? 4 : 2),
              "packed [N/16, K/kb, 16, 16, 2 or 4]");
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  const int64_t NB = packed.size(0), KB = packed.size(1), K = KB * (int8 ? 64 : 32);
  TORCH_CHECK(x.size(-1) == K && n > 0 && n <= NB * BN, "shapes do not match");
  TORCH_CHECK(!int8 || (w_scale.has_value() && w_scale->scalar_type() == at::kFloat && w_scale->numel() == NB * BN),
              "int8 weights need w_scale [N'] fp32");
  const auto xc = x.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0), Mp = (M + BM - 1) / BM * BM;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto out = at::empty({M, n}, x.options());
  if (M == 0) return out.view(sizes);
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == NB * BN, "bias: fp32, padded to 16");
    b = bc.data_ptr<float>();
  }
  const float* ws = int8 ? w_scale->data_ptr<float>() : nullptr;
  // x's rows, padded to whole tiles (zeros), as the tile loads read them
  at::Tensor xq = xc, xs;
  if (int8) {
    xq = at::zeros({Mp, K}, x.options().dtype(at::kChar));
    xs = at::empty({Mp}, x.options().dtype(at::kFloat));
    quantize_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  } else if (Mp != M) {
    xq = at::zeros({Mp, K}, x.options());
    xq.narrow(0, 0, M).copy_(xc);
  }
  const char* xa = reinterpret_cast<const char*>(xq.data_ptr());
  const int64_t ldx = int8 ? K : 2 * K;  // bytes a row
  const int64_t xstep = 64;               // bytes of a row a k-block: 64 int8 or 32 bf16
  const float* xsp = int8 ? xs.data_ptr<float>() : nullptr;
  const char* w = reinterpret_cast<const char*>(packed.data_ptr());
  const int64_t block_bytes = KB * 1024;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, NB / (4 * at::get_num_threads()));
  at::parallel_for(0, NB, grain, [&](int64_t j0, int64_t j1) {
    configure();
    alignas(64) float c[4][BM][BN];
    // c[t] holds rows m0 + 16 * (t / cols) .., column block j + t % cols: writes `tiles` of them out
    auto store = [&](int64_t j, int64_t m0, int tiles, int cols) {
      for (int t = 0; t < tiles; ++t) {
        const int64_t col = (j + t % cols) * BN, r0 = m0 + BM * (t / cols);
        if (col >= n || r0 >= M) continue;
        const int64_t left = n - col, rows = std::min<int64_t>(BM, M - r0);
        const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
        const __m512 bv = b == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(b + col);
        const __m512 wv = int8 ? _mm512_loadu_ps(ws + col) : _mm512_set1_ps(1.f);
        for (int64_t r = 0; r < rows; ++r) {
          __m512 v = _mm512_load_ps(c[t][r]);
          if (int8) {
            const __m512 scale = _mm512_mul_ps(wv, _mm512_set1_ps(xsp[r0 + r]));
            v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(v)), scale);
          }
          v = _mm512_add_ps(v, bv);
          _mm256_mask_storeu_epi16(op + (r0 + r) * n + col, mk, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    };
    if (Mp >= 32) {  // many rows: 2 x 2 tiles (a last odd block of 16 rows reads the zero rows past Mp)
      for (int64_t j = j0; j < j1; j += 2) {
        const bool pair = j + 1 < j1;
        for (int64_t m0 = 0; m0 < M; m0 += 2 * BM) {
          if (pair && m0 + BM < Mp) {
            if (int8) blocks2x2<true>(xa + m0 * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
            else blocks2x2<false>(xa + m0 * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
            store(j, m0, 4, 2);
          } else {
            const int g = pair ? 2 : 1;
            for (int64_t mb = m0; mb < std::min(M, m0 + 2 * BM); mb += BM) {
              if (int8) run_blocks<true>(g, xa + mb * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
              else run_blocks<false>(g, xa + mb * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
              store(j, mb, g, g);
            }
          }
        }
      }
    } else {
      for (int64_t j = j0; j < j1; j += 4) {
        const int g = static_cast<int>(std::min<int64_t>(4, j1 - j));
        for (int64_t m0 = 0; m0 < M; m0 += BM) {
          if (int8) run_blocks<true>(g, xa + m0 * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
          else run_blocks<false>(g, xa + m0 * ldx, ldx, xstep, w + j * block_bytes, block_bytes, KB, c);
          store(j, m0, g, g);
        }
      }
    }
    _tile_release();
  });
  return out.view(sizes);
#else
  TORCH_CHECK(false, "kestrel_cpu_amx.linear needs AMX (built without it)");
#endif
}

bool built() {
#if defined(KESTREL_AMX)
  return request_amx();
#else
  return false;
#endif
}

}  // namespace
}  // namespace kestrel_amx

TORCH_LIBRARY(kestrel_cpu_amx, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor? w_scale, Tensor? bias, int n) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(kestrel_amx::linear));
  m.def("built() -> bool");
  m.impl("built", c10::DispatchKey::CatchAll, TORCH_FN(kestrel_amx::built));
}
"""


class PackedAmx(NamedTuple):
    """A weight [N, K] in the tile layout (see the module docstring)."""

    packed: torch.Tensor
    """bf16 [N'/16, K/32, 16, 16, 2] or int8 [N'/16, K/64, 16, 16, 4]; N' = N rounded up to 16."""
    scale: torch.Tensor | None
    """int8: [N'] fp32 per output column; bf16: None."""
    bias: torch.Tensor | None
    """[N'] fp32, or None."""
    out_features: int


@functools.cache
def available() -> bool:
    """The ops are built with AMX and the OS grants the tile state (KESTREL_CPU_AMX=0 says no, for A/B runs)."""
    if os.environ.get("KESTREL_CPU_AMX", "1") == "0":
        return False
    if not (cpu_attention.load() and bool(torch.ops.kestrel_cpu_amx.built())):
        return False

    @torch.library.register_fake("kestrel_cpu_amx::linear")
    def _(x, packed, w_scale, bias, n):  # compiled decode graphs call the op itself
        return x.new_empty(*x.shape[:-1], n)

    return True


def supports(weight: torch.Tensor, int8: bool = False) -> bool:
    """The kernel runs this weight: [N, K] on the CPU, K a multiple of 32 (bf16) or 64 (int8)."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
            and weight.shape[1] % (64 if int8 else 32) == 0)


def _pad(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    pad = -weight.shape[0] % BLOCK_N
    w = F.pad(weight.detach(), (0, 0, 0, pad))  # [N', K]
    b = None if bias is None else F.pad(bias.detach().float(), (0, pad)).contiguous()
    return w, b, pad


def pack_bf16(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedAmx:
    """weight [N, K] (K % 32 == 0), bias [N] or None -> bf16 tile layout."""
    n, k = weight.shape
    w, b, _ = _pad(weight.to(torch.bfloat16), bias)
    packed = w.view(-1, BLOCK_N, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()  # [N'/16, K/32, 16, 16, 2]
    return PackedAmx(packed, None, b, n)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], fp32 scale [N]): w ~ q * scale, q in -127..127, rounded to nearest."""
    wf = weight.detach().float()
    scale = wf.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedAmx:
    """weight [N, K] (K % 64 == 0), bias [N] or None -> int8 tile layout with a scale per output column."""
    n, k = weight.shape
    q, scale = quantize_int8(weight)
    q, b, pad = _pad(q, bias)
    packed = q.view(-1, BLOCK_N, k // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous()  # [N'/16, K/64, 16, 16, 4]
    return PackedAmx(packed, F.pad(scale, (0, pad), value=1.0).contiguous(), b, n)


def linear(x: torch.Tensor, weight: PackedAmx) -> torch.Tensor:
    """x [..., K] bf16 -> [..., N] bf16. Needs `available()`."""
    return torch.ops.kestrel_cpu_amx.linear(x, weight.packed, weight.scale, weight.bias, weight.out_features)
