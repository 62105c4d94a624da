// GGUF block rows times int8-quantized bf16 activations, decoded in registers: the AVX2 and AVX512-VNNI tiers of
// gguf.cpp (included there, inside its anonymous namespace, after the block-format helpers).
//
// Both tiers run the same 256-bit code (AVX512-VNNI only swaps vpmaddubsw + vpmaddwd for vpdpbusd where no
// per-sub-block scale is folded in), so the two builds compute the same integers. Each pass takes R = 4 weight
// rows (a last 1-3 rows one at a time) against one activation row, so the activation loads, the per-block
// activation terms and the loop overhead are shared, and four independent row streams are in flight.
//
//   32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4, Q4_G32), activations per 32 values (sx, xq, bs = sum xq):
//     codes of two blocks in one vector: [block k elements 0-15 | block k+1 elements 0-15] and the same for 16-31
//     (for the nibble types the low / high nibbles of the two blocks' 16 bytes), the activations permuted to match
//     once per call (pair_order). Per 8 blocks the integer sums of the four pair vectors are reduced by three
//     vphaddd to one sum per block, in block order 0 2 4 6 1 3 5 7 (kPerm), and scaled by one vector op per term:
//       y += d (sx isum + cq) [+ m sx bs]     cq = -off sx bs (offset types), 0 (signed types, mins)
//     (Q4_G32 has both: off = 8 and its zero z as m; its s and z are bf16).
//     Signed codes (Q8_0, IQ4_NL) are multiplied as |w| x sign(x, w). MXFP4's E2M1 values x 2 (kMxfp4, -12..12,
//     with the scale 2^(e - 128)) become the unsigned codes u = 2w + 12 (0..24: pairs of products <= 2 * 24 * 127,
//     so the lo and hi products add in int16 before one vpmaddwd), an offset type with off = 12. Blocks past the
//     last 8 go through unpack_block.
//   MXFP4_HUB (gpt-oss's hub layout, mxfp4.cpp's weights): the same path over 16-byte blocks whose nibbles are
//     elements 2j (low) and 2j + 1 (high), scales in their own (O, I/32) rows; the activations are put in that
//     order per block (evens, then odds) before pair_order, so the code vectors are MXFP4's.
//   256-value super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS), activations per 256 values (one sx per
//     super-block, llama.cpp's Q8_K) so the sub-block scales fold in as integers: isum = sum_j sc_j sum(u xq over j)
//     by vpmaddubsw then vpmaddwd with the scale (one per 128-bit lane for 16-value sub-blocks), per super-block
//       y += d sx isum - dmin sx sum_j m_j bs_j
//     (Q2_K, Q4_K, Q5_K: mins; Q3_K, Q6_K: the code offset 4 / 32 folded into isum as off sum_g sc_g bs_g; IQ4_XS:
//     signed book values, activations in pair order as above).
//
// Bounds (no saturation): vpmaddubsw pairs <= 2 * 128 * 127 for signed codes (kept in separate vpmaddwd), and
// <= 2 * 63 * 127 for 6-bit codes; int32 sums per super-block < 2^31.

constexpr int kR = 4;                                     // weight rows per pass
constexpr int kNX = 4;                                    // activation rows per pass of rows32_xn (prefill)
constexpr int kPerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};        // block of each lane after the vphaddd reduction

inline __m256i ld256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i ld128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i pair128(const uint8_t* a, const uint8_t* b) { return _mm256_set_m128i(ld128(b), ld128(a)); }

inline uint64_t ld16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

