// MXFP4 (OCP Microscaling FP4) weight x activation products for a few activation rows (decode).
//
// Weight W (O, I) as gpt-oss stores it: blocks (O, I/32, 16) uint8, two E2M1 codes per byte with element 2j in
// the LOW nibble and 2j+1 in the high one; scales (O, I/32) uint8 E8M0, the block's scale 2^(e - 127) (255: NaN).
// Code bits s e1 e0 m: kE2M1 below.
//
// The activations are first rewritten once per call (M rows, cheap next to the weights) so that the nibbles can
// be used in the order they are stored: within each block of 32, the 16 even elements, then the 16 odd ones.
//
// Paths, by the activations' dtype and the build:
//   fp32 path (every build; fp32 activations always, bf16 ones where there is no int8 path or it is switched
//     off): the codes become fp32 values by a table lookup (AVX512: vpermps on the 16-entry table; AVX2:
//     vpermps on the 8 magnitudes plus the sign bit; portable: an array), one fp32 sum per block is scaled by
//     2^(e - 127) and accumulated in fp32. With fp32 activations this is the dequantized weight's product up to
//     fp32 summation order.
//   int8 path (AVX512-VNNI, bf16 activations): E2M1 values x 2 are the integers {0, 1, 2, 3, 4, 6, 8, 12} with a
//     sign, so a code is exactly the byte 2w + 12 (0..24, vpshufb); the activations are rounded to int8 per block
//     of 32 (scale max|x| / 127, nearest even) and vpdpbusd sums u8 x s8 products. Per block the dot is
//     sum((2w + 12) xq) - 12 sum(xq) = 2 sum(w xq), so the result is exact against those int8 activations.
#include "common.h"

using namespace ember_common;

namespace {

constexpr int kBlock = 32;
const float kE2M1[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// E8M0 code -> 2^(code - 127) (code 0 is the subnormal 2^-127; 255 is NaN).
struct E8M0Table {
  float v[256];
  E8M0Table() {
    for (int e = 0; e < 255; e++) v[e] = std::ldexp(1.0f, e - 127);
    v[255] = NAN;
  }
};
const E8M0Table kE8M0;

// Row m of X (fp32 or bf16) as fp32 in the stored nibble order (per block: evens, then odds).
void deinterleave_f32(const void* X, int x_bf16, int64_t m, int64_t I, float* out) {
  for (int64_t b = 0; b < I; b += kBlock)
    for (int j = 0; j < kBlock / 2; j++) {
      out[b + j] = load_f(X, m * I + b + 2 * j, x_bf16);
      out[b + kBlock / 2 + j] = load_f(X, m * I + b + 2 * j + 1, x_bf16);
    }
}

// One weight row times one de-interleaved activation row (the fp32 path).
inline float row_f32(const uint8_t* wb, const uint8_t* sc, const float* xd, int64_t G) {
#if defined(EMBER_X86)
  const __m512 tab = _mm512_loadu_ps(kE2M1);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + g * 16)));
    __m512 wl = _mm512_permutexvar_ps(v, tab);  // vpermps reads the index's low 4 bits: the low nibble
    __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
    __m512 s = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xd + g * kBlock + 16), _mm512_mul_ps(wl, _mm512_loadu_ps(xd + g * kBlock)));
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(kE8M0.v[sc[g]]), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(EMBER_AVX2)
  const __m256 mag = _mm256_loadu_ps(kE2M1);  // the 8 magnitudes; the code's bit 3 is the sign
  const __m256i m7 = _mm256_set1_epi32(7), m8 = _mm256_set1_epi32(8), mf = _mm256_set1_epi32(15);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + g * 16));
    __m256 s = _mm256_setzero_ps();
    for (int h = 0; h < 2; h++) {  // bytes 0-7, then 8-15: elements 16h + 0..7 of the evens and of the odds
      __m256i v = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(raw, 8) : raw);
      __m256i lo = _mm256_and_si256(v, mf), hi = _mm256_srli_epi32(v, 4);
      __m256 wl = _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, _mm256_and_si256(lo, m7)),
                                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(lo, m8), 28)));
      __m256 wh = _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, _mm256_and_si256(hi, m7)),
                                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(hi, m8), 28)));
      s = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xd + g * kBlock + 8 * h), s);
      s = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xd + g * kBlock + 16 + 8 * h), s);
    }
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(kE8M0.v[sc[g]]), acc);
  }
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
#else
  float acc = 0.f;
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* b = wb + g * 16;
    const float* xv = xd + g * kBlock;
    float s = 0.f;
    for (int j = 0; j < 16; j++) s += kE2M1[b[j] & 15] * xv[j] + kE2M1[b[j] >> 4] * xv[16 + j];
    acc += s * kE8M0.v[sc[g]];
  }
  return acc;
