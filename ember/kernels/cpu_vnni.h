// int8-activation kernels (AVX512-VNNI) for int8 and 4-bit weights, the AVX2 fp32 4-bit kernel, and the row-block
// runners.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_avx512.h"

namespace {
// ============================================================================ int8 activations (VNNI)
#ifdef EMBER_VNNI
// bf16 activation rows quantized symmetrically to int8 per 128-value step: sx = max|x| / 127, xq = nearest-even
// (x * (127 / max|x|)), |xq| <= 127 (all zero when max|x| == 0). ``order`` 0 keeps the values in place;
// 1 stores each step's 64 even values, then its 64 odd ones (the int4 kernel's high / low nibbles).
// qsum (M, I / group) += the sum of xq over each group of ``group`` values (32, 64 or 128); xsum, where not
// null, (M, I / group) += the sum of x over each group.
void quantize_x8(const uint16_t* X, int64_t M, int64_t I, int order, int64_t group, int8_t* xq, float* sx,
                 float* qsum, float* xsum) {
  const int64_t S = I / 128, G = I / group;
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < S; c++) {
      const uint16_t* src = X + m * I + c * 128;
      __m512 f[8];
      int pos[8];  // where vector k's 16 values go in the step, and (as a value index) which group holds them
      for (int k = 0; k < 8; k++) {
        if (order == 0) {
          const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * k)));
          f[k] = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), pos[k] = 16 * k;
        } else {  // 32 values as 16 (even, odd) pairs: the even one in the low half of each 32-bit word
          const __m512i u = _mm512_loadu_si512(src + 32 * (k / 2));
          f[k] = _mm512_castsi512_ps(k % 2 == 0 ? _mm512_slli_epi32(u, 16) : _mm512_and_si512(u, hi16));
          pos[k] = k % 2 == 0 ? 16 * (k / 2) : 64 + 16 * (k / 2);
        }
      }
      __m512 amax = _mm512_abs_ps(f[0]);
      for (int k = 1; k < 8; k++) amax = _mm512_max_ps(amax, _mm512_abs_ps(f[k]));
      const float a = _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
      sx[m * S + c] = a / 127.f;
      int8_t* dst = xq + m * I + c * 128;
      for (int k = 0; k < 8; k++) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(f[k], inv));  // MXCSR default: nearest-even
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + pos[k]), _mm512_cvtsepi32_epi8(q));
        const int64_t g = m * G + (c * 128 + (order == 0 ? pos[k] : 32 * (k / 2))) / group;
        qsum[g] += static_cast<float>(_mm512_reduce_add_epi32(q));
        if (xsum) xsum[g] += _mm512_reduce_add_ps(f[k]);
      }
    }
}
#endif

#ifdef EMBER_VNNI

// Step c (128 values) of NM quantized activation rows: both 64-byte halves and the step's scale.
template <int NM>
inline void load_xq_step(const int8_t* Xq, const float* sx, int64_t I, int64_t c, __m512i* a, __m512i* b,
                         __m512* sv) {
  const int64_t S = I / 128;
  for (int m = 0; m < NM; m++) {
    a[m] = _mm512_loadu_si512(Xq + m * I + c * 128), b[m] = _mm512_loadu_si512(Xq + m * I + c * 128 + 64);
    sv[m] = _mm512_set1_ps(sx[m * S + c]);
  }
}

// int8 weights, NM activation rows quantized in natural order: sum_k (w + 128) xq per step by vpdpbusd on
// w ^ 0x80 (u8), scaled by the step's sx in fp32; the 128 * sum(xq) the flip adds is ``corr`` per row.
template <int NM>
inline void int8_vnni(const int8_t* const* w, const int8_t* Xq, const float* sx, const float* corr, int64_t I,
                      float* out) {
  const int64_t S = I / 128;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < S; c++) {
    __m512i xa[NM], xb[NM];
    __m512 sv[NM];
    load_xq_step<NM>(Xq, sx, I, c, xa, xb, sv);
    for (int r = 0; r < R; r++) {
      const int8_t* wp = w[r] + c * 128;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_I8_VNNI, PF_I8_HINT);
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_I8_VNNI + 64, PF_I8_HINT);
      const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(wp), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(wp + 64), flip);
      for (int m = 0; m < NM; m++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), v0, xa[m]), v1, xb[m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]) - corr[m];
}

