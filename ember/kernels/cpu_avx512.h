// AVX512 row kernels per weight format: dense bf16, dense fp32, int8, 4-bit.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_avx2.h"

namespace {
// ============================================================================ dense bf16
#ifdef EMBER_X86
template <int NM>
inline void dense_bf16_block(const uint16_t* const* w, const uint16_t* X, int64_t I, float* out) {
  __m512 acc[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < I; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; r++) {
      if (PF_DENSE) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + PF_DENSE, PF_HINT);
      wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + k);
    }
    for (int m = 0; m < NM; m++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(X + m * I + k);
      for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

void dense_bf16_rows(const uint16_t* const* w, const uint16_t* X, int64_t I, int nm, float* out) {
#ifdef EMBER_X86
  if (I % 32 == 0) {
    switch (nm) {
      case 1: return dense_bf16_block<1>(w, X, I, out);
      case 2: return dense_bf16_block<2>(w, X, I, out);
      case 3: return dense_bf16_block<3>(w, X, I, out);
      default: return dense_bf16_block<4>(w, X, I, out);
    }
  }
#endif
#ifdef EMBER_AVX2
  if (I % 32 == 0) {  // out + m: this pair's columns of the block's output
    in_pairs(nm, [&](auto n, int m) { dense_bf16_avx2<decltype(n)::value>(w, X + m * I, I, out + m); });
    return;
  }
#endif
  for (int r = 0; r < R; r++)
    for (int m = 0; m < nm; m++) {
      float s = 0.f;
      for (int64_t k = 0; k < I; k++) s += bf16_to_f32(w[r][k]) * bf16_to_f32(X[m * I + k]);
      out[r * MB + m] = s;
    }
}

// ============================================================================ dense fp32
#ifdef EMBER_X86
template <int NM>
inline void dense_f32_block(const float* const* w, const float* X, int64_t I, float* out) {
  __m512 acc[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < I; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_ps(w[r] + k);
    for (int m = 0; m < NM; m++) {
      __m512 xv = _mm512_loadu_ps(X + m * I + k);
      for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

void dense_f32_rows(const float* const* w, const float* X, int64_t I, int nm, float* out) {
#ifdef EMBER_X86
  if (I % 16 == 0) {
    switch (nm) {
      case 1: return dense_f32_block<1>(w, X, I, out);
      case 2: return dense_f32_block<2>(w, X, I, out);
      case 3: return dense_f32_block<3>(w, X, I, out);
      default: return dense_f32_block<4>(w, X, I, out);
    }
  }
#endif
#ifdef EMBER_AVX2
  if (I % 16 == 0) {  // out + m: this pair's columns of the block's output
    in_pairs(nm, [&](auto n, int m) { f32_rows_avx2<decltype(n)::value>(w, X + m * I, I, out + m); });
    return;
  }
#endif
  for (int r = 0; r < R; r++)
    for (int m = 0; m < nm; m++) {
      float s = 0.f;
      for (int64_t k = 0; k < I; k++) s += w[r][k] * X[m * I + k];
      out[r * MB + m] = s;
    }
}

// ============================================================================ int8
#ifdef EMBER_X86
// 64 codes per row per step (one 64-byte load, four 16-lane conversions), 16 at a time for the tail.
template <int NM>
inline void int8_block(const int8_t* const* w, const float* X, int64_t I, float* out) {
  __m512 acc[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; NM == 1 && k + 64 <= I; k += 64) {  // several activation rows: 16 at a time keeps 16 accumulators in registers
    for (int r = 0; r < R; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + PF_I8, _MM_HINT_T0);
      __m512i b = _mm512_loadu_si512(w[r] + k);
      __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b)));
      __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1)));
      __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2)));
      __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3)));
      for (int m = 0; m < NM; m++) {
        const float* x = X + m * I + k;
        __m512 a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[r][m]);
        a = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), a);
        a = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + 32), a);
        acc[r][m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + 48), a);
      }
    }
  }
  for (; k < I; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; r++)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k))));
    for (int m = 0; m < NM; m++) {
      __m512 xv = _mm512_loadu_ps(X + m * I + k);
      for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

#ifdef EMBER_X86
// One bf16 activation row. With u = q ^ 0x80 = 16 H + L (nibbles), q = 16 (128 + H) + (128 + L) - 2304, and
// 0x4300 | n is exactly 128 + n in bf16: each 64-code step is four vdpbf16ps over nibble words (word j holds
// codes 2j, 2j+1) against x_even, 16 x_even, x_odd, 16 x_odd; the -2304 * sum(x) is added once per row.
inline void int8_bf16_rows(const int8_t* const* w, const uint16_t* Xp, float xsum, int64_t I, float* out) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300),
                magic_flip = _mm512_set1_epi16(0x4308);  // the high nibbles carry the flipped sign bit
  __m512 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < I / 64; c++) {
    const uint16_t* x = Xp + c * 128;
    const __m512bh xe = (__m512bh)_mm512_loadu_si512(x), xe16 = (__m512bh)_mm512_loadu_si512(x + 32);
    const __m512bh xo = (__m512bh)_mm512_loadu_si512(x + 64), xo16 = (__m512bh)_mm512_loadu_si512(x + 96);
    for (int r = 0; r < R; r++) {
      const int8_t* wp = w[r] + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_I8, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wp);
      const __m512bh n0 = (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA);  // (v & 15) | magic
      const __m512bh n1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, magic_flip, 0x6A);
      const __m512bh n2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low4, magic, 0xEA);
      const __m512bh n3 = (__m512bh)_mm512_xor_si512(_mm512_srli_epi16(v, 12), magic_flip);
      acc[r][0] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][0], n0, xe), n2, xo);
      acc[r][1] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][1], n1, xe16), n3, xo16);
    }
  }
  for (int r = 0; r < R; r++) out[r * MB] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) - 2304.f * xsum;
}
#endif

