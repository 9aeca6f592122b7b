"""Causal prefill attention over the slot table on CPU for bf16 caches, as a C++ op
(`torch.ops.kestrel_cpu_prefill.prefill_attention`).

One request's chunk: Q new tokens whose keys are the S cached slots `kv_index` (its earlier
context, then the chunk itself); query i attends keys j <= (S - Q) + i. Flash-attention style:
for each query head, tiles of 4 queries run over blocks of 64 keys with an online softmax, so
scores never leave the L1 cache. Both products use AVX512-BF16 dot products (`vdpbf16ps`, fp32
accumulation) where the CPU has them: the keys are packed per KV head as [block][D/2][16 keys][2]
(a key pair of dims per 32-bit lane) and the values as [key pair][D][2], read once per query tile
from L2. The softmax weights are rounded to bf16 before the value product, as GPU flash
kernels do. Without AVX512-BF16 the same tiling runs with widened fp32 loops (correct, slower;
`use()` then says no and callers keep torch's SDPA).

Why: torch's CPU SDPA on bf16 runs at 44-65 GFLOP/s on a 2-core Zen 4 whose bf16 GEMM does
~420, and at 512 tokens attention was ~35% of a SmolLM2 prefill. fp32 caches keep torch's SDPA
(the fidelity tests compare fp32 with transformers). On CPUs with AMX the opposite holds: torch's
bf16 flash SDPA runs its products on AMX tiles, 1.0-2.9x this kernel (a 2-core Xeon: 9 heads of 64,
causal 512 tokens 1.19 vs 2.33 ms, 2048 tokens 12.1 vs 35.0 ms, 32 new tokens over 544 keys 0.40 vs
0.42 ms), so `use()` says no there and the torch backend calls SDPA in bf16 (`bf16_sdpa()`).

Its source is built after the decode kernel's, into one extension (`cpu_attention.load()`), and uses
that source's exp helpers; KESTREL_CPU_ATTENTION=0 turns both off, for A/B runs.
"""

from __future__ import annotations

import functools
import os

import torch

from kestrel.kernels import cpu_attention

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace kestrel_prefill {
namespace {

constexpr int64_t TM = 4;   // queries per tile
constexpr int64_t BN = 64;  // keys per block

inline float bf(uint16_t b) {
  uint32_t w = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline uint16_t to_bf(float f) {  // round to nearest even (no NaNs here)
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  w += 0x7fff + ((w >> 16) & 1);
  return static_cast<uint16_t>(w >> 16);
}

// exp_nonpositive and exp512 come from cpu_attention's source, which precedes this one in the build.

// s[TM][BN] = q pairs [TM][D/2] . packed key block [D/2][BN] (fp32).
template <int64_t D>
inline void qk_tile(const uint32_t* const* qrow, const uint32_t* kb, float* s) {
#if defined(__AVX512BF16__)
  __m512 acc[TM][4];
  for (int r = 0; r < TM; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D / 2; ++i) {
    const uint32_t* k = kb + i * BN;
    __m512bh kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + 16 * c);
    for (int r = 0; r < TM; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qrow[r][i]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
    }
  }
  for (int r = 0; r < TM; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * BN + 16 * c, acc[r][c]);
#else
  for (int64_t x = 0; x < TM * BN; ++x) s[x] = 0.f;
  for (int64_t i = 0; i < D / 2; ++i)
    for (int r = 0; r < TM; ++r) {
      const float q0 = bf(qrow[r][i] & 0xffff), q1 = bf(qrow[r][i] >> 16);
      for (int64_t c = 0; c < BN; ++c) {
        const uint32_t k = kb[i * BN + c];
        s[r * BN + c] += q0 * bf(k & 0xffff) + q1 * bf(k >> 16);
      }
    }
#endif
}

// o[TM][D] += p pairs [TM][BN/2] . packed value pairs [BN/2][D] (fp32).
template <int64_t D>
inline void pv_tile(const uint32_t* p, const uint32_t* vb, float* o) {
#if defined(__AVX512BF16__)
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[TM][4];
    for (int r = 0; r < TM; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
    for (int64_t j = 0; j < BN / 2; ++j) {
      const uint32_t* v = vb + j * D + d0;
      __m512bh vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(v + 16 * c);
      for (int r = 0; r < TM; ++r) {
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * (BN / 2) + j]));
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
      }
    }
    for (int r = 0; r < TM; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * D + d0 + 16 * c, acc[r][c]);
  }