// One 64-byte step of 4-bit codes of I-value rows (prefetching PF_Q4 on): the low and the high nibbles as bytes,
// NF4's looked up in tq.
// With AVX512-VBMI, NF4's lookups are vpermb on the bytes as loaded: vpermb reads an index's low 6 bits, and tq
// repeats its 16 entries four times, so the other nibble (or, after the 16-bit shift, the neighbour byte's low
// bits) never matters and the two masks go: 8 vector ops per 64 bytes instead of 10.
template <int MODE>
inline void q4_codes(const uint8_t* wp, int64_t I, const __m512i m4, const __m512i tq, __m512i& lo, __m512i& hi) {
  _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_Q4, PF_Q4_HINT);
  const __m512i v = load_once(wp);
#ifdef __AVX512VBMI__
  if (MODE == 1) {
    lo = _mm512_permutexvar_epi8(v, tq), hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), tq);
    return;
  }
#endif
  lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  if (MODE == 1) lo = _mm512_shuffle_epi8(tq, lo), hi = _mm512_shuffle_epi8(tq, hi);
}

// int4 codes (u8 nibbles 0..15) times activations quantized in the even/odd order: per 64-byte step
// vpdpbusd(low nibbles, odd xq) + vpdpbusd(high nibbles, even xq); lane t holds values 8t..8t+7 of the step,
// as in q4_bf16x128, so the per-lane group scale times the step's sx scales it. Per group g the rest of
// (q - 8) s + z is added in the epilogue: z * sum(x) - s sx * 8 sum(xq) (zt: (M, 2G) = sum(x), 8 sum(xq)).
// NF4 (MODE 1) looks each nibble up in ``tq`` (vpshufb, the 16 bytes in every 128-bit lane): 128 +
// round(127 c) for code-book value c, so its offset is 128 and sx arrives divided by 127.
// Batches (2-8 activation rows, one weight row a pass); one row (decode) takes q4_vnni_row.
template <int RR, int NM, int MODE>
inline void q4_vnni(const uint8_t* const* w, float* st, const int8_t* Xq, const float* sx, const float* zt,
                    int64_t I, int64_t group, const __m512i tq, float* out) {
  const int64_t G = I / group, S = I / 128, per_step = 128 / group;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[RR][NM];
  for (int r = 0; r < RR; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < S; c++) {
    __m512i xe[NM], xo[NM];
    __m512 sv[NM];
    load_xq_step<NM>(Xq, sx, I, c, xe, xo, sv);
    for (int r = 0; r < RR; r++) {
      __m512i lo, hi;
      q4_codes<MODE>(w[r] + c * 64, I, m4, tq, lo, hi);
      const __m512 s = step_scale(st + r * 2 * G, c, group);
      for (int m = 0; m < NM; m++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xo[m]), hi, xe[m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, sv[m]), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RR; r++) {
    const float* sc = st + r * 2 * G;
    const float* zr = sc + G;
    for (int m = 0; m < NM; m++) {
      const float* xs = zt + m * 2 * G;
      float z = 0.f;
      for (int64_t g = 0; g < G; g++) z += zr[g] * xs[g] - sc[g] * sx[m * S + g / per_step] * xs[G + g];
      out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]) + z;
    }
  }
}
#endif

#ifdef EMBER_VNNI
// t[idx] for 16 indices 0..255 of a 256-entry fp32 table held in 16 vectors: eight two-table permutes (the low 5
// bits) and a blend tree on bits 5-7 (NF4's double-quantized absmax codes): cheaper than a 16-lane gather.
inline __m512 lookup256(const __m512* t, __m512i idx) {
  __m512 r[8];
  for (int k = 0; k < 8; k++) r[k] = _mm512_permutex2var_ps(t[2 * k], idx, t[2 * k + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  const __m512 a0 = _mm512_mask_blend_ps(b5, r[0], r[1]), a1 = _mm512_mask_blend_ps(b5, r[2], r[3]);
  const __m512 a2 = _mm512_mask_blend_ps(b5, r[4], r[5]), a3 = _mm512_mask_blend_ps(b5, r[6], r[7]);
  return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, a0, a1), _mm512_mask_blend_ps(b6, a2, a3));
}

// NF4 double quantization's 256-entry dynamic map as four byte planes (plane k: byte k of every entry), the form
// dyn64 looks values up in (1 KB), made outside the parallel region and kept per thread while the map is the same.
inline void dyn_byte_planes(const float* dyn, uint8_t* planes) {
  for (int i = 0; i < 256; i++) {
    uint32_t u;
    std::memcpy(&u, dyn + i, 4);
    for (int k = 0; k < 4; k++) planes[k * 256 + i] = static_cast<uint8_t>(u >> (8 * k));
  }
}