void int8_rows(const int8_t* const* w, const float* X, int64_t I, int nm, float* out) {
#ifdef EMBER_X86
  if (I % 16 == 0) {
    switch (nm) {
      case 1: return int8_block<1>(w, X, I, out);
      case 2: return int8_block<2>(w, X, I, out);
      case 3: return int8_block<3>(w, X, I, out);
      default: return int8_block<4>(w, X, I, out);
    }
  }
#endif
#ifdef EMBER_AVX2
  if (I % 16 == 0) {  // out + m: this pair's columns of the block's output
    in_pairs(nm, [&](auto n, int m) { f32_rows_avx2<decltype(n)::value>(w, X + m * I, I, out + m); });
    return;
  }
#endif
  for (int r = 0; r < R; r++)
    for (int m = 0; m < nm; m++) {
      float s = 0.f;
      for (int64_t k = 0; k < I; k++) s += static_cast<float>(w[r][k]) * X[m * I + k];
      out[r * MB + m] = s;
    }
}

// ============================================================================ 4-bit
// The 16 values a code stands for before scaling: q - 8 (int4) or the NF4 code book.
struct Q4Params {
  int mode;             // 0 int4, 1 nf4
  int64_t group;        // int4: 32/64/128; nf4: 64
  const void* scales;   // int4 (O, I/g), bf16 or fp32 (stats_bf16)
  const void* zeros;    // int4 (O, I/g)
  int stats_bf16;
  const float* absmax;  // nf4 without double quant: (O*I/64,) fp32
  const uint8_t* am_code;     // nf4 double quant: (O*I/64,) uint8
  const float* am_dyn;        // (256,) fp32 dynamic map
  const float* am_scale2;     // (ceil(blocks/256),) fp32
  float am_offset;
  float table[16];
  const uint8_t* dyn_planes;  // am_dyn as byte planes (dyn_byte_planes), for the VNNI decode kernel with VBMI
  const float* sxg_rep;       // that kernel's per-group activation scales repeated for each row of a block
};

inline float group_scale(const Q4Params& p, int64_t o, int64_t g, int64_t G) {
  int64_t i = o * G + g;
  if (p.mode == 0) return load_f(p.scales, i, p.stats_bf16);
  if (p.absmax) return p.absmax[i];
  return p.am_dyn[p.am_code[i]] * p.am_scale2[i >> 8] + p.am_offset;  // double-quant blocks of 256
}

