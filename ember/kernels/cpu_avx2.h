// AVX2 + FMA row kernels (no AVX512): dense, int8 activations, 4-bit.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_base.h"

namespace {
// ============================================================================ AVX2 + FMA (no AVX512)
// CPUs without AVX512 (AMD Zen 2/3, Intel client cores): the same blocking as the AVX512 kernels on 8-lane
// vectors. bf16 has no dot-product instruction here: each 32-bit word of bf16 weights is split into its two
// values as fp32 (even = word << 16, odd = word & 0xFFFF0000) and the activations the same way, two FMAs.
// int8/int4/NF4 with bf16 activations take int8 activations (as with VNNI) multiplied by vpmaddubsw (u8 x s8
// pairs summed to s16, which saturates: every pair is kept below 32767) and vpmaddwd to int32:
//   int8: |w| (u8, 0..128) x sign(xq, w) (s8): pairs <= 2 * 128 * 127;
//   int4: q (0..15) x xq, the two nibble halves summed in s16 (<= 4 * 15 * 127) before one vpmaddwd;
//   nf4:  64 + round(63 c) (1..127) x xq; the code book is rounded to 1/63 (not 1/127 as with VNNI) so
//         that u8 x s8 pairs stay below 32767 (<= 2 * 127 * 127); the 64 * sum(xq) it adds is taken off.
#ifdef EMBER_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 bf16 values at p as fp32: the 8 even-indexed ones and the 8 odd-indexed ones.
inline void bf16_pairs(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 8 bf16 values at p as fp32, in order.
inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// The fp32 kernels' accumulators: per (weight row, activation row) one vector, two with one activation row so
// consecutive FMAs do not wait on each other.
template <int NM, int A>
inline void zero_acc8(__m256 (&acc)[R][NM][A]) {
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++)
      for (int a = 0; a < A; a++) acc[r][m][a] = _mm256_setzero_ps();
}

template <int NM, int A>
inline void reduce_acc8(__m256 (&acc)[R][NM][A], float* out) {
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = hsum8(A == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);
}

// NM (1 or 2) activation rows; 32 weights per row per step (one 64-byte line, one prefetch).
template <int NM>
inline void dense_bf16_avx2(const uint16_t* const* w, const uint16_t* X, int64_t I, float* out) {
  constexpr int A = NM == 1 ? 2 : 1;
  __m256 acc[R][NM][A];
  zero_acc8(acc);
  for (int64_t k = 0; k < I; k += 32) {
    for (int r = 0; r < R; r++) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + PF_DENSE, PF_HINT);
    for (int h = 0; h < 32; h += 16) {
      __m256 xe[NM], xo[NM];
      for (int m = 0; m < NM; m++) bf16_pairs(X + m * I + k + h, xe[m], xo[m]);
      for (int r = 0; r < R; r++) {
        __m256 we, wo;
        bf16_pairs(w[r] + k + h, we, wo);
        for (int m = 0; m < NM; m++) {
          acc[r][m][0] = _mm256_fmadd_ps(we, xe[m], acc[r][m][0]);
          acc[r][m][A - 1] = _mm256_fmadd_ps(wo, xo[m], acc[r][m][A - 1]);
        }
      }
    }
  }
  reduce_acc8(acc, out);
}

// 16 weights as fp32 (two vectors): fp32 rows as they are, int8 codes converted (exact).
inline void load16_f32(const float* p, __m256& w0, __m256& w1) { w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8); }
inline void load16_f32(const int8_t* p, __m256& w0, __m256& w1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
}

// fp32 or int8 weights times fp32 activations (exact against the dequantized weight), 16 weights per row per step;
// one prefetch per 64-byte line, the same offset of the row 4 rows ahead.
template <int NM, typename T>
inline void f32_rows_avx2(const T* const* w, const float* X, int64_t I, float* out) {
  constexpr int A = NM == 1 ? 2 : 1;
  constexpr int64_t line = 64 / sizeof(T);  // weights per cache line
  __m256 acc[R][NM][A];
  zero_acc8(acc);
  for (int64_t k = 0; k < I; k += 16) {
    for (int r = 0; r < R; r++) {
      if (k % line == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + 4 * I), PF_HINT);
      __m256 w0, w1;
      load16_f32(w[r] + k, w0, w1);
      for (int m = 0; m < NM; m++) {
        acc[r][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * I + k), acc[r][m][0]);
        acc[r][m][A - 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * I + k + 8), acc[r][m][A - 1]);
      }
    }
  }
  reduce_acc8(acc, out);
}