// The map's values for 64 codes (u8 lanes of ``codes``), as four vectors of 16 fp32: out[j] lane e = the value of
// code 16 j + e. Per byte plane two two-table byte permutes (vpermi2b: 128 entries, the low 7 bits) and a blend on
// bit 7, then two rounds of byte/word unpacks put the four bytes of each value together. The unpacks work within
// 128-bit lanes (vector j, lane L, element e = input byte 16 L + 4 j + e), so the codes are first permuted to
// that order: 22 vector ops per 64 codes against lookup256's 18 per 16.
#ifdef __AVX512VBMI__
inline void dyn64(const __m512i* pl, __m512i codes, __m512* out) {
  alignas(64) static const uint8_t kOrder[64] = {0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
                                                  4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
                                                  8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
                                                  12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  const __m512i idx = _mm512_permutexvar_epi8(order, codes);
  const __mmask64 high = _mm512_movepi8_mask(idx);
  __m512i b[4];
  for (int k = 0; k < 4; k++)
    b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(pl[4 * k], idx, pl[4 * k + 1]),
                                  _mm512_permutex2var_epi8(pl[4 * k + 2], idx, pl[4 * k + 3]));
  const __m512i t0 = _mm512_unpacklo_epi8(b[0], b[1]), t1 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i t2 = _mm512_unpacklo_epi8(b[2], b[3]), t3 = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(t0, t2));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(t0, t2));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(t1, t3));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(t1, t3));
}
#endif

// The absmax of 16 double-quantized NF4 groups from global group index i on (lanes k), given their map values:
// dyn * scale2 of their block of 256 groups (16 groups straddle at most two) + offset.
inline __m512 dq_absmax16(const Q4Params& p, int64_t i, __mmask16 k, __m512 dyn) {
  const int64_t b0 = i >> 8;
  __m512 s2 = _mm512_set1_ps(p.am_scale2[b0]);
  if ((i & 255) > 240) {  // lanes from 256 - (i & 255) on (up to the last valid one) are in the next block
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 next = k & _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32(static_cast<int>(256 - (i & 255))));
    if (next) s2 = _mm512_mask_blend_ps(next, s2, _mm512_set1_ps(p.am_scale2[b0 + 1]));
  }
  return _mm512_maskz_mov_ps(k, _mm512_fmadd_ps(dyn, s2, _mm512_set1_ps(p.am_offset)));
}

#ifdef __AVX512VBMI__
// st[f] = absmax x sx of its group for the n = RB * G groups of RB consecutive rows, whose codes are consecutive from
// global group i0: looked up 64 at a time across row ends (a 2048-wide row has 32 groups: per row, half of each
// lookup would go unused). sxg_rep: the per-group sx repeated for each row.
inline void nf4_dq_block_scales(const Q4Params& p, int64_t i0, int64_t n, const __m512i* dyn_map, float* st) {
  __m512 dyn[4];
  for (int64_t f = 0; f < n; f += 16) {
    const __mmask16 k = lanes16(n - f);
    if (f % 64 == 0) {
      const int64_t m = std::min<int64_t>(64, n - f);
      const __mmask64 km = m >= 64 ? ~__mmask64(0) : (__mmask64(1) << m) - 1;
      dyn64(dyn_map, _mm512_maskz_loadu_epi8(km, p.am_code + i0 + f), dyn);
    }
    const __m512 s = dq_absmax16(p, i0 + f, k, dyn[(f / 16) % 4]);
    _mm512_mask_storeu_ps(st + f, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, p.sxg_rep + f)));
  }
}
#endif

// out[r] = the sum of a[r]'s 16 lanes for 8 vectors: halves added across the 8 (shuffles of 128-bit lanes), then
// within lanes; 23 ops where 8 _mm512_reduce_add_ps take about 64.
inline void hsum8x16(const __m512* a, float* out) {
  __m512 b[4], c[2];
  for (int i = 0; i < 4; i++)  // 128-bit lanes 0-1: a[2i]'s halves added; 2-3: a[2i + 1]'s
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int j = 0; j < 2; j++)  // 128-bit lane L: row 4j + L's four partial sums
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  // per 128-bit lane L: (c0[0] + c0[2], c1[0] + c1[2], c0[1] + c0[3], c1[1] + c1[3]), then the two pairs added
  const __m512 w = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(w, _mm512_permute_ps(w, 0x4E)));
  for (int L = 0; L < 4; L++) out[L] = t[4 * L], out[4 + L] = t[4 * L + 1];
}