inline float group_zero(const Q4Params& p, int64_t o, int64_t g, int64_t G) {
  return p.mode == 0 ? load_f(p.zeros, o * G + g, p.stats_bf16) : 0.f;
}

// fp32 scale and zero of every group of the block's rows: st[r * 2G + g] = scale, st[r * 2G + G + g] = zero.
// Decoded once per block so the inner loops never divide or branch on the format.
// Branch-free loops per format (they run once per 4-row block, which streams in a few hundred ns, so a
// per-group function call with format tests here cost as much as the block's arithmetic).
// zero_offset is added to each zero as ``zero - zero_offset * scale`` (the int4 kernel's 128 + q codes).
inline void block_stats(const Q4Params& p, const int64_t* rows, int64_t G, float* st, float zero_offset = 0.f) {
  for (int r = 0; r < R; r++) {
    float* sc = st + r * 2 * G;
    float* zr = sc + G;
    const int64_t base = rows[r] * G;
    if (p.mode == 0 && p.stats_bf16) {
      const uint16_t* s16 = static_cast<const uint16_t*>(p.scales) + base;
      const uint16_t* z16 = static_cast<const uint16_t*>(p.zeros) + base;
      for (int64_t g = 0; g < G; g++) sc[g] = bf16_to_f32(s16[g]), zr[g] = bf16_to_f32(z16[g]);
    } else if (p.mode == 0) {
      const float* s32 = static_cast<const float*>(p.scales) + base;
      const float* z32 = static_cast<const float*>(p.zeros) + base;
      for (int64_t g = 0; g < G; g++) sc[g] = s32[g], zr[g] = z32[g];
    } else if (p.absmax) {
      for (int64_t g = 0; g < G; g++) sc[g] = p.absmax[base + g], zr[g] = 0.f;
    } else {
      int64_t g = 0;
#ifdef EMBER_X86
      // 16 groups at a time: the code's dynamic-map value by a gather, the block-of-256 scale of each (at most
      // two distinct ones among 16 consecutive groups) by a masked blend; this runs for every 4-row block
      const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 off = _mm512_set1_ps(p.am_offset);
      for (; g + 16 <= G; g += 16) {
        const int64_t i = base + g;
        const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.am_code + i)));
        const __m512 dyn = _mm512_i32gather_ps(code, p.am_dyn, 4);
        const int64_t b0 = i >> 8;
        const __mmask16 next = _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32(static_cast<int>(256 - (i & 255))));
        const __m512 s2 = _mm512_mask_blend_ps(next, _mm512_set1_ps(p.am_scale2[b0]),
                                               _mm512_set1_ps(next ? p.am_scale2[b0 + 1] : 0.f));
        _mm512_storeu_ps(sc + g, _mm512_fmadd_ps(dyn, s2, off));
        _mm512_storeu_ps(zr + g, _mm512_setzero_ps());
      }
#endif
      for (; g < G; g++)
        sc[g] = p.am_dyn[p.am_code[base + g]] * p.am_scale2[(base + g) >> 8] + p.am_offset, zr[g] = 0.f;
    }
    if (zero_offset != 0.f)
      for (int64_t g = 0; g < G; g++) zr[g] -= zero_offset * sc[g];
  }
}

// Portable reference for any shape: dequantize each value, multiply, accumulate in fp32.
void q4_rows_portable(const uint8_t* const* w, const float* st, const float* X, int64_t I, int nm,
                      const Q4Params& p, float* out) {
  int64_t G = I / p.group;
  for (int r = 0; r < R; r++)
    for (int m = 0; m < nm; m++) {
      float s = 0.f;
      for (int64_t g = 0; g < G; g++) {
        float sc = st[r * 2 * G + g], z = st[r * 2 * G + G + g];
        for (int64_t k = g * p.group; k < (g + 1) * p.group; k++) {
          uint8_t b = w[r][k / 2];
          int q = (k % 2 == 0) ? (b >> 4) : (b & 0x0F);
          s += (p.table[q] * sc + z) * X[m * I + k];
        }
      }
      out[r * MB + m] = s;
    }
}