// kern(n, m) for activation rows m, m + n - 1, n = 2 (std::integral_constant) while two are left, then 1: the
// AVX2 kernels hold one or two activation rows in registers (more would spill their accumulators).
template <typename F>
inline void in_pairs(int nm, F&& kern) {
  for (int m = 0; m < nm; m += 2)
    if (nm - m >= 2) kern(std::integral_constant<int, 2>{}, m);
    else kern(std::integral_constant<int, 1>{}, m);
}

// 32 int32 (a, b, c, d: 8 each, |v| <= 127) -> 32 int8 in order.
inline __m256i pack32_epi8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// bf16 activation rows quantized to int8 per 128-value step as quantize_x8 does (sx = max|x| / 127, nearest-even),
// order 0: values in place; 2: each 64 values as their 32 even ones, then their 32 odd ones (the low and high
// nibbles of one 32-byte load of 4-bit codes). qsum (M, I / group) += sum of xq per group; xsum, where not null,
// (M, I / group) += sum of x per group.
void quantize_x8_avx2(const uint16_t* X, int64_t M, int64_t I, int order, int64_t group, int8_t* xq, float* sx,
                      float* qsum, float* xsum) {
  const int64_t S = I / 128, G = I / group;
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < S; c++) {
      const uint16_t* src = X + m * I + c * 128;
      __m256 f[16];  // order 0: values 8k..8k+7; order 2: vector 8h + 4p + k = 16-value piece k of half h, p 0 even 1 odd
      for (int k = 0; k < 16; k++) {
        if (order == 0) f[k] = bf16x8(src + 8 * k);
        else if (k % 8 < 4) bf16_pairs(src + 64 * (k / 8) + 16 * (k % 4), f[k], f[k + 4]);
      }
      __m256 amax = _mm256_setzero_ps();
      const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      for (int k = 0; k < 16; k++) amax = _mm256_max_ps(amax, _mm256_and_ps(f[k], nosign));
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      const float a = _mm_cvtss_f32(_mm_max_ss(a4, _mm_movehdup_ps(a4)));
      const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
      sx[m * S + c] = a / 127.f;
      __m256i q[16];
      for (int k = 0; k < 16; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(f[k], inv));  // MXCSR: nearest-even
      int8_t* dst = xq + m * I + c * 128;
      for (int k = 0; k < 16; k += 4)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8 * k), pack32_epi8(q[k], q[k + 1], q[k + 2], q[k + 3]));
      for (int k = 0; k < 16; k++) {
        // the value index of vector k's first value, for its group (a 16-value piece lies in one group, group >= 32)
        const int64_t v = c * 128 + (order == 0 ? 8 * k : 64 * (k / 8) + 16 * (k % 4));
        const int64_t g = m * G + v / group;
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(q[k]), _mm256_extracti128_si256(q[k], 1));
        s = _mm_hadd_epi32(s, s);
        qsum[g] += static_cast<float>(_mm_cvtsi128_si32(_mm_hadd_epi32(s, s)));
        if (xsum) xsum[g] += hsum8(f[k]);
      }
    }
}