// One activation row (decode) over a block of RB weight rows, the group size a constant: what q4_vnni<RB, 1, MODE>
// computes, with the per-block work cut to a few vector ops per 16 groups. Each row's group scales are decoded and multiplied by their step's sx
// (``sxg``, (G,), made once per call) in 16-lane vectors, and its zero terms, z * sum(x) - s sx * offset *
// sum(xq) (``xsum``, ``oq``: (G,)), start its accumulator instead of running after the loop. st: (RB, G) scratch;
// out: (RB,).
// RB = 8 (Q4_ROW_BLOCK): eight 1 KB code rows in flight instead of four, so the loop does not wait on L2 -> L1
// fills (a 64-byte line takes longer to arrive than its arithmetic takes).
template <int MODE, int GRP, int RB>
inline void q4_vnni_row(const uint8_t* const* w, const Q4Params& p, const int64_t* rows, const float* sxg,
                        const float* xsum, const float* oq, const int8_t* Xq, int64_t I, const __m512i tq, float* st,
                        float* out) {
  const int64_t G = I / GRP, S = I / 128;
  __m512 acc[RB];
#ifdef __AVX512VBMI__
  __m512i dyn_map[16];  // NF4 double quantization: the 256-entry dynamic map in registers, as byte planes (dyn64)
  if (MODE == 1 && !p.absmax)
    for (int t = 0; t < 16; t++) dyn_map[t] = _mm512_loadu_si512(p.dyn_planes + 64 * t);
#else
  __m512 dyn_map[16];  // the same as 16 vectors of fp32 (lookup256)
  if (MODE == 1 && !p.absmax)
    for (int t = 0; t < 16; t++) dyn_map[t] = _mm512_loadu_ps(p.am_dyn + 16 * t);
#endif
  bool block_done = false;
#ifdef __AVX512VBMI__
  if (MODE == 1 && !p.absmax && p.sxg_rep && rows[RB - 1] == rows[0] + RB - 1) {  // the block's codes in one run
    nf4_dq_block_scales(p, rows[0] * G, RB * G, dyn_map, st);
    for (int r = 0; r < RB; r++) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 k = lanes16(G - g);
        a = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, st + r * G + g), _mm512_maskz_loadu_ps(k, oq + g), a);
      }
      acc[r] = a;
    }
    block_done = true;
  }
#endif
  if (MODE == 0 || p.absmax) {  // plain statistics: the activations' per-group vectors loaded once for the RB rows
    for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 k = lanes16(G - g);
      const __m512 sxv = _mm512_maskz_loadu_ps(k, sxg + g), oqv = _mm512_maskz_loadu_ps(k, oq + g);
      const __m512 xsv = MODE == 0 ? _mm512_maskz_loadu_ps(k, xsum + g) : _mm512_setzero_ps();
      for (int r = 0; r < RB; r++) {
        const int64_t i = rows[r] * G + g;
        __m512 sv, zv = _mm512_setzero_ps();
        if (MODE == 0 && p.stats_bf16) {
          const uint16_t* sp = static_cast<const uint16_t*>(p.scales) + i;
          const uint16_t* zp = static_cast<const uint16_t*>(p.zeros) + i;
          sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, sp)), 16));
          zv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, zp)), 16));
        } else if (MODE == 0) {
          sv = _mm512_maskz_loadu_ps(k, static_cast<const float*>(p.scales) + i);
          zv = _mm512_maskz_loadu_ps(k, static_cast<const float*>(p.zeros) + i);
        } else {
          sv = _mm512_maskz_loadu_ps(k, p.absmax + i);
        }
        sv = _mm512_mul_ps(sv, sxv);
        _mm512_mask_storeu_ps(st + r * G + g, k, sv);
        if (MODE == 0) acc[r] = _mm512_fmadd_ps(zv, xsv, acc[r]);
        acc[r] = _mm512_fnmadd_ps(sv, oqv, acc[r]);
      }
    }
    block_done = true;
  }
  for (int r = 0; r < (block_done ? 0 : RB); r++) {  // double-quantized NF4 absmax, row by row
    __m512 a = _mm512_setzero_ps();
    const int64_t base = rows[r] * G;
    __m512 dyn64_out[4];  // with VBMI: the map values of the row's groups g - g % 64 ... + 63
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 k = lanes16(G - g);
      const int64_t i = base + g;
      // the code's dynamic-map value, times its block-of-256 scale
#ifdef __AVX512VBMI__
      if (g % 64 == 0) {
        const int64_t n = std::min<int64_t>(64, G - g);
        dyn64(dyn_map, _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, p.am_code + i),
              dyn64_out);
      }
      const __m512 dyn = dyn64_out[(g / 16) % 4];