// sum over 4-byte groups of u8 a * s8 b, as 8 int32 lanes.
inline __m256i dot_u8s8(__m256i a, __m256i b) {
#ifdef EMBER_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

inline float hsum4(__m128 h) {
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Software prefetch of the bytes a row's step reads, in the row kR rows down (the next pass's rows; a thread's
// rows are one contiguous run): the hardware prefetchers follow each row but not the jump to the next block.
// Into L2 (PF_Q4_HINT), as the 4-bit kernels of cpu_avx2.h.
inline void gguf_prefetch(const uint8_t* p, int n, int64_t row_bytes) {
  const char* q = reinterpret_cast<const char*>(p) + kR * row_bytes;
  for (int i = 0; i < n; i += 64) _mm_prefetch(q + i, PF_Q4_HINT);
}

// ---- activations

inline __m256 bf16x8(const uint16_t* p) {  // 8 bf16 -> fp32 (exact)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(p)), 16));
}

// bf16 x (n values, n % G == 0) -> int8 xq on 127 levels per G values, scales sx (n / G), sums of xq per 16 (bs16,
// n / 16) and per 32 (bs32, n / 32). xq = nearbyint(x * (127 / amax)) (vcvtps2dq rounds to nearest even).
template <int G>
void quantize_x(const uint16_t* x, int64_t n, int8_t* xq, float* sx, int16_t* bs16, int16_t* bs32) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t c = 0; c < n / G; c++) {
    const uint16_t* xc = x + c * G;
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(bf16x8(xc + i), abs));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    sx[c] = d;
    const __m256 vid = _mm256_set1_ps(id);
    for (int i = 0; i < G; i += 16) {
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(bf16x8(xc + i), vid));
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(bf16x8(xc + i + 8), vid));
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // 16 int16, in order
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + c * G + i),
                       _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
      const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(_mm256_add_epi32(q0, q1)),
                                      _mm256_extracti128_si256(_mm256_add_epi32(q0, q1), 1));
      const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      bs16[(c * G + i) / 16] = static_cast<int16_t>(_mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1))));
    }
  }
  for (int64_t g = 0; g < n / 32; g++) bs32[g] = static_cast<int16_t>(bs16[2 * g] + bs16[2 * g + 1]);
}

// Within each 8 blocks (256 values) of a 32-value type's activations: every pair of blocks k, k+1 as
// [k 0-15, k+1 0-15, k 16-31, k+1 16-31], the order of pair_codes.
void pair_order(const int8_t* xq, int64_t nb8, int8_t* out) {
  for (int64_t p = 0; p < nb8 * 4; p++) {
    const int8_t* a = xq + 64 * p;
    int8_t* o = out + 64 * p;
    std::memcpy(o, a, 16), std::memcpy(o + 16, a + 32, 16), std::memcpy(o + 32, a + 16, 16);
    std::memcpy(o + 48, a + 48, 16);
  }
}

// ---- 32-value block types

template <int T> constexpr int bytes32() {
  return T == Q4_0 ? 18 : T == Q4_1 || T == Q4_G32 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : T == Q8_0 ? 34 : T == IQ4_NL ? 18
       : T == MXFP4_HUB ? 16 : 17;
}
template <int T> constexpr bool mxfp4_type() { return T == MXFP4 || T == MXFP4_HUB; }
template <int T> constexpr bool signed32() { return T == Q8_0 || T == IQ4_NL; }
template <int T> constexpr bool min32() { return T == Q4_1 || T == Q5_1 || T == Q4_G32; }
template <int T> constexpr bool bf16_scales() { return T == Q4_G32; }  // s, z as bf16 (the rest: fp16)
template <int T> constexpr float off32() { return T == Q4_0 || T == Q4_G32 ? 8.f : T == Q5_0 ? 16.f : mxfp4_type<T>() ? 12.f : 0.f; }

// The 32 set bits of q (bit i -> byte i) as 0x10 bytes (Q5's fifth bit).
inline __m256i bit_bytes(uint32_t q) {
#ifdef EMBER_VNNI
  return _mm256_maskz_mov_epi8(q, _mm256_set1_epi8(16));
#else
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(q)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                0x0303030303030303LL));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
#endif
}

// Codes of blocks a, b (pair order): lo = [a 0-15 | b 0-15], hi = [a 16-31 | b 16-31]; u8 for the unsigned
// types (MXFP4: 2w + 12), s8 values for the signed ones.
template <int T>
inline void pair_codes(const uint8_t* a, const uint8_t* b, __m256i& lo, __m256i& hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if constexpr (T == Q8_0) {
    lo = pair128(a + 2, b + 2), hi = pair128(a + 18, b + 18);
    return;
  }
  constexpr int qs = T == MXFP4_HUB ? 0 : T == MXFP4 ? 1 : T == Q4_0 || T == IQ4_NL ? 2 : T == Q4_1 || T == Q4_G32 ? 4
                   : T == Q5_0 ? 6 : 8;  // Q5_1: 8
  const __m256i v = pair128(a + qs, b + qs);
  lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if constexpr (T == Q5_0 || T == Q5_1) {
    constexpr int qh = T == Q5_0 ? 2 : 4;
    uint32_t ha, hb;
    std::memcpy(&ha, a + qh, 4), std::memcpy(&hb, b + qh, 4);
    lo = _mm256_or_si256(lo, bit_bytes((ha & 0xFFFFu) | hb << 16));
    hi = _mm256_or_si256(hi, bit_bytes(ha >> 16 | (hb & 0xFFFF0000u)));
  } else if constexpr (T == IQ4_NL || mxfp4_type<T>()) {
    alignas(16) static const int8_t book[16] = {
#define B(i) static_cast<int8_t>(T == IQ4_NL ? kIq4[i] : kMxfp4[i] + 12)
        B(0), B(1), B(2), B(3), B(4), B(5), B(6), B(7), B(8), B(9), B(10), B(11), B(12), B(13), B(14), B(15)};
#undef B
    const __m256i tb = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(book)));
    lo = _mm256_shuffle_epi8(tb, lo), hi = _mm256_shuffle_epi8(tb, hi);
  }
}

