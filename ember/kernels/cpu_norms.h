// Element-wise helpers of the decoder blocks: dtype rounding, exp, RMSNorm / RoPE rows, SiLU / GELU products,
// soft-capping.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "common.h"
#include "cpu_api.h"

namespace {

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<float>(float v) { return v; }
template <>
inline float to_float<uint16_t>(uint16_t v) { return bf16_to_f32(v); }

// e^x (for softmax after the max is subtracted, x <= 0; for silu, any x): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, Cephes'
// degree-7 polynomial; relative error about 1e-7. Branch-free so that the callers' loops vectorize.
inline float exp_clamped(float x) {  // any x, clamped to [-87, 88] (2^n stays a normal float)
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
inline float exp_nonpos(float x) { return exp_clamped(x); }

#ifdef EMBER_X86
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

#endif
inline float round_to_dtype(float v, int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
inline float round_to(float v, uint16_t) { return bf16_to_f32(f32_to_bf16(v)); }
inline float round_to(float v, float) { return v; }
inline void put(uint16_t* p, float v) { *p = f32_to_bf16(v); }
inline void put(float* p, float v) { *p = v; }

// x += y, rounded to the dtype as PyTorch's add
template <typename T>
void add_rows(T* x, const T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) put(x + i, to_float(x[i]) + to_float(y[i]));
}

#ifdef EMBER_X86
// exp_clamped on 16 lanes: the same operations in the same order (no fused multiply-adds), so the same bits.
inline __m512 exp16_clamped(__m512 x) {
  const auto c = [](float v) { return _mm512_set1_ps(v); };
  x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, c(-87.f), _CMP_LT_OQ), x, c(-87.f));  // NaN stays NaN, as there
  x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, c(88.f), _CMP_GT_OQ), x, c(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(x, c(1.44269504088896341f)), c(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, c(0.693359375f))), _mm512_mul_ps(n, c(2.12194440e-4f)));
  __m512 p = c(1.9875691500e-4f);
  for (const float k : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_add_ps(_mm512_mul_ps(p, r), c(k));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), c(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// 16 values rounded as f32_to_bf16 (nearest-even; a NaN made quiet), kept as fp32.
inline __m512 round16_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i even = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), even);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512 round16(__m512 v, float) { return v; }
inline __m512 round16(__m512 v, uint16_t) { return round16_bf16(v); }
inline void store_rounded16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_rounded16(uint16_t* p, __m512 v) {  // v already rounded (round16_bf16, NaNs as f32_to_bf16 makes
  // them; vcvtneps2bf16 would quiet them its own way): its upper halves
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif

#ifdef EMBER_AVX2
// exp_clamped and the bf16 rounding on 8 lanes (AVX2 builds): the same operations in the same order, so the same
// bits as the scalar forms (f32_to_bf16's NaN kept quiet as there).
inline __m256 exp8_clamped(__m256 x) {
  const auto c = [](float v) { return _mm256_set1_ps(v); };
  x = _mm256_blendv_ps(x, c(-87.f), _mm256_cmp_ps(x, c(-87.f), _CMP_LT_OQ));  // NaN stays NaN, as there
  x = _mm256_blendv_ps(x, c(88.f), _mm256_cmp_ps(x, c(88.f), _CMP_GT_OQ));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, c(1.44269504088896341f)), c(0.5f)));
  const __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, c(0.693359375f))), _mm256_mul_ps(n, c(2.12194440e-4f)));
  __m256 p = c(1.9875691500e-4f);
  for (const float k : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(k));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 round8(__m256 v, float) { return v; }