// int8 weights x NM activation rows quantized in natural order: per 32 codes vpmaddubsw(|w|, sign(xq, w)),
// vpmaddwd to int32, summed over the 128-value step, then one FMA with the step's sx.
template <int NM>
inline void int8_q8_avx2(const int8_t* const* w, const int8_t* Xq, const float* sx, int64_t I, float* out) {
  const int64_t S = I / 128;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < S; c++) {
    for (int r = 0; r < R; r++) {
      const int8_t* wp = w[r] + c * 128;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_I8_VNNI, PF_I8_HINT);
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_I8_VNNI + 64, PF_I8_HINT);
      __m256i d[NM];
      for (int m = 0; m < NM; m++) d[m] = _mm256_setzero_si256();
      for (int h = 0; h < 4; h++) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * h));
        const __m256i av = _mm256_abs_epi8(v);
        for (int m = 0; m < NM; m++) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Xq + m * I + c * 128 + 32 * h));
          d[m] = _mm256_add_epi32(d[m], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(x, v)), ones));
        }
      }
      for (int m = 0; m < NM; m++)
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), _mm256_set1_ps(sx[m * S + c]), acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = hsum8(acc[r][m]);
}

// 4-bit codes x activations quantized in order 2: per 32-byte load (64 values), vpmaddubsw(high nibbles, even xq)
// and (low nibbles, odd xq). int32 lane t of the result holds values 8t..8t+7 of the 64, so with group 32 lanes
// 0-3 and 4-7 take different scales. Per group g the rest of (q - offset) s + z is added at the end, as in
// q4_vnni: z * sum(x) - s sx * offset * sum(xq) (zt: (M, 2G)). With one activation row the block's scales are
// multiplied by sx first (st is the block's own scratch).
template <int RR, int NM, int MODE>
inline void q4_q8_avx2(const uint8_t* const* w, float* st, const int8_t* Xq, const float* sx, const float* zt,
                       int64_t I, int64_t group, const __m256i tq, float* out) {
  const int64_t G = I / group, S = I / 128;
  // shifts, not divisions, in the loops: a 64-bit divide per group or step cost more than the step's arithmetic
  const int step_shift = group == 128 ? 0 : group == 64 ? 1 : 2;  // group g lies in step g >> step_shift
  if (NM == 1)
    for (int r = 0; r < RR; r++)
      for (int64_t g = 0; g < G; g++) st[r * 2 * G + g] *= sx[g >> step_shift];
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[RR][NM];
  for (int r = 0; r < RR; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < S; c++) {  // 128-value steps: 64 code bytes per row, two 64-value chunks
    for (int r = 0; r < RR; r++) {
      const uint8_t* wp = w[r] + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_Q4_AVX2, PF_Q4_HINT);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
      __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
      __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
      if (MODE == 1) {
        lo0 = _mm256_shuffle_epi8(tq, lo0), hi0 = _mm256_shuffle_epi8(tq, hi0);
        lo1 = _mm256_shuffle_epi8(tq, lo1), hi1 = _mm256_shuffle_epi8(tq, hi1);
      }
      const float* sc = st + r * 2 * G;
      __m256 s0, s1;  // the scales of the two chunks' int32 lanes (group 128: s0 for both)
      if (group == 128) {
        s0 = s1 = _mm256_set1_ps(sc[c]);
      } else if (group == 64) {
        s0 = _mm256_set1_ps(sc[2 * c]), s1 = _mm256_set1_ps(sc[2 * c + 1]);
      } else {
        s0 = _mm256_setr_m128(_mm_set1_ps(sc[4 * c]), _mm_set1_ps(sc[4 * c + 1]));
        s1 = _mm256_setr_m128(_mm_set1_ps(sc[4 * c + 2]), _mm_set1_ps(sc[4 * c + 3]));
      }
      for (int m = 0; m < NM; m++) {
        const __m256i* x = reinterpret_cast<const __m256i*>(Xq + m * I + c * 128);
        const __m256i xe0 = _mm256_loadu_si256(x), xo0 = _mm256_loadu_si256(x + 1);
        const __m256i xe1 = _mm256_loadu_si256(x + 2), xo1 = _mm256_loadu_si256(x + 3);
        const __m256 t0 = NM == 1 ? s0 : _mm256_mul_ps(s0, _mm256_set1_ps(sx[m * S + c]));
        const __m256 t1 = NM == 1 ? s1 : _mm256_mul_ps(s1, _mm256_set1_ps(sx[m * S + c]));
        __m256i d0, d1;
        if (MODE == 0) {
          const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(hi0, xe0), _mm256_maddubs_epi16(lo0, xo0));
          const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(hi1, xe1), _mm256_maddubs_epi16(lo1, xo1));
          if (group == 128) {  // one scale for the step: the s16 sums added first (<= 8 * 15 * 127)
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones)), t0,
                                        acc[r][m]);
            continue;
          }
          d0 = _mm256_madd_epi16(p0, ones), d1 = _mm256_madd_epi16(p1, ones);
        } else {
          d0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi0, xe0), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(lo0, xo0), ones));
          d1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi1, xe1), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(lo1, xo1), ones));
        }
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), t1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), t0, acc[r][m]));
      }
    }
  }
  for (int r = 0; r < RR; r++) {
    const float* sc = st + r * 2 * G;
    const float* zr = sc + G;
    for (int m = 0; m < NM; m++) {
      const float* xs = zt + m * 2 * G;
      __m256 z = _mm256_setzero_ps();
      int64_t g = 0;
      if (NM == 1)
        for (; g + 8 <= G; g += 8) {
          z = _mm256_fmadd_ps(_mm256_loadu_ps(zr + g), _mm256_loadu_ps(xs + g), z);
          z = _mm256_fnmadd_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(xs + G + g), z);
        }
      float t = hsum8(_mm256_add_ps(acc[r][m], z));
      for (; g < G; g++) t += zr[g] * xs[g] - sc[g] * (NM == 1 ? 1.f : sx[m * S + (g >> step_shift)]) * xs[G + g];
      out[r * MB + m] = t;
    }
  }
}