// Integer dot of one pair of blocks with its activations: lanes 0-3 block a, 4-7 block b.
template <int T>
inline __m256i pair_dot_codes(__m256i lo, __m256i hi, const int8_t* x) {
  const __m256i xl = ld256(x), xh = ld256(x + 32);
  if constexpr (signed32<T>()) {
    return _mm256_add_epi32(dot_u8s8(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(xl, lo)),
                            dot_u8s8(_mm256_sign_epi8(hi, hi), _mm256_sign_epi8(xh, hi)));
  } else {
#ifdef EMBER_VNNI
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
#else  // 5-bit codes (and MXFP4's <= 24): two products <= 2 * 2 * 31 * 127 in int16
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)),
                             _mm256_set1_epi16(1));
#endif
  }
}

template <int T>
inline __m256i pair_dot(const uint8_t* a, const uint8_t* b, const int8_t* x) {
  __m256i lo, hi;
  pair_codes<T>(a, b, lo, hi);
  return pair_dot_codes<T>(lo, hi, x);
}

// 8 E8M0 codes (int32 lanes) -> 2 ** (e - 128): e < 2 -> 0x00200000 << e (subnormal), else (e - 1) << 23.
inline __m256 e8m0_half8(__m256i e) {
  const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
  const __m256i nrm = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(sub, nrm, _mm256_cmpgt_epi32(e, _mm256_set1_epi32(1))));
}

// The fp16 (or MXFP4 e8m0) scales at byte ``at`` of 8 blocks from b, in kPerm order, as fp32; MXFP4_HUB's from
// its scale row sc (8 bytes).
template <int T>
inline __m256 scales8(const uint8_t* b, int at, const uint8_t* sc) {
  constexpr int bb = bytes32<T>();
  if constexpr (T == MXFP4_HUB) {
    uint64_t e8;
    std::memcpy(&e8, sc, 8);
    const __m256i e = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(e8)));
    return e8m0_half8(_mm256_permutevar8x32_epi32(e, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
  } else if constexpr (T == MXFP4) {
    return e8m0_half8(_mm256_setr_epi32(b[0], b[2 * bb], b[4 * bb], b[6 * bb], b[bb], b[3 * bb], b[5 * bb], b[7 * bb]));
  } else {
    (void)sc;
    const uint8_t* p = b + at;
    const uint64_t even = ld16(p) | ld16(p + 2 * bb) << 16 | ld16(p + 4 * bb) << 32 | ld16(p + 6 * bb) << 48;
    const uint64_t odd = ld16(p + bb) | ld16(p + 3 * bb) << 16 | ld16(p + 5 * bb) << 32 | ld16(p + 7 * bb) << 48;
    if constexpr (bf16_scales<T>())  // bf16 -> fp32: the 16 bits on top
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_set_epi64x(static_cast<int64_t>(odd), static_cast<int64_t>(even))), 16));
    return _mm256_cvtph_ps(_mm_set_epi64x(static_cast<int64_t>(odd), static_cast<int64_t>(even)));
  }
}

// The first 4 bytes of 8 blocks of bb bytes from b, in kPerm order (Q4_G32: bf16 s | bf16 z << 16), paired
// into 64-bit lanes. Written as _mm256_setr_epi32 of the 8 words (the same bits), the compiled kernel streamed
// about 20% fewer bytes a second from DRAM on one AVX2 core (as fast in cache): docs/gguf.md.
template <int bb>
inline __m256i sz8(const uint8_t* b) {
  auto w = [b](int k) {
    uint32_t v;
    std::memcpy(&v, b + k * bb, 4);
    return static_cast<uint64_t>(v);
  };
  const uint64_t e0 = w(0) | w(2) << 32, e1 = w(4) | w(6) << 32, o0 = w(1) | w(3) << 32, o1 = w(5) | w(7) << 32;
  return _mm256_set_epi64x(static_cast<int64_t>(o1), static_cast<int64_t>(o0), static_cast<int64_t>(e1),
                           static_cast<int64_t>(e0));
}

