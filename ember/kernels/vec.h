// Small fp32 vector helpers over rows as stored (bf16 or fp32) for the attention variants (latent.cpp,
// variants.cpp): eight lanes with AVX2 + FMA, plain loops otherwise.
#pragma once

#include "common.h"

#if !defined(EMBER_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMBER_VEC_SIMD 1
#endif

namespace ember_vec {

using ember_common::bf16_to_f32;
using ember_common::f32_to_bf16;

inline float to_f(uint16_t h) { return bf16_to_f32(h); }
inline float to_f(float f) { return f; }
inline float round_as(float v, uint16_t) { return bf16_to_f32(f32_to_bf16(v)); }
inline float round_as(float v, float) { return v; }
inline void put(uint16_t* p, float v) { *p = f32_to_bf16(v); }
inline void put(float* p, float v) { *p = v; }

#ifdef EMBER_VEC_SIMD
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// a (n, fp32) . b (n, as stored) in fp32.
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef EMBER_VEC_SIMD
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
  s = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; i < n; i++) s += a[i] * to_f(b[i]);
  return s;
}

// y (n, fp32) += s * b (n, as stored).
template <typename T>
void axpy(float* y, float s, const T* b, int64_t n) {
  int64_t i = 0;
#ifdef EMBER_VEC_SIMD
  const __m256 sv = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(sv, load8(b + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; i++) y[i] += s * to_f(b[i]);
}

}  // namespace ember_vec
