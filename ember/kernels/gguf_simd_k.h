// K-quant (256-value super-block) rows of gguf_simd.h's int8-activation kernels: included there, after the
// 32-value types and inside gguf.cpp's anonymous namespace; the scheme and bounds are stated at gguf_simd.h's top.
#pragma once

template <int T> constexpr int bytesk() {
  return T == Q2_K ? 84 : T == Q3_K ? 110 : T == Q4_K ? 144 : T == Q5_K ? 176 : T == IQ4_XS ? 136 : 210;
}

// 16-bit broadcasts of entry j (0..7) of 8 int16 held in both 128-bit lanes, by vpshufb.
inline __m256i word_bcast(__m256i v, int j) {
  const __m256i idx = _mm256_set1_epi16(static_cast<int16_t>(2 * j | (2 * j + 1) << 8));
  return _mm256_shuffle_epi8(v, idx);
}

// Q4_K / Q5_K's 12 bytes of 6-bit scales and mins -> sc (8 x u8) in the low 8 bytes, mins in the high 8.
inline __m128i k_scales(const uint8_t* s) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4), std::memcpy(&b, s + 4, 4), std::memcpy(&c, s + 8, 4);
  const uint32_t sc_lo = a & 0x3F3F3F3Fu, mn_lo = b & 0x3F3F3F3Fu;
  const uint32_t sc_hi = (c & 0x0F0F0F0Fu) | ((a >> 6) & 0x03030303u) << 4;
  const uint32_t mn_hi = ((c >> 4) & 0x0F0F0F0Fu) | ((b >> 6) & 0x03030303u) << 4;
  return _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(mn_lo),
                        static_cast<int>(mn_hi));
}

// Q3_K's 12 bytes of 6-bit scales -> 16 signed scales (stored value - 32) as int8.
inline __m128i q3_scales(const uint8_t* s) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4), std::memcpy(&b, s + 4, 4), std::memcpy(&c, s + 8, 4);
  const uint32_t m4 = 0x0F0F0F0Fu, m2 = 0x03030303u;
  const __m128i v = _mm_setr_epi32(static_cast<int>((a & m4) | (c & m2) << 4),
                                   static_cast<int>((b & m4) | ((c >> 2) & m2) << 4),
                                   static_cast<int>(((a >> 4) & m4) | ((c >> 4) & m2) << 4),
                                   static_cast<int>(((b >> 4) & m4) | ((c >> 6) & m2) << 4));
  return _mm_sub_epi8(v, _mm_set1_epi8(32));
}

// Scales for 32 values of 16-value sub-blocks j, j + 1 (entries of sh, 8 int16 in both lanes): one per 128-bit lane.
inline __m256i lane_scales(__m256i sh, int j) {
  return _mm256_blend_epi32(word_bcast(sh, j), word_bcast(sh, j + 1), 0xF0);
}

inline __m256i bcast_lane(__m256i v, int hi) {
  return hi ? _mm256_permute2x128_si256(v, v, 0x11) : _mm256_permute2x128_si256(v, v, 0x00);
}

// Q6_K half h's codes u (0..63) as four vectors of 32 values in natural order (elements 128h + 32i ...).
inline void q6_codes(const uint8_t* b, int h, __m256i* u) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  const __m256i l0 = ld256(b + 64 * h), l1 = ld256(b + 64 * h + 32), qh = ld256(b + 128 + 32 * h);
  auto high = [&](__m256i q) { return _mm256_slli_epi16(_mm256_and_si256(q, m3), 4); };
  u[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), high(qh));
  u[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), high(_mm256_srli_epi16(qh, 2)));
  u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), high(_mm256_srli_epi16(qh, 4)));
  u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), high(_mm256_srli_epi16(qh, 6)));
}

// Q4_K / Q5_K: 32 bytes of nibbles at q -> sub-blocks 2c (lo) and 2c + 1 (hi); Q5_K's high bits from qh (bit 0
// and 1 of each byte, shifted down by 2 for the next c here).
template <int T>
inline void k45_codes(const uint8_t* q, __m256i& qh, __m256i& lo, __m256i& hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  const __m256i v = ld256(q);
  lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if constexpr (T == Q5_K) {
    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
    qh = _mm256_srli_epi16(qh, 2);
  }
}