#endif
}

#if defined(EMBER_VNNI)
// Activations for the int8 path, per row and per pair of blocks (a, b) (an odd last block pairs with zeros):
//   q:     64 int8 in the order of the weight vector below: evens a, evens b, odds a, odds b;
//   scale: 16 fp32 lanes, 0.5 * max|x| / 127 of block a in lanes 0-3 and 8-11, of block b in lanes 4-7, 12-15;
//   corr:  16 int32 lanes, 12 * sum(q) of block a in lane 0, of block b in lane 4, zero elsewhere.
struct Q8Row {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> corr;
};

void quantize_row(const void* X, int x_bf16, int64_t m, int64_t I, Q8Row& r) {
  const int64_t G = I / kBlock, P = (G + 1) / 2;
  r.q.assign(P * 64, 0);
  r.scale.assign(P * 16, 0.f);
  r.corr.assign(P * 16, 0);
  for (int64_t g = 0; g < G; g++) {
    float v[kBlock], amax = 0.f;
    for (int j = 0; j < kBlock; j++) {
      v[j] = load_f(X, m * I + g * kBlock + j, x_bf16);
      amax = std::max(amax, std::fabs(v[j]));
    }
    const int64_t p = g / 2, side = g % 2;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < kBlock; j++) {
      int8_t qv = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      sum += qv;
      r.q[p * 64 + (j % 2) * 32 + side * 16 + j / 2] = qv;
    }
    for (int k = 0; k < 4; k++) r.scale[p * 16 + side * 4 + k] = r.scale[p * 16 + 8 + side * 4 + k] = 0.5f * amax / 127.f;
    r.corr[p * 16 + side * 4] = 12 * sum;
  }
}

inline float row_q8(const uint8_t* wb, const uint8_t* sc, const Q8Row& x, int64_t G) {
  // 2w + 12 for each code, in every 128-bit lane for vpshufb
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  const int64_t P = (G + 1) / 2;
  for (int64_t p = 0; p < P; p++) {
    const bool pair = 2 * p + 1 < G;
    __m256i w = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + p * 32))
                     : _mm256_maskz_loadu_epi8(0x0000FFFFu, wb + p * 32);
    __m256i lo = _mm256_and_si256(w, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m0f);
    __m512i u = _mm512_shuffle_epi8(lut, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(x.q.data() + p * 64));
    d = _mm512_sub_epi32(d, _mm512_loadu_si512(x.corr.data() + p * 16));
    __m512 ws = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(kE8M0.v[sc[2 * p]]),
                                     _mm512_set1_ps(pair ? kE8M0.v[sc[2 * p + 1]] : 0.f));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws, _mm512_loadu_ps(x.scale.data() + p * 16)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

}  // namespace

extern "C" {

// 1 when bf16 activations can take the int8 (VNNI) path in this build.
int ember_mxfp4_int8_path() { return kVnni; }

// Y (M, O) = X (M, I) @ W^T for W in MXFP4 (file comment). x_bf16 / y_bf16: the dtypes of X and Y (else fp32);
// act_q8: let bf16 activations take the int8 path where the build has it. Returns the path taken: 1 fp32, 2 int8.
int ember_mxfp4(const uint8_t* blocks, const uint8_t* scales, const void* X, int x_bf16, void* Y, int y_bf16,
                int64_t M, int64_t O, int64_t I, int act_q8, int nthreads) {
  const int64_t G = I / kBlock;
#if defined(EMBER_VNNI)
  if (x_bf16 && act_q8) {
    std::vector<Q8Row> xq(M);
    for (int64_t m = 0; m < M; m++) quantize_row(X, x_bf16, m, I, xq[m]);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++)
      for (int64_t m = 0; m < M; m++) store_y(Y, m * O + o, row_q8(blocks + o * G * 16, scales + o * G, xq[m], G), y_bf16);
    return 2;
  }
#endif
  (void)act_q8;
  std::vector<float> xd(M * I);
  for (int64_t m = 0; m < M; m++) deinterleave_f32(X, x_bf16, m, I, xd.data() + m * I);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = 0; o < O; o++)
    for (int64_t m = 0; m < M; m++)
      store_y(Y, m * O + o, row_f32(blocks + o * G * 16, scales + o * G, xd.data() + m * I, G), y_bf16);
  return 1;
}

}  // extern "C"