#ifdef EMBER_X86
// fp32 activations, deinterleaved per 32 values: Xd[m][32c + j] = x[32c + 2j], Xd[m][32c + 16 + j] = x[32c + 2j + 1].
// Per group: dot = sum table[q] * x (FMA); acc += scale * dot; the int4 zero adds zero * sum(x of group).
template <int NM>
inline void q4_f32_block(const uint8_t* const* w, const float* st, const float* Xd, const float* xsum,
                         int64_t I, const Q4Params& p, float* out) {
  const __m512 table = _mm512_loadu_ps(p.table);
  const int64_t G = I / p.group;
  const int64_t chunks = p.group / 32;  // 32-value chunks per group (group >= 32)
  __m512 acc[R][NM];
  float zsum[R][NM];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps(), zsum[r][m] = 0.f;
  for (int64_t g = 0; g < G; g++) {
    __m512 dot[R][NM];
    for (int r = 0; r < R; r++)
      for (int m = 0; m < NM; m++) dot[r][m] = _mm512_setzero_ps();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; c++) {
      __m512 hi[R], lo[R];
      for (int r = 0; r < R; r++) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + c * 16)));
        lo[r] = _mm512_permutexvar_ps(b, table);  // uses the low 4 bits: element 2j + 1
        hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);  // element 2j
      }
      for (int m = 0; m < NM; m++) {
        __m512 xe = _mm512_loadu_ps(Xd + m * I + c * 32), xo = _mm512_loadu_ps(Xd + m * I + c * 32 + 16);
        for (int r = 0; r < R; r++) dot[r][m] = _mm512_fmadd_ps(lo[r], xo, _mm512_fmadd_ps(hi[r], xe, dot[r][m]));
      }
    }
    for (int r = 0; r < R; r++) {
      __m512 s = _mm512_set1_ps(st[r * 2 * G + g]);
      float z = st[r * 2 * G + G + g];
      for (int m = 0; m < NM; m++) {
        acc[r][m] = _mm512_fmadd_ps(s, dot[r][m], acc[r][m]);
        zsum[r][m] += z * xsum[m * G + g];
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < NM; m++) out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]) + zsum[r][m];
}

// bf16 activations, I % 128 == 0. 64 code bytes = 32 words per row step; word j holds values 4j..4j+3:
// n0 = w & 15 -> 4j+1, n1 = (w >> 4) & 15 -> 4j, n2 = (w >> 8) & 15 -> 4j+3, n3 = w >> 12 -> 4j+2, so x is
// pre-arranged per 128 values as X4[m][128c + 32i + j] = x[128c + 4j + perm(i)], perm = (1, 0, 3, 2).
// int4: bf16 bits 0x4300 | q are exactly 128 + q, so sum (128 + q) x needs no table: the 136 * scale offset
// joins the zero term. nf4: the bf16 code book is looked up by vpermw on the nibble.
// vdpbf16ps output lane t sums words 2t, 2t+1 = values 8t..8t+7 of the step, so lane t belongs to group
// (128c + 8t) / g and the per-group scale is a lane vector (one value for g = 128, two halves for 64, quarters for 32).
// The 128 values of a 64-byte step as four vectors of 32 bf16 words: int4 takes the four nibbles of each word
// (0x4300 | q = 128 + q); nf4 looks each nibble up in the bf16 code book, whose low/high bytes are the first two
// 128-bit lanes of ``table``. Each mode orders values differently; ember_q4 arranges x to match (x_order).
template <int MODE>
inline void q4_words(__m512i v, const __m512i table, __m512bh& w0, __m512bh& w1, __m512bh& w2, __m512bh& w3) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  if (MODE == 0) {  // (a & low4) | magic in one vpternlogd each
    w0 = (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA);
    w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, magic, 0xEA);
    w2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low4, magic, 0xEA);
    w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
  } else {  // nf4: high and low bytes of each bf16 code value by vpshufb on the nibble bytes, then interleaved
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    const __m512i hb = _mm512_shuffle_i64x2(table, table, 0x55);  // table: lane 0 low bytes, lane 1 high bytes
    const __m512i lb = _mm512_shuffle_i64x2(table, table, 0x00);
    const __m512i l_lo = _mm512_shuffle_epi8(lb, lo), l_hi = _mm512_shuffle_epi8(hb, lo);
    const __m512i h_lo = _mm512_shuffle_epi8(lb, hi), h_hi = _mm512_shuffle_epi8(hb, hi);
    w0 = (__m512bh)_mm512_unpacklo_epi8(l_lo, l_hi), w1 = (__m512bh)_mm512_unpackhi_epi8(l_lo, l_hi);
    w2 = (__m512bh)_mm512_unpacklo_epi8(h_lo, h_hi), w3 = (__m512bh)_mm512_unpackhi_epi8(h_lo, h_hi);
  }
}