#else
  for (int64_t j = 0; j < BN / 2; ++j)
    for (int r = 0; r < TM; ++r) {
      const float p0 = bf(p[r * (BN / 2) + j] & 0xffff), p1 = bf(p[r * (BN / 2) + j] >> 16);
      for (int64_t d = 0; d < D; ++d) {
        const uint32_t v = vb[j * D + d];
        o[r * D + d] += p0 * bf(v & 0xffff) + p1 * bf(v >> 16);
      }
    }
#endif
}

// One row of a key block: scale, mask keys c > lim, fold into the running max m and sum l, write the
// unnormalised weights to p as bf16 pairs; returns the factor the row's earlier output is rescaled by.
inline float softmax_row(float* sr, uint32_t* p, int64_t lim, float scale, float& m, float& l) {
#if defined(__AVX512BF16__)
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i limv = _mm512_set1_epi32(static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(lim, BN))));
  __m512 x[4];
  __m512 mx = _mm512_set1_ps(m);
  for (int c = 0; c < 4; ++c) {
    const __mmask16 seen = _mm512_cmple_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * c)), limv);
    x[c] = _mm512_mask_mul_ps(ninf, seen, _mm512_loadu_ps(sr + 16 * c), _mm512_set1_ps(scale));
    mx = _mm512_max_ps(mx, x[c]);
  }
  const float mnew = _mm512_reduce_max_ps(mx);
  const float alpha = exp_nonpositive(m - mnew);
  const __m512 mv = _mm512_set1_ps(mnew);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    x[c] = exp512(_mm512_sub_ps(x[c], mv));
    sum = _mm512_add_ps(sum, x[c]);
  }
  _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(x[1], x[0]));
  _mm512_storeu_si512(p + 16, (__m512i)_mm512_cvtne2ps_pbh(x[3], x[2]));
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = mnew;
  return alpha;
#else
  float mx = m;
  for (int64_t c = 0; c < BN; ++c) {
    sr[c] = c <= lim ? sr[c] * scale : -std::numeric_limits<float>::infinity();
    mx = sr[c] > mx ? sr[c] : mx;
  }
  const float alpha = exp_nonpositive(m - mx);
  float sum = 0.f;
  for (int64_t c = 0; c < BN; ++c) {
    sr[c] = exp_nonpositive(sr[c] - mx);
    sum += sr[c];
  }
  for (int64_t c = 0; c < BN / 2; ++c)
    p[c] = to_bf(sr[2 * c]) | (static_cast<uint32_t>(to_bf(sr[2 * c + 1])) << 16);
  l = l * alpha + sum;
  m = mx;
  return alpha;
#endif
}