inline __m256 round8(__m256 v, uint16_t) {  // f32_to_bf16 and back, kept as fp32
  const __m256i u = _mm256_castps_si256(v), m = _mm256_set1_epi32(0x7fffffff);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, m), _mm256_set1_epi32(0x7f800000));
  const __m256i even = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_blendv_epi8(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), even),
                                       _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void store_rounded8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store_rounded8(uint16_t* p, __m256 v) {  // v already rounded (round8): its upper halves
  const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
#endif

// One row of ember_rms_norm, 16 values at a time where the build has AVX512 (the scalar loop's double sum does
// not vectorize; it runs twice per layer in every decode step).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t H, float eps) {
  double ss = 0.0;
  int64_t k = 0;
#ifdef EMBER_X86
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (; k + 16 <= H; k += 16) {
    const __m512 v = load16f(x + k);
    const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    lo = _mm512_fmadd_pd(a, a, lo), hi = _mm512_fmadd_pd(b, b, hi);  // products exact: fused or not, the same
  }
  ss = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
#endif
  for (int64_t j = k; j < H; j++) ss += static_cast<double>(to_float(x[j])) * to_float(x[j]);
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
  k = 0;
#ifdef EMBER_X86
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; k + 16 <= H; k += 16) {
    const __m512 h = round16(_mm512_mul_ps(load16f(x + k), vinv), T{});
    store_rounded16(out + k, round16(_mm512_mul_ps(load16f(w + k), h), T{}));
  }
#endif
  for (; k < H; k++) put(out + k, to_float(w[k]) * round_to(to_float(x[k]) * inv, T{}));
}

// One head of ember_rope in place: x[k] = x[k] * cos[k] + rot[k] * sin[k], rot = (-x[half:], x[:half]), each
// product and the sum rounded to T; 16 pairs at a time where the build has AVX512 and half is a multiple of 16.
template <typename T>
void rope_head(T* x, const T* cos, const T* sin, int64_t hd) {
  const int64_t half = hd / 2;
  int64_t k = 0;
#ifdef EMBER_X86
  if (half % 16 == 0)
    for (; k < half; k += 16) {
      const __m512 x1 = load16f(x + k), x2 = load16f(x + k + half);
      const __m512 neg2 =
          _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
      const __m512 a = round16(_mm512_mul_ps(x1, load16f(cos + k)), T{});
      const __m512 b = round16(_mm512_mul_ps(neg2, load16f(sin + k)), T{});
      const __m512 c = round16(_mm512_mul_ps(x2, load16f(cos + k + half)), T{});
      const __m512 d = round16(_mm512_mul_ps(x1, load16f(sin + k + half)), T{});
      store_rounded16(x + k, round16(_mm512_add_ps(a, b), T{}));
      store_rounded16(x + k + half, round16(_mm512_add_ps(c, d), T{}));
    }
#endif
  for (; k < half; k++) {
    const float x1 = to_float(x[k]), x2 = to_float(x[k + half]);
    put(x + k, round_to(round_to(x1 * to_float(cos[k]), T{}) + round_to(-x2 * to_float(sin[k]), T{}), T{}));
    const float c = round_to(x2 * to_float(cos[k + half]), T{}), d = round_to(x1 * to_float(sin[k + half]), T{});
    put(x + k + half, round_to(c + d, T{}));
  }
}

// g = silu(g) * u as PyTorch computes F.silu(g) * u: silu in fp32 (g / (1 + e^-g)), rounded to the dtype, then
// the product rounded. e^-g from exp_clamped's polynomial, 16 lanes at a time where the build has AVX512, 8 with
// AVX2 (the scalar loop does not vectorize), the same bits either way.
template <typename T>
void silu_mul(T* g, const T* u, int64_t n) {
  int64_t i = 0;
#ifdef EMBER_X86
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16f(g + i);
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
    const __m512 s = round16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp16_clamped(neg))), T{});
    store_rounded16(g + i, round16(_mm512_mul_ps(s, load16f(u + i)), T{}));
  }
#elif defined(EMBER_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m256 x = load8f(g + i);
    const __m256 neg = _mm256_xor_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN)));
    const __m256 s = round8(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8_clamped(neg))), T{});
    store_rounded8(g + i, round8(_mm256_mul_ps(s, load8f(u + i)), T{}));
  }
#endif
  for (; i < n; i++) {
    const float x = to_float(g[i]);
    put(g + i, round_to(x / (1.f + exp_clamped(-x)), T{}) * to_float(u[i]));
  }
}

