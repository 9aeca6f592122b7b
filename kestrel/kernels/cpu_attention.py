"""Decode attention over the slot table on CPU, as a small C++ op (`torch.ops.kestrel_cpu.decode_attention`).

One query per request: out[r, h] = softmax(q[r, h] . K[kv_index[r, l]] * scale over the attended l) . V.
Each (request, KV head) pair is one work item: its G = H / KH query heads are scored against the
keys read straight from the KV pool through the slot indices (no gathered copy), then the values
are summed with the softmax weights, in fp32 whatever the cache dtype (bf16 is widened by a shift).
bf16 caches on a CPU with AVX512-BF16 (head dim 64 / 128) take an intrinsics path instead: q . k by
`vdpbf16ps` on the raw bf16 rows, 16 keys' sums reduced at once, the exp 16 lanes at a time: 2.8x
the portable loops (7 requests x 560 keys: 390 -> 140 us a layer on a 2-core Zen 4). With at least
two requests per thread its work item is a whole request (all KV heads), so each slot row is read
front to back: from memory, one head's 128 bytes of every 384-byte row ran at ~9 GB/s and whole rows
at ~15 (16 requests x 300 keys: 417 -> 256 us; `benchmarks/cpu/decode_attention_dram.py`).
Work items are spread over torch's intra-op threads when there are enough of them.

Why C++: inductor's loops for the same maths (`attention/slot_decode.py`) took 130 us a layer for
one padded request and 270 us for eight on a 2-core Zen 4, where the data is ~120 KB; SDPA on a
gathered copy (the eager torch backend) about as long. This op is registered with the dispatcher
(`TORCH_LIBRARY`), so a compiled graph calls it like any aten op, with no Python in between.

It is built once per machine with torch's C++ extension loader (about 40 s on 2 cores; cached in
~/.cache/torch_extensions) the first time `load()` runs; where that fails (no compiler),
`load()` returns False and callers keep their torch path (so does KESTREL_CPU_ATTENTION=0, for A/B runs).
The same build carries the bf16 prefill kernel of `cpu_prefill_attention.py`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &w, sizeof(f));
    dst[i] = f;
  }
}

// exp(x) for x <= 0 (softmax after subtracting the max), written so that loops over it vectorise:
// 2^(x log2 e) = 2^n * 2^f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error ~1e-7).
// x is clamped at -87 (exp = 1.6e-38, not 0: a masked key adds that much to the sum, never to the output).
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.4426950408889634f;
  const float n = std::nearbyint(t);
  const float f = t - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// DS: the head dim when known at compile time (64, 128: loops unrolled, accumulators in registers), else 0.
template <typename T, int64_t DS>
void decode(const T* q, const T* kc, const T* vc, const int64_t* index, const bool* mask, T* out,
            int64_t R, int64_t H, int64_t KH, int64_t D_, int64_t L, int64_t slot_stride, int64_t head_stride,
            float scale) {
  const int64_t D = DS ? DS : D_;
  const int64_t G = H / KH;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, L * G));  // ~10 us of work a thread at least
  at::parallel_for(0, R * KH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores(G * L), sums(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / KH, kh = item % KH;
      for (int64_t g = 0; g < G; ++g) {
        widen(q + (r * H + kh * G + g) * D, qf.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
      }
      const int64_t* idx = index + r * L;
      const bool* attend = mask + r * L;
      for (int64_t l = 0; l < L; ++l) {  // scores (-inf where not attended)
        if (!attend[l]) {
          for (int64_t g = 0; g < G; ++g) scores[g * L + l] = -std::numeric_limits<float>::infinity();
          continue;
        }
        widen(kc + idx[l] * slot_stride + kh * head_stride, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
          scores[g * L + l] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax weights, unnormalised (vectorised exp)
        float* sg = scores.data() + g * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t l = 0; l < L; ++l) mx = sg[l] > mx ? sg[l] : mx;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < L; ++l) {
          const float p = exp_nonpositive(sg[l] - mx);
          sg[l] = p;
          sum += p;
        }
        sums[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {  // weights times values
        if (!attend[l]) continue;
        widen(vc + idx[l] * slot_stride + kh * head_stride, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + l];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = sums[g] > 0.f ? 1.f / sums[g] : 0.f;
        T* o = out + (r * H + kh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

#if defined(__AVX512BF16__)
// lane j of the result = the sum of a[j]'s 16 lanes (a transpose-and-add tree: 45 ops for 16 sums).
inline __m512 sum16(const __m512* a) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d p = _mm512_castps_pd(x[2 * i]), q = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

inline __m512 exp512(__m512 x) {  // exp_nonpositive, 16 lanes (2^n applied by scalef)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One pass of the weighted sum of values: GC query heads of one KV head over every key, two keys at
// once. Their rows are interleaved by 16-bit element, so that vdpbf16ps sums w[l] v[l][d] +
// w[l+1] v[l+1][d] in each fp32 lane (lane 4i + t of acc[2v] is dim 32v + 8i + t, of acc[2v + 1]
// dim 32v + 8i + 4 + t; undone at the store). A key not attended (or past L) reads a zero row with
// weight zero (an unwritten slot may hold NaN bits). The weights are bf16 pairs, unnormalised.
struct ValuesPass {
  const uint16_t* vc;        // this KV head's part of slot 0
  const int64_t* idx;        // [L] slots
  const bool* attend;        // [L]
  int64_t L, slot_stride;
  int64_t prefetch_bytes;    // of each row 32 keys ahead (0: none)
  const uint32_t* wpairs;    // [GC][wstride] (w[l], w[l+1]) pairs
  int64_t wstride;
  const float* inv;          // [GC] 1 / sum of weights
  const uint16_t* zero_row;  // D zeros
  uint16_t* out;             // [GC][D]
};

template <int64_t D, int64_t GC>
void weighted_values(const ValuesPass& s) {
  constexpr int64_t NV = D / 32, NF = D / 16;
  __m512 acc[GC][NF];
  for (int64_t g = 0; g < GC; ++g)
    for (int64_t f = 0; f < NF; ++f) acc[g][f] = _mm512_setzero_ps();
  for (int64_t l = 0; l < s.L; l += 2) {
    const uint16_t* rows[2];
    for (int64_t t = 0; t < 2; ++t)
      rows[t] = l + t < s.L && s.attend[l + t] ? s.vc + s.idx[l + t] * s.slot_stride : s.zero_row;
    for (int64_t t = 32; t < 34 && s.prefetch_bytes && l + t < s.L; ++t) {
      const char* ahead = reinterpret_cast<const char*>(s.vc + s.idx[l + t] * s.slot_stride);
      for (int64_t c = 0; c < s.prefetch_bytes; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
    }
    for (int64_t v = 0; v < NV; ++v) {
      const __m512i a = _mm512_loadu_si512(rows[0] + 32 * v), b = _mm512_loadu_si512(rows[1] + 32 * v);
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int64_t g = 0; g < GC; ++g) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(s.wpairs[g * s.wstride + l / 2]));
        acc[g][2 * v] = _mm512_dpbf16_ps(acc[g][2 * v], lo, w);
        acc[g][2 * v + 1] = _mm512_dpbf16_ps(acc[g][2 * v + 1], hi, w);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t g = 0; g < GC; ++g) {
    const __m512 scale = _mm512_set1_ps(s.inv[g]);
    for (int64_t v = 0; v < NV; ++v) {
      const __m512 d0 = _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * v], first, acc[g][2 * v + 1]), scale);
      const __m512 d1 = _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * v], second, acc[g][2 * v + 1]), scale);
      _mm512_storeu_si512(s.out + g * D + 32 * v, (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
    }
  }
}

// bf16 caches on AVX512-BF16: q . k by `vdpbf16ps` on the raw bf16 rows, 16 keys' sums at once
// (sum16), the exp 16 lanes at a time; values widened to fp32 for the weighted sum. A work item is
// one request and `HP` of its KV heads: all of them when there are requests enough to keep every
// thread busy, so an item reads whole slot rows front to back (one head's part of each row is a
// strided gather that ran at ~10 GB/s from memory where whole rows stream), else one head.
template <int64_t D>
void decode_bf16(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* index, const bool* mask,
                 uint16_t* out, int64_t R, int64_t H, int64_t KH, int64_t L, int64_t slot_stride,
                 int64_t head_stride, float scale) {
  constexpr int64_t NV = D / 32, NF = D / 16;  // bf16 / fp32 vectors a row
  const int64_t G = H / KH, LP = (L + 31) / 32 * 32;
  const int64_t HP = R >= 2 * at::get_num_threads() ? KH : 1;  // KV heads an item
  const int64_t NH = HP * G;                                    // query heads an item
  const int64_t items_per_req = KH / HP;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, L * NH));
  at::parallel_for(0, R * items_per_req, grain, [&](int64_t begin, int64_t end) {
    std::vector<__m512bh> qv(NH * NV);
    std::vector<__m512> part(NH * 16);
    std::vector<float> scores(NH * LP), inv(NH);
    std::vector<uint16_t> weights(NH * LP);  // bf16
    const std::vector<uint16_t> zeros(KH * D, 0);
    const uint16_t* zero_row = zeros.data();
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / items_per_req, kh0 = (item % items_per_req) * HP;
      // query heads kh0 * G .. (kh0 + HP) * G: consecutive in q's row
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t v = 0; v < NV; ++v)
          qv[h * NV + v] = (__m512bh)_mm512_loadu_si512(q + (r * H + kh0 * G + h) * D + 32 * v);
      const int64_t* idx = index + r * L;
      const bool* attend = mask + r * L;
      for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int64_t n = std::min<int64_t>(16, L - l0);
        for (int64_t j = 0; j < 16; ++j) {
          if (j >= n) {
            for (int64_t h = 0; h < NH; ++h) part[h * 16 + j] = _mm512_setzero_ps();
            continue;
          }
          const uint16_t* row = kc + idx[l0 + j] * slot_stride + kh0 * head_stride;
          if (l0 + 32 + j < L) {  // the rows 32 keys on, while these compute
            const char* ahead = reinterpret_cast<const char*>(kc + idx[l0 + 32 + j] * slot_stride + kh0 * head_stride);
            for (int64_t c = 0; c < HP * head_stride * 2; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
          }
          for (int64_t p = 0; p < HP; ++p) {
            __m512bh kv[NV];
            for (int64_t v = 0; v < NV; ++v) kv[v] = (__m512bh)_mm512_loadu_si512(row + p * head_stride + 32 * v);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t h = p * G + g;
              __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[h * NV], kv[0]);
              for (int64_t v = 1; v < NV; ++v) a = _mm512_dpbf16_ps(a, qv[h * NV + v], kv[v]);
              part[h * 16 + j] = a;
            }
          }
        }
        __mmask16 seen = 0;
        for (int64_t j = 0; j < n; ++j) seen |= static_cast<__mmask16>(attend[l0 + j]) << j;
        for (int64_t h = 0; h < NH; ++h) {
          const __m512 sc = _mm512_mul_ps(sum16(part.data() + h * 16), _mm512_set1_ps(scale));
          _mm512_storeu_ps(scores.data() + h * LP + l0, _mm512_mask_mov_ps(ninf, seen, sc));
        }
      }
      for (int64_t l = (L + 15) / 16 * 16; l < LP; l += 16)  // a last half block of 32: no keys
        for (int64_t h = 0; h < NH; ++h) _mm512_storeu_ps(scores.data() + h * LP + l, ninf);
      for (int64_t h = 0; h < NH; ++h) {  // softmax weights, unnormalised, rounded to bf16 pairs
        float* sg = scores.data() + h * LP;
        __m512 mx = ninf;
        for (int64_t l = 0; l < LP; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + l));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t l = 0; l < LP; l += 32) {
          const __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + l), m));
          const __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + l + 16), m));
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
          _mm512_storeu_si512(weights.data() + h * LP + l, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        const float total = _mm512_reduce_add_ps(sum);
        inv[h] = total > 0.f ? 1.f / total : 0.f;
      }
      // weights times values (weighted_values): one KV head and up to 8 of its query heads a pass,
      // so the accumulators stay in registers; the first pass prefetches whole slot rows
      const uint32_t* wpairs = reinterpret_cast<const uint32_t*>(weights.data());
      for (int64_t p = 0; p < HP; ++p)
        for (int64_t g0 = 0; g0 < G; g0 += 8) {
          const int64_t h0 = p * G + g0;
          const ValuesPass pass{vc + kh0 * head_stride + p * head_stride, idx, attend, L, slot_stride,
                                p == 0 && g0 == 0 ? HP * head_stride * 2 : 0, wpairs + h0 * LP / 2, LP / 2,
                                inv.data() + h0, zero_row, out + (r * H + kh0 * G + h0) * D};
          switch (std::min<int64_t>(8, G - g0)) {
            case 1: weighted_values<D, 1>(pass); break;
            case 2: weighted_values<D, 2>(pass); break;
            case 3: weighted_values<D, 3>(pass); break;
            case 4: weighted_values<D, 4>(pass); break;
            case 5: weighted_values<D, 5>(pass); break;
            case 6: weighted_values<D, 6>(pass); break;
            case 7: weighted_values<D, 7>(pass); break;
            default: weighted_values<D, 8>(pass); break;
          }
        }
    }
  });
}
#endif

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_index, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [R, H, D], caches [N, KH, D]");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(2) == 1, "caches: same strides, D contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must have one dtype");
  TORCH_CHECK((kv_index.scalar_type() == at::kLong || kv_index.scalar_type() == at::kInt) &&
              mask.scalar_type() == at::kBool, "kv_index int64 or int32, mask bool");
  const auto qc = q.contiguous();
  const auto idx = kv_index.to(at::kLong).contiguous();
  const auto m = mask.reshape(kv_index.sizes()).contiguous();
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), KH = k_cache.size(1), L = idx.size(1);
  TORCH_CHECK(H % KH == 0 && k_cache.size(2) == D && idx.size(0) == R && m.sizes() == idx.sizes(),
              "shapes do not match");
  auto out = at::empty({R, H, D}, q.options());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  auto run = [&](auto tag, auto ds) {
    using T = decltype(tag);
    decode<T, decltype(ds)::value>(qc.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                                   idx.data_ptr<int64_t>(), m.data_ptr<bool>(), out.data_ptr<T>(), R, H, KH, D, L,
                                   k_cache.stride(0), k_cache.stride(1), static_cast<float>(scale));
  };
  auto by_dim = [&](auto tag) {
    if (D == 64) run(tag, std::integral_constant<int64_t, 64>{});
    else if (D == 128) run(tag, std::integral_constant<int64_t, 128>{});
    else run(tag, std::integral_constant<int64_t, 0>{});
  };
#if defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16 && (D == 64 || D == 128)) {
    auto fast = [&](auto ds) {
      decode_bf16<decltype(ds)::value>(
          reinterpret_cast<const uint16_t*>(qc.data_ptr()), reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
          reinterpret_cast<const uint16_t*>(v_cache.data_ptr()), idx.data_ptr<int64_t>(), m.data_ptr<bool>(),
          reinterpret_cast<uint16_t*>(out.data_ptr()), R, H, KH, L, k_cache.stride(0), k_cache.stride(1),
          static_cast<float>(scale));
    };
    if (D == 64) fast(std::integral_constant<int64_t, 64>{});
    else fast(std::integral_constant<int64_t, 128>{});
    return out;
  }
#endif
  if (q.scalar_type() == at::kFloat) by_dim(float{});
  else by_dim(c10::BFloat16{});
  return out;
}

}  // namespace

TORCH_LIBRARY(kestrel_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_index, Tensor mask, "
        "float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
"""


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the op; False where it cannot be built (callers keep their torch path)."""
    if os.environ.get("KESTREL_CPU_ATTENTION", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        from kestrel.kernels import cpu_amx_gemm, cpu_bf16_gemm, cpu_linear, cpu_prefill_attention

        sources = [_SOURCE, cpu_prefill_attention.SOURCE, cpu_bf16_gemm.SOURCE, cpu_linear.SOURCE, cpu_amx_gemm.SOURCE]
        cflags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
        # One build folder per CPU kind and per source text: two checkouts (or a test run beside an edit)
        # with different kernels never rebuild over each other's library.
        digest = hashlib.sha1("\0".join(sources + cflags).encode()).hexdigest()[:8]
        name = f"kestrel_cpu_attention_{_isa_tag()}_{digest}"
        _clear_stale_lock(name)
        load_inline(name, cpp_sources=sources,
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, ...: the torch path stays
        logger.warning("CPU decode-attention kernel unavailable (%s); using the torch path", e)
        return False

    @torch.library.register_fake("kestrel_cpu::decode_attention")
    def _(q, k_cache, v_cache, kv_index, mask, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return True


_STALE_LOCK_S = 600.0
"""A build takes ~40 s; a lock older than this is a killed build's, and torch's loader would wait on it forever."""


def _clear_stale_lock(name: str) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return  # no lock: nobody is building
    if age > _STALE_LOCK_S:
        logger.warning("removing a stale build lock (%.0f s old, a killed build's): %s", age, lock)
        try:
            os.remove(lock)
        except OSError:
            pass


def _isa_tag() -> str:
    """A short hash of the CPU's feature flags: the build uses -march=native, so a cache directory shared by
    different CPUs must not hand one's build to another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor,
                     mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [R, H, D]; caches [N, KH, D]; kv_index [R, L] int64 or int32 slots; mask [R, L] (or [R, 1, 1, L]) bool,
    True = attend, at least one per row -> [R, H, D] in q's dtype; scale 1/sqrt(D) unless given. Needs `load()`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.kestrel_cpu.decode_attention(q, k_cache, v_cache, kv_index, mask, scale)