template <int64_t D>
void prefill(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* index, uint16_t* out,
             int64_t Q, int64_t H, int64_t KH, int64_t S, int64_t slot_stride, int64_t head_stride, float scale) {
  const int64_t G = H / KH, NB = (S + BN - 1) / BN, SP = NB * BN;
  // Packed keys [KH][NB][D/2][BN] and values [KH][SP/2][D], as bf16 pairs; padding keys are zero.
  std::vector<uint32_t> kp(KH * SP * D / 2, 0u), vp(KH * SP * D / 2, 0u);
  at::parallel_for(0, KH * NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kh = item / NB, b = item % NB;
      uint32_t* kb = kp.data() + (kh * NB + b) * (D / 2) * BN;
      uint16_t* vb = reinterpret_cast<uint16_t*>(vp.data() + (kh * SP + b * BN) * D / 2);
      for (int64_t c = 0; c < BN && b * BN + c < S; ++c) {
        const int64_t j = b * BN + c;
        const uint16_t* k = kc + index[j] * slot_stride + kh * head_stride;
        const uint16_t* v = vc + index[j] * slot_stride + kh * head_stride;
        for (int64_t i = 0; i < D / 2; ++i) kb[i * BN + c] = k[2 * i] | (static_cast<uint32_t>(k[2 * i + 1]) << 16);
        uint16_t* vrow = vb + (c / 2) * 2 * D + (c & 1);  // pair c/2 of this block, lane half c&1
        for (int64_t d = 0; d < D; ++d) vrow[2 * d] = v[d];
      }
    }
  });
  const int64_t tiles = (Q + TM - 1) / TM, offset = S - Q;
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float s[TM * BN], o[TM * D], m[TM], l[TM];
    alignas(64) uint32_t p[TM * BN / 2];
    std::vector<uint32_t> zero(D / 2, 0u);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, t0 = (item % tiles) * TM, kh = h / G;
      const uint32_t* qrow[TM];
      for (int r = 0; r < TM; ++r)
        qrow[r] = t0 + r < Q ? reinterpret_cast<const uint32_t*>(q + ((t0 + r) * H + h) * D) : zero.data();
      for (int r = 0; r < TM; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;
      std::fill(o, o + TM * D, 0.f);
      const int64_t last = offset + std::min(t0 + TM, Q) - 1;  // the last key any row of the tile sees
      for (int64_t b = 0; b * BN <= last; ++b) {
        qk_tile<D>(qrow, kp.data() + (kh * NB + b) * (D / 2) * BN, s);
        for (int r = 0; r < TM; ++r) {
          const float alpha = softmax_row(s + r * BN, p + r * (BN / 2), offset + t0 + r - b * BN, scale, m[r], l[r]);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
        }
        pv_tile<D>(p, vp.data() + (kh * SP + b * BN) * D / 2, o);
      }
      for (int r = 0; r < TM && t0 + r < Q; ++r) {
        const float inv = 1.f / l[r];
        uint16_t* dst = out + ((t0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = to_bf(o[r * D + d] * inv);
      }
    }
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& kv_index, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [Q, H, D], caches [N, KH, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(2) == 1, "caches: same strides, D contiguous");
  const auto qc = q.contiguous();
  const auto idx = kv_index.to(at::kLong).contiguous();
  const int64_t Q = q.size(0), H = q.size(1), D = q.size(2), KH = k_cache.size(1), S = idx.numel();
  TORCH_CHECK(H % KH == 0 && k_cache.size(2) == D && S >= Q && Q > 0, "shapes do not match");
  auto out = at::empty({Q, H, D}, q.options());
  auto run = [&](auto ds) {
    prefill<decltype(ds)::value>(reinterpret_cast<const uint16_t*>(qc.data_ptr()),
                                 reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
                                 reinterpret_cast<const uint16_t*>(v_cache.data_ptr()), idx.data_ptr<int64_t>(),
                                 reinterpret_cast<uint16_t*>(out.data_ptr()), Q, H, KH, S, k_cache.stride(0),
                                 k_cache.stride(1), static_cast<float>(scale));
  };
  if (D == 64) run(std::integral_constant<int64_t, 64>{});
  else if (D == 128) run(std::integral_constant<int64_t, 128>{});
  else TORCH_CHECK(false, "head dim 64 or 128 only");
  return out;
}

bool fast() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace kestrel_prefill

TORCH_LIBRARY(kestrel_cpu_prefill, m) {
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_index, float scale) -> Tensor");
  m.impl("prefill_attention", c10::DispatchKey::CPU, TORCH_FN(kestrel_prefill::prefill_attention));
  m.def("fast() -> bool");
  m.impl("fast", c10::DispatchKey::CatchAll, TORCH_FN(kestrel_prefill::fast));
}
"""

HEAD_DIMS = (64, 128)


@functools.cache
def use() -> bool:
    """Whether prefills of bf16 caches should take this op: it is built, the CPU has AVX512-BF16 and no AMX
    (`KESTREL_CPU_PREFILL_KERNEL=1` takes it on AMX too, for A/B runs)."""
    if bf16_sdpa() and os.environ.get("KESTREL_CPU_PREFILL_KERNEL") != "1":
        return False
    return cpu_attention.load() and bool(torch.ops.kestrel_cpu_prefill.fast())


def bf16_sdpa() -> bool:
    """torch's CPU SDPA is fast in bf16 here (AMX): bf16 prefill chunks call it without widening to fp32."""
    from kestrel.kernels import cpu_bf16_gemm

    return cpu_bf16_gemm.has_amx()


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """q [Q, H, D] bf16; caches [N, KH, D] bf16; kv_index [S] slots (S >= Q; query i sees keys
    j <= S - Q + i) -> [Q, H, D] bf16; scale 1/sqrt(D) unless given. D in HEAD_DIMS. Needs `cpu_attention.load()`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.kestrel_cpu_prefill.prefill_attention(q, k_cache, v_cache, kv_index, scale)