// R rows (rows[r]; MXFP4_HUB: scale rows srows[r]) of a 32-value type times one activation row. xp: xq in pair
// order (nb8 * 256); sxp, cqp, xsp: per block in kPerm order within each 8 (sx, the offset term cq, sx bs); xq, sx,
// bs16: natural order, for the blocks past nb8 * 8.
template <int T, int R>
void rows32(const uint8_t* const* rows, const uint8_t* const* srows, int64_t row_bytes, const int8_t* xp,
            const float* sxp, const float* cqp, const float* xsp, const int8_t* xq, const float* sx,
            const int16_t* bs16, int64_t nb, float* out) {
  constexpr int bb = bytes32<T>();
  const int64_t nb8 = nb / 8;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nb8; c++) {
    const int8_t* x = xp + 256 * c;
    const __m256 s = _mm256_loadu_ps(sxp + 8 * c), cq = _mm256_loadu_ps(cqp + 8 * c);
    for (int r = 0; r < R; r++) {
      const uint8_t* b = rows[r] + 8 * bb * c;
      gguf_prefetch(b, 8 * bb, row_bytes);
      const __m256i q0 = pair_dot<T>(b, b + bb, x), q1 = pair_dot<T>(b + 2 * bb, b + 3 * bb, x + 64);
      const __m256i q2 = pair_dot<T>(b + 4 * bb, b + 5 * bb, x + 128), q3 = pair_dot<T>(b + 6 * bb, b + 7 * bb, x + 192);
      const __m256i isum = _mm256_hadd_epi32(_mm256_hadd_epi32(q0, q1), _mm256_hadd_epi32(q2, q3));  // kPerm order
      const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, cq);
      if constexpr (bf16_scales<T>()) {  // s | z << 16 per block: bf16 -> fp32 is the 16 bits on top
        const __m256i sz = sz8<bb>(b);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(sz, 16)), f, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(sz, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))),
                                 _mm256_loadu_ps(xsp + 8 * c), acc[r]);
        continue;
      }
      acc[r] = _mm256_fmadd_ps(scales8<T>(b, 0, T == MXFP4_HUB ? srows[r] + 8 * c : nullptr), f, acc[r]);
      if constexpr (min32<T>())
        acc[r] = _mm256_fmadd_ps(scales8<T>(b, 2, nullptr), _mm256_loadu_ps(xsp + 8 * c), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    float y = hsum8(acc[r]);
    for (int64_t k = nb8 * 8; k < nb && T == MXFP4_HUB; k++) {  // the last blocks: book values, nibble order
      const uint8_t* q = rows[r] + 16 * k;
      int isum = 0;
      for (int j = 0; j < 16; j++)
        isum += kMxfp4[q[j] & 15] * xq[32 * k + 2 * j] + kMxfp4[q[j] >> 4] * xq[32 * k + 2 * j + 1];
      y += sx[k] * e8m0_half(srows[r][k]) * static_cast<float>(isum);
    }
    for (int64_t k = nb8 * 8; k < nb && T != MXFP4_HUB; k++) {  // the last blocks: the unpacked codes, sums per 16
      alignas(32) uint8_t u[32];
      float sc[2], mn[2];
      unpack_block(T, rows[r] + k * bb, u, sc, mn);
      for (int h = 0; h < 2; h++) {
        int isum = 0;
        for (int i = 0; i < 16; i++) isum += u[16 * h + i] * xq[32 * k + 16 * h + i];
        const float bs = static_cast<float>(bs16[2 * k + h]);
        y += sx[k] * (sc[h] * (static_cast<float>(isum) - static_cast<float>(code_offset(T)) * bs) + mn[h] * bs);
      }
    }
    out[r] = y;
  }
}