// One row of Gemma's RMSNorm: out = (x * inv) * (add + w), all in fp32, rounded once to T (HF's Gemma3RMSNorm with
// add 1; Nemotron-H's, whose weight multiplies in fp32, with add 0).
template <typename T>
void rms_norm_offset_row(const T* x, const T* w, T* out, int64_t H, float eps, float add) {
  double ss = 0.0;
  for (int64_t j = 0; j < H; j++) ss += static_cast<double>(to_float(x[j])) * to_float(x[j]);
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
  int64_t k = 0;
#ifdef EMBER_X86
  const __m512 vinv = _mm512_set1_ps(inv), one = _mm512_set1_ps(add);
  for (; k + 16 <= H; k += 16)
    store_rounded16(out + k, round16(_mm512_mul_ps(_mm512_mul_ps(load16f(x + k), vinv),
                                                   _mm512_add_ps(one, load16f(w + k))), T{}));
#endif
  for (; k < H; k++) put(out + k, (to_float(x[k]) * inv) * (add + to_float(w[k])));
}

// y (n,) = cap * tanh(y / cap) in place, the quotient, the tanh and the product each rounded to T (HF's Gemma
// final-logit soft-capping in the model dtype).
template <typename T>
void softcap_values(T* y, int64_t n, float cap) {
  for (int64_t k = 0; k < n; k++) {
    T q, t;
    put(&q, to_float(y[k]) / cap);
    put(&t, std::tanh(to_float(q)));
    put(y + k, to_float(t) * cap);
  }
}

// rows x (rows, H) in place divided by their RMS (fp32, one rounding: Gemma 4's weightless value norm).
template <typename T>
void rms_unweighted_rows(T* x, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    T* row = x + r * H;
    double ss = 0.0;
    for (int64_t j = 0; j < H; j++) ss += static_cast<double>(to_float(row[j])) * to_float(row[j]);
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
    for (int64_t j = 0; j < H; j++) put(row + j, to_float(row[j]) * inv);
  }
}

// rows x (rows, H) normed into out (may be x): Llama's RMSNorm (offset 0), Gemma's (1 + w) one (offset 1), or the
// fp32 weight product rounded once (offset 2: Nemotron-H's).
void norm_rows(const void* x, const void* w, void* out, int64_t rows, int64_t H, float eps, int64_t offset,
               int is_bf16) {
  if (!offset) {
    ember_rms_norm(x, w, out, rows, H, eps, is_bf16, 1);
    return;
  }
  for (int64_t r = 0; r < rows; r++) {
    if (is_bf16)
      rms_norm_offset_row(static_cast<const uint16_t*>(x) + r * H, static_cast<const uint16_t*>(w),
                          static_cast<uint16_t*>(out) + r * H, H, eps, offset == 1 ? 1.f : 0.f);
    else
      rms_norm_offset_row(static_cast<const float*>(x) + r * H, static_cast<const float*>(w),
                          static_cast<float*>(out) + r * H, H, eps, offset == 1 ? 1.f : 0.f);
  }
}

// g = gelu_tanh(g) * u as PyTorch computes F.gelu(g, approximate="tanh") * u: the GELU in fp32,
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), rounded to the dtype, then the product rounded. tanh(v) as
// 1 - 2 / (1 + e^(2v)) from exp_clamped's polynomial (the same bits on 16 lanes and in the scalar tail).
template <typename T>
void gelu_tanh_mul(T* g, const T* u, int64_t n) {
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  int64_t i = 0;
#ifdef EMBER_X86
  const auto c = [](float v) { return _mm512_set1_ps(v); };
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16f(g + i);
    const __m512 inner = _mm512_mul_ps(c(beta), _mm512_add_ps(x, _mm512_mul_ps(c(kappa), _mm512_mul_ps(_mm512_mul_ps(x, x), x))));
    const __m512 t = _mm512_sub_ps(c(1.f), _mm512_div_ps(c(2.f), _mm512_add_ps(c(1.f), exp16_clamped(_mm512_add_ps(inner, inner)))));
    const __m512 s = round16(_mm512_mul_ps(_mm512_mul_ps(c(0.5f), x), _mm512_add_ps(c(1.f), t)), T{});
    store_rounded16(g + i, round16(_mm512_mul_ps(s, load16f(u + i)), T{}));
  }
#endif
  for (; i < n; i++) {
    const float x = to_float(g[i]);
    const float inner = beta * (x + kappa * ((x * x) * x));
    const float t = 1.f - 2.f / (1.f + exp_clamped(inner + inner));
    put(g + i, round_to((0.5f * x) * (1.f + t), T{}) * to_float(u[i]));
  }
}

}  // namespace