#else
      const __m512 dyn = lookup256(dyn_map, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p.am_code + i)));
#endif
      const __m512 s = _mm512_mul_ps(dq_absmax16(p, i, k, dyn), _mm512_maskz_loadu_ps(k, sxg + g));
      _mm512_mask_storeu_ps(st + r * G + g, k, s);
      a = _mm512_fnmadd_ps(s, _mm512_maskz_loadu_ps(k, oq + g), a);
    }
    acc[r] = a;
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int64_t c = 0; c < S; c++) {
    const __m512i xe = _mm512_loadu_si512(Xq + c * 128), xo = _mm512_loadu_si512(Xq + c * 128 + 64);
    for (int r = 0; r < RB; r++) {
      __m512i lo, hi;
      q4_codes<MODE>(w[r] + c * 64, I, m4, tq, lo, hi);
      const __m512 s = step_scale(st + r * G, c, GRP);
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xo), hi, xe);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
    }
  }
  if (RB == 8) hsum8x16(acc, out);
  else
    for (int r = 0; r < RB; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

#ifdef EMBER_AVX2
// The fp32 value of 8 codes (0..15, one per int32 lane) in the 16-entry table t0 | t1: vpermps uses the low 3 bits,
// bit 3 (moved to the sign bit) picks the half.
inline __m256 lookup16(__m256i idx, __m256 t0, __m256 t1) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// One fp32 activation row, deinterleaved as for q4_f32_block (per 32 values: the 16 even, then the 16 odd):
// exact against the dequantized weight. 16 code bytes per row per step: high nibbles the even values.
inline void q4_f32_avx2(const uint8_t* const* w, const float* st, const float* Xd, const float* xsum, int64_t I,
                        const Q4Params& p, float* out) {
  const __m256 t0 = _mm256_loadu_ps(p.table), t1 = _mm256_loadu_ps(p.table + 8);
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  const int64_t G = I / p.group, chunks = p.group / 32;
  __m256 acc[R];
  float zsum[R] = {};
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m256 dot[R];
    for (int r = 0; r < R; r++) dot[r] = _mm256_setzero_ps();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; c++) {
      const float* x = Xd + c * 32;
      for (int r = 0; r < R; r++) {
        const uint8_t* b = w[r] + c * 16;
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8)));
        __m256 d = _mm256_fmadd_ps(lookup16(_mm256_srli_epi32(b0, 4), t0, t1), _mm256_loadu_ps(x), dot[r]);
        d = _mm256_fmadd_ps(lookup16(_mm256_srli_epi32(b1, 4), t0, t1), _mm256_loadu_ps(x + 8), d);
        d = _mm256_fmadd_ps(lookup16(_mm256_and_si256(b0, m4), t0, t1), _mm256_loadu_ps(x + 16), d);
        dot[r] = _mm256_fmadd_ps(lookup16(_mm256_and_si256(b1, m4), t0, t1), _mm256_loadu_ps(x + 24), d);
      }
    }
    for (int r = 0; r < R; r++) {
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(st[r * 2 * G + g]), dot[r], acc[r]);
      zsum[r] += st[r * 2 * G + G + g] * xsum[g];
    }
  }
  for (int r = 0; r < R; r++) out[r * MB] = hsum8(acc[r]) + zsum[r];
}
#endif

template <typename F>
void for_row_blocks(int64_t O, int64_t M, int nthreads, F&& body) {
  const int64_t blocks = (O + R - 1) / R;
  // Static: one contiguous run of rows per thread (the prefetchers' best case); on small weights a dynamic
  // hand-out's per-chunk dispatch costs more than the imbalance it saves.
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    float out[R * MB];
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
      body(b * R, m0, nm, out);
    }
  }
}

inline void store_block(void* Y, int64_t O, int64_t o0, int64_t m0, int nm, const float* out, const float* row_scale,
                        int y_bf16) {
  for (int r = 0; r < R && o0 + r < O; r++)
    for (int m = 0; m < nm; m++) {
      float v = out[r * MB + m] * (row_scale ? row_scale[o0 + r] : 1.f);
      store_y(Y, (m0 + m) * O + o0 + r, v, y_bf16);
    }
}

}  // namespace