// R rows of a 32-value type (not MXFP4_HUB; nb a multiple of 8) times NX activation rows at once (prefill): each
// pair of blocks' codes decoded once for all of them. Per activation row j the arguments of rows32 (xp[j], sxp[j],
// ...); out[j][r]. The same operations in the same order as rows32 for each row, so the same bits.
template <int T, int R, int NX>
void rows32_xn(const uint8_t* const* rows, int64_t row_bytes, const int8_t* const* xp, const float* const* sxp,
               const float* const* cqp, const float* const* xsp, int64_t nb, float (*out)[kR]) {
  constexpr int bb = bytes32<T>();
  __m256 acc[NX][R];
  for (int j = 0; j < NX; j++)
    for (int r = 0; r < R; r++) acc[j][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nb / 8; c++) {
    for (int r = 0; r < R; r++) {
      const uint8_t* b = rows[r] + 8 * bb * c;
      gguf_prefetch(b, 8 * bb, row_bytes);
      __m256i q[NX][4];
      for (int p = 0; p < 4; p++) {
        __m256i lo, hi;
        pair_codes<T>(b + 2 * p * bb, b + (2 * p + 1) * bb, lo, hi);
        for (int j = 0; j < NX; j++) q[j][p] = pair_dot_codes<T>(lo, hi, xp[j] + 256 * c + 64 * p);
      }
      __m256 d, m = _mm256_setzero_ps();
      if constexpr (bf16_scales<T>()) {
        const __m256i sz = sz8<bb>(b);
        d = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
        m = _mm256_castsi256_ps(_mm256_and_si256(sz, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      } else {
        d = scales8<T>(b, 0, nullptr);
        if constexpr (min32<T>()) m = scales8<T>(b, 2, nullptr);
      }
      for (int j = 0; j < NX; j++) {
        const __m256i isum = _mm256_hadd_epi32(_mm256_hadd_epi32(q[j][0], q[j][1]), _mm256_hadd_epi32(q[j][2], q[j][3]));
        const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_loadu_ps(sxp[j] + 8 * c),
                                         _mm256_loadu_ps(cqp[j] + 8 * c));
        acc[j][r] = _mm256_fmadd_ps(d, f, acc[j][r]);
        if constexpr (min32<T>()) acc[j][r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsp[j] + 8 * c), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NX; j++)
    for (int r = 0; r < R; r++) out[j][r] = hsum8(acc[j][r]);
}

// ---- K-quants (256-value super-blocks), in their own header

#include "gguf_simd_k.h"

// A row of a 32-value type decoded to fp32 w (nb blocks, nb even) with the reference's roundings: w = d * v
// (v = u - off, or the signed value) or d * u + m, each an exact product and at most one rounded add.
template <int T>
void decode_row32(const uint8_t* row, int64_t nb, float* w) {
  constexpr int bb = bytes32<T>();
  auto out8 = [](__m128i v8, __m256 d, __m256 m, float* o) {  // 8 codes (low bytes of v8) -> o[0..7]
    __m256 f = _mm256_cvtepi32_ps(signed32<T>() ? _mm256_cvtepi8_epi32(v8) : _mm256_cvtepu8_epi32(v8));
    if constexpr (off32<T>() != 0.f) f = _mm256_sub_ps(f, _mm256_set1_ps(off32<T>()));
    f = _mm256_mul_ps(d, f);
    _mm256_storeu_ps(o, min32<T>() ? _mm256_add_ps(f, m) : f);
  };
  for (int64_t k = 0; k + 1 < nb; k += 2) {
    const uint8_t* a = row + k * bb;
    __m256i lo, hi;
    pair_codes<T>(a, a + bb, lo, hi);
    for (int j = 0; j < 2; j++) {  // block k + j: [lo lane j | hi lane j] in natural order
      const uint8_t* b = a + j * bb;
      const __m256i v = j ? _mm256_permute2x128_si256(lo, hi, 0x31) : _mm256_permute2x128_si256(lo, hi, 0x20);
      auto f16 = [](const uint8_t* p) { return bf16_scales<T>() ? bf16_to_f32(static_cast<uint16_t>(ld16(p))) : f16_to_f32(p); };
      const __m256 d = _mm256_set1_ps(T == MXFP4 ? e8m0_half(b[0]) : f16(b));
      const __m256 m = _mm256_set1_ps(min32<T>() ? f16(b + 2) : 0.f);
      const __m128i v0 = _mm256_castsi256_si128(v), v1 = _mm256_extracti128_si256(v, 1);
      float* o = w + 32 * (k + j);
      out8(v0, d, m, o), out8(_mm_srli_si128(v0, 8), d, m, o + 8);
      out8(v1, d, m, o + 16), out8(_mm_srli_si128(v1, 8), d, m, o + 24);
    }
  }
}

// 32 codes u (u8) -> o[0..31]: w = c * (u - off) (symmetric) or c * u + m (affine); c, m: first 16, last 16.
template <bool AFFINE>
inline void decode32(__m256i u, float c0, float c1, float m0, float m1, float off, float* o) {
  const __m128i a = _mm256_castsi256_si128(u), b = _mm256_extracti128_si256(u, 1);
  const __m128i part[4] = {a, _mm_srli_si128(a, 8), b, _mm_srli_si128(b, 8)};
  for (int q = 0; q < 4; q++) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[q]));
    const __m256 c = _mm256_set1_ps(q < 2 ? c0 : c1);
    _mm256_storeu_ps(o + 8 * q, AFFINE ? _mm256_add_ps(_mm256_mul_ps(c, f), _mm256_set1_ps(q < 2 ? m0 : m1))
                                       : _mm256_mul_ps(c, _mm256_sub_ps(f, _mm256_set1_ps(off))));
  }
}