// One super-block b against its 256 activations x: isum and mins (int32 lanes) and their factors, so that
// y += d sx sum(isum) - dm sx sum(mins). bs16 / bs32: the super-block's sums of xq per 16 / 32 values.
template <int T>
inline void sb_dot(const uint8_t* b, const int8_t* x, const int16_t* bs16, const int16_t* bs32, __m256i& isum,
                   __m256i& mins, float& d, float& dm) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  isum = mins = _mm256_setzero_si256();
  dm = 0.f;
  if constexpr (T == Q6_K) {  // 128 B low nibbles | 64 B high pairs | 16 int8 scales | d
    const __m256i sc16 = _mm256_cvtepi8_epi16(ld128(b + 192));
    for (int h = 0; h < 2; h++) {
      const __m256i sh = bcast_lane(sc16, h);  // scales 8h..8h+7
      __m256i u[4];
      q6_codes(b, h, u);
      for (int i = 0; i < 4; i++)  // 32 values = 16-value sub-blocks 2i, 2i + 1 of this half
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(u[i], ld256(x + 128 * h + 32 * i)),
                                                        lane_scales(sh, 2 * i)));
    }
    // codes are u - 32: minus 32 sum_g sc_g bs_g
    isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_madd_epi16(sc16, ld256(bs16)), 5));
    d = f16_to_f32(b + 208);
  } else if constexpr (T == Q3_K) {  // 32 B high bits | 64 B 2-bit codes | 12 B scales | d
    const __m256i sc16 = _mm256_cvtepi8_epi16(q3_scales(b + 96));
    __m256i hm = ld256(b);  // bit 4h + j of byte l: element 128h + 32j + l, shifted down as j runs
    for (int h = 0; h < 2; h++) {
      const __m256i sh = bcast_lane(sc16, h);
      __m256i q = ld256(b + 32 + 32 * h);
      for (int j = 0; j < 4; j++) {
        const __m256i u = _mm256_or_si256(_mm256_and_si256(q, m3), _mm256_slli_epi16(_mm256_and_si256(hm, one), 2));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, ld256(x + 128 * h + 32 * j)),
                                                        lane_scales(sh, 2 * j)));
        q = _mm256_srli_epi16(q, 2), hm = _mm256_srli_epi16(hm, 1);
      }
    }
    isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_madd_epi16(sc16, ld256(bs16)), 2));  // codes u - 4
    d = f16_to_f32(b + 108);
  } else if constexpr (T == Q2_K) {  // 16 B scales (low nibble) / mins (high) | 64 B 2-bit codes | d | dmin
    const __m128i s = ld128(b);
    const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s, _mm_set1_epi8(0x0F)));
    for (int h = 0; h < 2; h++) {
      const __m256i sh = bcast_lane(sc16, h);
      __m256i q = ld256(b + 16 + 32 * h);
      for (int j = 0; j < 4; j++) {
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(q, m3),
                                                                             ld256(x + 128 * h + 32 * j)),
                                                        lane_scales(sh, 2 * j)));
        q = _mm256_srli_epi16(q, 2);
      }
    }
    mins = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(0x0F))),
                             ld256(bs16));
    d = f16_to_f32(b + 80), dm = f16_to_f32(b + 82);
  } else if constexpr (T == IQ4_XS) {  // d | uint16 scale highs | 4 B scale lows | 128 B nibbles; x in pair order
    const int hi = b[2] | b[3] << 8;
    uint32_t lo4;
    std::memcpy(&lo4, b + 4, 4);
    alignas(16) int16_t ls[8];
    for (int j = 0; j < 8; j++) ls[j] = static_cast<int16_t>((((lo4 >> (4 * j)) & 0x0F) | ((hi >> (2 * j)) & 3) << 4) - 32);
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(ls)));
    const __m256i tb = _mm256_broadcastsi128_si256(ld128(kIq4));
    for (int c = 0; c < 4; c++) {  // sub-blocks 2c (low lane), 2c + 1 (high lane)
      const __m256i v = ld256(b + 8 + 32 * c);
      const __m256i lo = _mm256_shuffle_epi8(tb, _mm256_and_si256(v, m4));
      const __m256i hv = _mm256_shuffle_epi8(tb, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
      const __m256i scl = lane_scales(sc16, 2 * c);  // |w| x sign(x, w): pairs <= 2 * 127 * 127
      const __m256i xl = ld256(x + 64 * c), xh = ld256(x + 64 * c + 32);
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(
                                        _mm256_maddubs_epi16(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(xl, lo)), scl));
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(
                                        _mm256_maddubs_epi16(_mm256_sign_epi8(hv, hv), _mm256_sign_epi8(xh, hv)), scl));
    }
    d = f16_to_f32(b);
  } else {  // Q4_K, Q5_K: d | dmin | 12 B scales | (Q5_K: 32 B high bits) | 128 B nibbles
    const __m128i scm = k_scales(b + 4);
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
    const uint8_t* qs = b + (T == Q4_K ? 16 : 48);
    __m256i qh = T == Q5_K ? ld256(b + 16) : _mm256_setzero_si256();  // bit j of byte l: sub-block j, value l
    for (int c = 0; c < 4; c++) {
      __m256i lo, hi;
      k45_codes<T>(qs + 32 * c, qh, lo, hi);
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ld256(x + 64 * c)),
                                                      word_bcast(sc16, 2 * c)));
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ld256(x + 64 * c + 32)),
                                                      word_bcast(sc16, 2 * c + 1)));
    }
    mins = _mm256_zextsi128_si256(_mm_madd_epi16(_mm_cvtepu8_epi16(_mm_unpackhi_epi64(scm, scm)), ld128(bs32)));
    d = f16_to_f32(b), dm = f16_to_f32(b + 2);
  }
}

// R rows of a K-quant times one activation row quantized per 256 (sx: (nb,), bs16 / bs32: per 16 / 32 values).
template <int T, int R>
void rowsk(const uint8_t* const* rows, int64_t row_bytes, const int8_t* xq, const float* sx, const int16_t* bs16,
           const int16_t* bs32, int64_t nb, float* out) {
  constexpr int bb = bytesk<T>();
  __m256 acc[R], accm[R];
  for (int r = 0; r < R; r++) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < nb; k++)
    for (int r = 0; r < R; r++) {
      const uint8_t* b = rows[r] + bb * k;
      gguf_prefetch(b, bb, row_bytes);
      __m256i isum, mins;
      float d, dm;
      sb_dot<T>(b, xq + 256 * k, bs16 + 16 * k, bs32 + 8 * k, isum, mins, d, dm);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * sx[k]), _mm256_cvtepi32_ps(isum), acc[r]);
      if constexpr (T == Q2_K || T == Q4_K || T == Q5_K)
        accm[r] = _mm256_fmadd_ps(_mm256_set1_ps(dm * sx[k]), _mm256_cvtepi32_ps(mins), accm[r]);
    }
  for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]) - hsum8(accm[r]);
}
