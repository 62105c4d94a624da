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
//   int8 path (AVX2 and AVX512-VNNI builds, bf16 activations and output): gguf.cpp's ember_mxfp4_q8, the register-
//     decoding kernel of GGUF's MXFP4 blocks (gguf_simd.h) over this layout: E2M1 values x 2 are the int8 values
//     {0, 1, 2, 3, 4, 6, 8, 12} with a sign (vpshufb from the nibble), the activations rounded to int8 per block of
//     32 (scale max|x| / 127, nearest even), byte products summed per block in int32 and scaled by 2^(e - 128) and
//     the activation scale in fp32, four weight rows per pass. Exact against those int8 activations up to fp32
//     summation order.
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

}  // namespace

extern "C" {

int ember_mxfp4_q8(const uint8_t* blocks, const uint8_t* scales, const uint16_t* X, uint16_t* Y, int64_t M, int64_t O,
                   int64_t I, int nthreads);  // gguf.cpp

// 1 when bf16 activations can take the int8 path in this build.
int ember_mxfp4_int8_path() {
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  return 1;
#else
  return 0;
#endif
}

// Y (M, O) = X (M, I) @ W^T for W in MXFP4 (file comment). x_bf16 / y_bf16: the dtypes of X and Y (else fp32);
// act_q8: let bf16 activations take the int8 path where the build has it. Returns the path taken: 1 fp32, 2 int8.
int ember_mxfp4(const uint8_t* blocks, const uint8_t* scales, const void* X, int x_bf16, void* Y, int y_bf16,
                int64_t M, int64_t O, int64_t I, int act_q8, int nthreads) {
  const int64_t G = I / kBlock;
  if (x_bf16 && y_bf16 && act_q8 &&
      ember_mxfp4_q8(blocks, scales, static_cast<const uint16_t*>(X), static_cast<uint16_t*>(Y), M, O, I, nthreads))
    return 2;
  std::vector<float> xd(M * I);
  for (int64_t m = 0; m < M; m++) deinterleave_f32(X, x_bf16, m, I, xd.data() + m * I);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = 0; o < O; o++)
    for (int64_t m = 0; m < M; m++)
      store_y(Y, m * O + o, row_f32(blocks + o * G * 16, scales + o * G, xd.data() + m * I, G), y_bf16);
  return 1;
}

}  // extern "C"