// A row of Q4_K, Q5_K or Q6_K decoded to fp32 w with the reference's roundings (as unpack_block + decode_row).
template <int T>
void decode_rowk(const uint8_t* row, int64_t nb, float* w) {
  constexpr int bb = bytesk<T>();
  for (int64_t k = 0; k < nb; k++) {
    const uint8_t* b = row + bb * k;
    float* o = w + 256 * k;
    if constexpr (T == Q6_K) {
      const float d = f16_to_f32(b + 208);
      for (int h = 0; h < 2; h++) {
        __m256i u[4];
        q6_codes(b, h, u);
        for (int i = 0; i < 4; i++) {
          const int g = 8 * h + 2 * i;
          decode32<false>(u[i], d * static_cast<float>(static_cast<int8_t>(b[192 + g])),
                          d * static_cast<float>(static_cast<int8_t>(b[193 + g])), 0.f, 0.f, 32.f, o + 128 * h + 32 * i);
        }
      }
    } else {
      const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
      alignas(16) uint8_t sm[16];  // 8 scales, 8 mins
      _mm_store_si128(reinterpret_cast<__m128i*>(sm), k_scales(b + 4));
      __m256i qh = T == Q5_K ? ld256(b + 16) : _mm256_setzero_si256();
      for (int c = 0; c < 4; c++) {
        __m256i lo, hi;
        k45_codes<T>(b + (T == Q4_K ? 16 : 48) + 32 * c, qh, lo, hi);
        for (int j = 0; j < 2; j++) {
          const float cj = d * static_cast<float>(sm[2 * c + j]), mj = -(dmin * static_cast<float>(sm[8 + 2 * c + j]));
          decode32<true>(j ? hi : lo, cj, cj, mj, mj, 0.f, o + 64 * c + 32 * j);
        }
      }
    }
  }
}

// The row decoded to w where a register decoder exists (32-value types with an even block count, Q4_K, Q5_K,
// Q6_K); false otherwise (the caller unpacks).
inline bool decode_row_simd(int t, const uint8_t* row, int64_t I, float* w) {
  if (I % 64) return false;
#define GGUF_CASE(T) \
  case T:              \
    decode_row32<T>(row, I / 32, w); \
    return true;
  switch (t) {
    GGUF_CASE(Q4_0) GGUF_CASE(Q4_1) GGUF_CASE(Q5_0) GGUF_CASE(Q5_1) GGUF_CASE(Q8_0) GGUF_CASE(IQ4_NL) GGUF_CASE(MXFP4)
    GGUF_CASE(Q4_G32)
    case Q4_K: return decode_rowk<Q4_K>(row, I / 256, w), true;
    case Q5_K: return decode_rowk<Q5_K>(row, I / 256, w), true;
    case Q6_K: return decode_rowk<Q6_K>(row, I / 256, w), true;
    default: return false;
  }
#undef GGUF_CASE
}

// n fp32 values (n % 16 == 0) to out: fp32, or bf16 rounded to nearest even with NaN kept quiet (f32_to_bf16).
inline void store_row_simd(void* out, const float* w, int64_t n, int out_bf16) {
  if (!out_bf16) {
    std::memcpy(out, w, static_cast<size_t>(n) * 4);
    return;
  }
  auto bf = [](__m256i u) {
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  };
  uint16_t* o = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; i += 16) {
    const __m256i a = bf(_mm256_castps_si256(_mm256_loadu_ps(w + i)));
    const __m256i b = bf(_mm256_castps_si256(_mm256_loadu_ps(w + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
  }
}

// ---- the call: activations prepared once, then blocks of kR rows (OpenMP over blocks)

thread_local std::vector<int8_t> simd_xq;
thread_local std::vector<float> simd_f;
thread_local std::vector<int16_t> simd_bs;

// The 32 values of each block as its 16 even ones, then its 16 odd ones (MXFP4_HUB's nibble order).
void evens_odds(const int8_t* xq, int64_t nb, int8_t* out) {
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t k = 0; k < nb; k++) {
    const __m128i a = _mm_shuffle_epi8(ld128(xq + 32 * k), split), b = _mm_shuffle_epi8(ld128(xq + 32 * k + 16), split);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * k), _mm_unpacklo_epi64(a, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * k + 16), _mm_unpackhi_epi64(a, b));
  }
}