// The per-lane group scale of one 128-value step (see q4_bf16x128).
inline __m512 step_scale(const float* sc, int64_t c, int64_t group) {
  if (group == 128) return _mm512_set1_ps(sc[c]);
  if (group == 64) return _mm512_insertf32x8(_mm512_set1_ps(sc[2 * c]), _mm256_set1_ps(sc[2 * c + 1]), 1);
  const __m512i q32 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(q32, _mm512_castps128_ps512(_mm_loadu_ps(sc + 4 * c)));
}

// Which value of a 128-value step word j of vector i holds (q4_words' order).
inline int x_order(int mode, int i, int j) {
  if (mode == 0) {  // int4: word j of the step = values 4j..4j+3; vectors = nibbles 0..3 = values 4j+1, 4j, 4j+3, 4j+2
    static const int perm[4] = {1, 0, 3, 2};
    return 4 * j + perm[i];
  }
  // nf4: vpunpck{l,h}bw interleave within 128-bit lanes: word j = lane j / 8, k = j % 8 -> byte 16 lane + k
  // (vectors 0, 2) or 16 lane + 8 + k (1, 3); low nibbles (vectors 0, 1) are the odd values 2 byte + 1.
  const int lane = j / 8, k = j % 8;
  const int byte = 16 * lane + ((i == 1 || i == 3) ? 8 : 0) + k;
  return 2 * byte + (i < 2 ? 1 : 0);
}

template <int RR, int NM, int MODE>
inline void q4_bf16x128(const uint8_t* const* w, const float* st, const uint16_t* X4, const float* xsum, int64_t I,
                        int64_t group, const __m512i table, float* out) {
  const int64_t G = I / group;
  __m512 acc[RR][NM];
  for (int r = 0; r < RR; r++)
    for (int m = 0; m < NM; m++) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < I / 128; c++) {
    __m512bh xv[NM][4];  // this step's activations, loaded once for all RR rows
    for (int m = 0; m < NM; m++)
      for (int i = 0; i < 4; i++) xv[m][i] = (__m512bh)_mm512_loadu_si512(X4 + m * I + c * 128 + 32 * i);
    for (int r = 0; r < RR; r++) {
      const uint8_t* wp = w[r] + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_Q4, PF_Q4_HINT);
      __m512bh w0, w1, w2, w3;
      q4_words<MODE>(load_once(wp), table, w0, w1, w2, w3);
      const __m512 s = step_scale(st + r * 2 * G, c, group);
      for (int m = 0; m < NM; m++) {
        __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, xv[m][0]);
        __m512 e = _mm512_dpbf16_ps(_mm512_setzero_ps(), w1, xv[m][1]);
        d = _mm512_dpbf16_ps(d, w2, xv[m][2]);
        e = _mm512_dpbf16_ps(e, w3, xv[m][3]);
        acc[r][m] = _mm512_fmadd_ps(s, _mm512_add_ps(d, e), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RR; r++) {
    const float* zr = st + r * 2 * G + G;
    for (int m = 0; m < NM; m++) {
      float z = 0.f;
      if (MODE == 0)
        for (int64_t g = 0; g < G; g++) z += zr[g] * xsum[m * G + g];
      out[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]) + z;
    }
  }
}
#endif

}  // namespace