// int4 group 32, one activation row, R weight rows (decode), I % 256 == 0. Per 256 values (two steps, 8 groups)
// the four 64-value chunks' int32 lane sums (lanes 0-3 / 4-7: one group each) are reduced by three vphaddd to one
// sum per group, in group order 0 2 4 6 1 3 5 7, and scaled by one FMA: the 8 group scales (permuted to match)
// times the two steps' sx. Per 32 values this is a quarter of q4_q8_avx2's conversions and FMAs, and no per-group
// scalar pass multiplies the scales by sx first. st as block_stats leaves it (not multiplied by sx).
inline void q4_q8_avx2_g32(const uint8_t* const* w, const float* st, const int8_t* Xq, const float* sx,
                           const float* zt, int64_t I, float* out) {
  const int64_t G = I / 32, S = I / 128;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < S; c += 2) {
    const __m128 sx2 = _mm_setr_ps(sx[c], sx[c], sx[c + 1], sx[c + 1]);
    const __m256 sxv = _mm256_setr_m128(sx2, sx2);  // the step of each lane's group
    const __m256i* x = reinterpret_cast<const __m256i*>(Xq + c * 128);
    for (int r = 0; r < R; r++) {
      const uint8_t* wp = w[r] + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_Q4_AVX2, PF_Q4_HINT);
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_Q4_AVX2 + 64, PF_Q4_HINT);
      __m256i d[4];
      for (int h = 0; h < 4; h++) {  // chunk h: high nibbles x even activations, low x odd (order 2)
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * h));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        d[h] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(x + 2 * h)),
                                                  _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x + 2 * h + 1))), ones);
      }
      const __m256i isum = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
      const __m256 sc = _mm256_permutevar8x32_ps(_mm256_loadu_ps(st + r * 2 * G + 4 * c), perm);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(sc, sxv), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {  // per group z sum(x) - s sx offset sum(xq), as in q4_q8_avx2
    const float* sc = st + r * 2 * G;
    const float* zr = sc + G;
    __m256 z = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g += 8) {
      const __m256 sxg = _mm256_setr_m128(_mm_set1_ps(sx[g / 4]), _mm_set1_ps(sx[g / 4 + 1]));
      z = _mm256_fmadd_ps(_mm256_loadu_ps(zr + g), _mm256_loadu_ps(zt + g), z);
      z = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), sxg), _mm256_loadu_ps(zt + G + g), z);
    }
    out[r * MB] = hsum8(_mm256_add_ps(acc[r], z));
  }
}
#endif

}  // namespace