// One weight of a linear_simd_jobs call: W (O, row_bytes) times the prepared activation rows m0..m0+nm-1 into
// Y (nm, O); S: MXFP4_HUB's scales (O, I/32) (row_bytes is then I / 2).
struct SimdJob {
  const uint8_t* W;
  int64_t O;
  uint16_t* Y;
  int64_t m0, nm;
  const uint8_t* S;
};
constexpr int kMaxSimdJobs = 8;

// n <= kMaxSimdJobs weights of type T, one row width, against the bf16 activation rows X (M, I): X quantized once,
// then the kR-row blocks of every job in one parallel region (static for one weight: one contiguous run per
// thread; guided for several, so the thread that finishes first takes the last blocks).
template <int T>
void linear_simd_jobs(const SimdJob* jobs, int n, int64_t row_bytes, const uint16_t* X, int64_t M, int64_t I,
                      int nthreads) {
  constexpr bool kq = T != MXFP4_HUB && block_elems(T) == 256;
  constexpr int G = kq ? 256 : 32;
  const int64_t nb = I / G, nb8 = kq ? 0 : nb / 8, S = I / G;
  simd_xq.resize(static_cast<size_t>((T == MXFP4_HUB ? 3 : 2) * M * I));
  simd_f.resize(static_cast<size_t>(M * (S + 3 * 8 * nb8)));
  simd_bs.resize(static_cast<size_t>(M * (I / 16 + I / 32)));
  int8_t* xq = simd_xq.data();
  int8_t* xp = xq + M * I;
  float* sx = simd_f.data();
  int16_t* bs16 = simd_bs.data();
  int16_t* bs32 = bs16 + M * (I / 16);
  float* sxp = sx + M * S;
  float* cqp = sxp + M * 8 * nb8;
  float* xsp = cqp + M * 8 * nb8;
  for (int64_t m = 0; m < M; m++) {
    quantize_x<G>(X + m * I, I, xq + m * I, sx + m * S, bs16 + m * (I / 16), bs32 + m * (I / 32));
    if constexpr (T == IQ4_XS) pair_order(xq + m * I, nb, xp + m * I);
    if constexpr (T == MXFP4_HUB) {
      int8_t* eo = xq + 2 * M * I;  // scratch
      evens_odds(xq + m * I, nb8 * 8, eo);
      pair_order(eo, nb8, xp + m * I);
    } else if constexpr (!kq) {
      pair_order(xq + m * I, nb8, xp + m * I);
    }
    if constexpr (!kq) {
      for (int64_t c = 0; c < nb8; c++)
        for (int l = 0; l < 8; l++) {
          const int64_t k = 8 * c + kPerm[l], i = m * 8 * nb8 + 8 * c + l;
          const float s = sx[m * S + k], xs = s * static_cast<float>(bs32[m * (I / 32) + k]);
          sxp[i] = s;
          cqp[i] = off32<T>() == 0.f ? 0.f : -off32<T>() * xs;
          xsp[i] = xs;
        }
    }
  }
  int64_t first[kMaxSimdJobs + 1] = {0};  // job j's blocks are [first[j], first[j + 1]) of one range
  for (int j = 0; j < n; j++) first[j + 1] = first[j] + (jobs[j].O + kR - 1) / kR;
  auto block = [&](int64_t t) {
    int j = 0;
    while (t >= first[j + 1]) j++;
    const SimdJob& job = jobs[j];
    const int64_t O = job.O, o0 = (t - first[j]) * kR, n = std::min<int64_t>(kR, O - o0);
    uint16_t* Y = job.Y - job.m0 * O;
    const uint8_t* rows[kR];
    const uint8_t* srows[kR] = {};
    for (int r = 0; r < kR; r++) {
      rows[r] = job.W + (o0 + std::min<int64_t>(r, n - 1)) * row_bytes;
      if (job.S) srows[r] = job.S + (o0 + std::min<int64_t>(r, n - 1)) * nb;
    }
    float y[kR], yn[kNX][kR];
    for (int64_t m = job.m0; m < job.m0 + job.nm; m++) {
      if constexpr (!kq && T != MXFP4_HUB) {
        if (n == kR && nb % 8 == 0 && m + 1 < job.m0 + job.nm) {  // NX activation rows on one decode of the codes
          const int nx = m + kNX <= job.m0 + job.nm ? kNX : 2;
          const int8_t* xs[kNX];
          const float *sv[kNX], *cv[kNX], *mv[kNX];
          for (int j = 0; j < nx; j++) {
            const int64_t a = (m + j) * 8 * nb8;
            xs[j] = xp + (m + j) * I, sv[j] = sxp + a, cv[j] = cqp + a, mv[j] = xsp + a;
          }
          if (nx == kNX) rows32_xn<T, kR, kNX>(rows, row_bytes, xs, sv, cv, mv, nb, yn);
          else rows32_xn<T, kR, 2>(rows, row_bytes, xs, sv, cv, mv, nb, yn);
          for (int j = 0; j < nx; j++)
            for (int r = 0; r < kR; r++) Y[(m + j) * O + o0 + r] = f32_to_bf16(yn[j][r]);
          m += nx - 1;
          continue;
        }
      }
      const float* s = sx + m * S;
      const int16_t* b16 = bs16 + m * (I / 16);
      const int16_t* b32 = bs32 + m * (I / 32);
      if constexpr (kq) {
        const int8_t* x = (T == IQ4_XS ? xp : xq) + m * I;
        if (n == kR) rowsk<T, kR>(rows, row_bytes, x, s, b16, b32, nb, y);
        else
          for (int r = 0; r < n; r++) rowsk<T, 1>(rows + r, row_bytes, x, s, b16, b32, nb, y + r);
      } else {
        const int64_t a = m * 8 * nb8;
        if (n == kR)
          rows32<T, kR>(rows, srows, row_bytes, xp + m * I, sxp + a, cqp + a, xsp + a, xq + m * I, s, b16, nb, y);
        else
          for (int r = 0; r < n; r++)
            rows32<T, 1>(rows + r, srows + r, row_bytes, xp + m * I, sxp + a, cqp + a, xsp + a, xq + m * I, s, b16,
                         nb, y + r);
      }
      for (int r = 0; r < n; r++) Y[m * O + o0 + r] = f32_to_bf16(y[r]);
    }
  };
  if (n == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < first[1]; t++) block(t);
  } else {
#pragma omp parallel for num_threads(nthreads) schedule(guided)
    for (int64_t t = 0; t < first[n]; t++) block(t);
  }
}

// S_hub: MXFP4_HUB's scales (O, I/32); row_bytes is then I / 2.
template <int T>
void linear_simd_t(const uint8_t* W, int64_t row_bytes, const uint16_t* X, uint16_t* Y, int64_t M, int64_t O,
                   int64_t I, int nthreads, const uint8_t* S_hub = nullptr) {
  const SimdJob job{W, O, Y, 0, M, S_hub};
  linear_simd_jobs<T>(&job, 1, row_bytes, X, M, I, nthreads);
}

// linear_simd_jobs for ggml type t (one of the types above; nothing done for another).
void linear_simd_many(int t, const SimdJob* jobs, int n, int64_t row_bytes, const uint16_t* X, int64_t M, int64_t I,
                      int nthreads) {
#define GGUF_CASE(T) \
  case T:              \
    return linear_simd_jobs<T>(jobs, n, row_bytes, X, M, I, nthreads);
  switch (t) {
    GGUF_CASE(Q4_0) GGUF_CASE(Q4_1) GGUF_CASE(Q5_0) GGUF_CASE(Q5_1) GGUF_CASE(Q8_0) GGUF_CASE(IQ4_NL) GGUF_CASE(MXFP4)
    GGUF_CASE(Q4_G32)
    GGUF_CASE(Q2_K) GGUF_CASE(Q3_K) GGUF_CASE(Q4_K) GGUF_CASE(Q5_K) GGUF_CASE(Q6_K) GGUF_CASE(IQ4_XS)
    default: return;
  }
#undef GGUF_CASE
}

// Y (M, O) bf16 = X (M, I) bf16 @ W^T.
void linear_simd(int t, const uint8_t* W, int64_t row_bytes, const uint16_t* X, uint16_t* Y, int64_t M, int64_t O,
                 int64_t I, int nthreads) {
  const SimdJob job{W, O, Y, 0, M, nullptr};
  linear_simd_many(t, &job, 1, row_bytes, X, M, I, nthreads);
}

