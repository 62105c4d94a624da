// GGUF (ggml) block types multiplied as they are stored: Y (M, O) = X (M, I) @ W^T, W rows of ggml blocks.
//
// W is the file's tensor, row after row of blocks (``row_bytes`` per row; blocks never cross rows), in one of
// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4 (ggml type ids below), and
// Ember's own int4 group 32 as blocks (Q4_G32).
// The exact paths first unpack a type, one weight row at a time into a per-thread
// L1-resident scratch, to one common form: a byte code u per element and, per 16 elements g, a float scale sc[g], a float min mn[g] and a
// per-type integer offset ``off``:
//
//     w = sc[g] * (u - off) + mn[g]        (mn = 0 for the symmetric types, off = 0 for the affine ones)
//
// which is each type's own dequantization formula with the reference's fp32 roundings (ggml's / gguf-py's
// ``dequantize``): a scale times a small integer is exact, and the affine types' one add is the reference's.
//
//   fp32 X (every tier) and bf16 X in the portable build: w decoded to fp32 and dotted in fp32, so Y equals
//     X @ dequantize(W)^T to fp32 rounding (the order of the adds differs).
//   bf16 X with AVX512-VNNI (or AVX2): X quantized to int8 (x ~ sx * xq, llama.cpp's Q8 activations: per 32 values
//     for the 32-value types, per 256 for the K-quants and IQ4_XS) and every type decoded in registers, four weight
//     rows per pass, codes multiplied as bytes (gguf_simd.h).
//
// Threads: OpenMP over contiguous blocks of 4 output rows (as the cpu_*.cpp kernels); an unpacked row serves all M rows.

#include "common.h"

using namespace ember_common;

namespace {

constexpr int kRows = 4;  // output rows per thread block
constexpr int kGroup = 16;

enum GgmlType : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
  IQ4_NL = 20, IQ4_XS = 23, MXFP4 = 39,
  MXFP4_HUB = 1039,  // not a ggml type: gpt-oss's hub layout of MXFP4 (mxfp4.cpp), on gguf_simd.h's MXFP4 path
  // not a ggml type: Ember's int4 group 32 (ember/quant/int4_blocks.py) as 20-byte blocks: bf16 scale s, bf16 zero z
  // (the value at code 8), 16 bytes of nibbles in Q4_0's order; w = s * (u - 8) + z
  Q4_G32 = 1040,
};

const int8_t kIq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
const int8_t kMxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// (elements, bytes) of one block; 0 for a type this file does not take.
constexpr int block_elems(int t) {
  switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case IQ4_NL: case MXFP4: case Q4_G32: return 32;
    case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: case IQ4_XS: return 256;
    default: return 0;
  }
}

inline int block_bytes(int t) {
  switch (t) {
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22; case Q5_1: return 24; case Q8_0: return 34;
    case Q2_K: return 84; case Q3_K: return 110; case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    case IQ4_NL: return 18; case IQ4_XS: return 136; case MXFP4: return 17; case Q4_G32: return 20;
    default: return 0;
  }
}

// The integer subtracted from u in the type's formula (0 for the affine types, whose min is in mn; Q4_G32 has both).
inline int code_offset(int t) {
  switch (t) {
    case Q4_0: case Q4_G32: return 8; case Q5_0: return 16; case Q8_0: return 128; case Q3_K: return 4; case Q6_K: return 32;
    case IQ4_NL: case IQ4_XS: case MXFP4: return 128;
    default: return 0;
  }
}

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if (defined(EMBER_X86) || defined(EMBER_AVX2)) && defined(__F16C__)
  return _cvtsh_ss(h);  // exact, as the bit manipulation below
#endif
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; e++; } while (!(man & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float e8m0_half(uint8_t e) {  // 2 ** (e - 128), as ggml_e8m0_to_fp32_half
  uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Element i < 16 of a 32-block: low nibble of byte i; i >= 16: high nibble of byte i - 16.
inline void nibbles32(const uint8_t* qs, uint8_t* u) {
  for (int i = 0; i < 16; i++) u[i] = qs[i] & 0x0F, u[i + 16] = qs[i] >> 4;
}

inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {  // Q4_K/Q5_K's 6-bit packing
  if (j < 4) {
    sc = s[j] & 63, m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// One block -> codes u (block_elems), scales sc and mins mn (block_elems / 16), the formula in the header.
void unpack_block(int t, const uint8_t* b, uint8_t* u, float* sc, float* mn) {
  switch (t) {
    case Q8_0: {
      const float d = f16_to_f32(b);
      for (int i = 0; i < 32; i++) u[i] = static_cast<uint8_t>(b[2 + i] ^ 0x80);  // q + 128
      sc[0] = sc[1] = d, mn[0] = mn[1] = 0.f;
      break;
    }
    case Q4_0: case IQ4_NL: {
      const float d = f16_to_f32(b);
      nibbles32(b + 2, u);
      if (t == IQ4_NL)
        for (int i = 0; i < 32; i++) u[i] = static_cast<uint8_t>(kIq4[u[i]] + 128);
      sc[0] = sc[1] = d, mn[0] = mn[1] = 0.f;
      break;
    }
    case MXFP4: {
      const float d = e8m0_half(b[0]);
      nibbles32(b + 1, u);
      for (int i = 0; i < 32; i++) u[i] = static_cast<uint8_t>(kMxfp4[u[i]] + 128);
      sc[0] = sc[1] = d, mn[0] = mn[1] = 0.f;
      break;
    }
    case Q4_G32: {
      uint16_t h[2];
      std::memcpy(h, b, 4);
      nibbles32(b + 4, u);
      sc[0] = sc[1] = bf16_to_f32(h[0]), mn[0] = mn[1] = bf16_to_f32(h[1]);
      break;
    }
    case Q4_1: {
      const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
      nibbles32(b + 4, u);
      sc[0] = sc[1] = d, mn[0] = mn[1] = m;
      break;
    }
    case Q5_0: case Q5_1: {
      const int base = t == Q5_0 ? 2 : 4;
      const float d = f16_to_f32(b), m = t == Q5_1 ? f16_to_f32(b + 2) : 0.f;
      uint32_t qh;
      std::memcpy(&qh, b + base, 4);
      nibbles32(b + base + 4, u);
      for (int i = 0; i < 32; i++) u[i] = static_cast<uint8_t>(u[i] | ((qh >> i) & 1) << 4);
      sc[0] = sc[1] = d, mn[0] = mn[1] = m;
      break;
    }
    case Q2_K: {  // 16 B scales | 64 B codes | d | dmin
      const float d = f16_to_f32(b + 80), dmin = f16_to_f32(b + 82);
      for (int g = 0; g < 16; g++) sc[g] = d * static_cast<float>(b[g] & 0x0F),
                                   mn[g] = -(dmin * static_cast<float>(b[g] >> 4));
      for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
          for (int l = 0; l < 32; l++) u[128 * h + 32 * j + l] = (b[16 + 32 * h + l] >> (2 * j)) & 3;
      break;
    }
    case Q3_K: {  // 32 B hmask | 64 B codes | 12 B scales | d
      const float d = f16_to_f32(b + 108);
      const uint8_t* s = b + 96;
      for (int g = 0; g < 16; g++) {
        int low = g < 8 ? s[g] & 0x0F : s[g - 8] >> 4;
        int high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        sc[g] = d * static_cast<float>((low | high << 4) - 32), mn[g] = 0.f;
      }
      for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
          for (int l = 0; l < 32; l++) {
            const int e = 128 * h + 32 * j + l;
            u[e] = static_cast<uint8_t>(((b[32 + 32 * h + l] >> (2 * j)) & 3) + 4 * ((b[l] >> (e / 32)) & 1));
          }
      break;
    }
    case Q4_K: case Q5_K: {  // d | dmin | 12 B scales | (Q5_K: 32 B high bits) | 128 B nibbles
      const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
      const uint8_t* qs = b + (t == Q4_K ? 16 : 48);
      for (int j = 0; j < 8; j++) {
        int s, m;
        k_scale_min(b + 4, j, s, m);
        sc[2 * j] = sc[2 * j + 1] = d * static_cast<float>(s);
        mn[2 * j] = mn[2 * j + 1] = -(dmin * static_cast<float>(m));
      }
      for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) u[64 * c + l] = qs[32 * c + l] & 0x0F, u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
      if (t == Q5_K)
        for (int j = 0; j < 8; j++)
          for (int l = 0; l < 32; l++) u[32 * j + l] = static_cast<uint8_t>(u[32 * j + l] | ((b[16 + l] >> j) & 1) << 4);
      break;
    }
    case Q6_K: {  // 128 B low nibbles | 64 B high pairs | 16 int8 scales | d
      const float d = f16_to_f32(b + 208);
      for (int g = 0; g < 16; g++) sc[g] = d * static_cast<float>(static_cast<int8_t>(b[192 + g])), mn[g] = 0.f;
      for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
          for (int l = 0; l < 32; l++)
            u[128 * h + 32 * j + l] = static_cast<uint8_t>(((b[64 * h + 32 * (j & 1) + l] >> (4 * (j >> 1))) & 0x0F) |
                                                           ((b[128 + 32 * h + l] >> (2 * j)) & 3) << 4);
      break;
    }
    case IQ4_XS: {  // d | uint16 scale highs | 4 B scale lows | 128 B nibbles
      const float d = f16_to_f32(b);
      const int sh = b[2] | b[3] << 8;
      for (int j = 0; j < 8; j++) {
        int ls = ((b[4 + j / 2] >> (4 * (j & 1))) & 0x0F) | ((sh >> (2 * j)) & 3) << 4;
        sc[2 * j] = sc[2 * j + 1] = d * static_cast<float>(ls - 32);
        mn[2 * j] = mn[2 * j + 1] = 0.f;
        nibbles32(b + 8 + 16 * j, u + 32 * j);
      }
      for (int i = 0; i < 256; i++) u[i] = static_cast<uint8_t>(kIq4[u[i]] + 128);
      break;
    }
    default:
      break;
  }
}

// Per-thread scratch for one unpacked row: codes (I), scales and mins (I / 16), decoded fp32 (I).
struct RowScratch {
  std::vector<uint8_t> u;
  std::vector<float> sc, mn, w;
  void fit(int64_t I) {
    if (static_cast<int64_t>(u.size()) < I + 64) {
      u.assign(I + 64, 0), w.assign(I + 64, 0.f);
      sc.assign(I / kGroup + 16, 0.f), mn.assign(I / kGroup + 16, 0.f);
    }
  }
};
thread_local RowScratch row_scratch;

void unpack_row(int t, const uint8_t* row, int64_t I, RowScratch& s) {
  const int be = block_elems(t), bb = block_bytes(t);
  for (int64_t k = 0; k < I / be; k++)
    unpack_block(t, row + k * bb, s.u.data() + k * be, s.sc.data() + k * (be / kGroup), s.mn.data() + k * (be / kGroup));
}

// The row decoded to fp32 in s.w, with the reference's roundings (w = sc * (u - off) + mn).
void decode_row(int t, RowScratch& s, int64_t I) {
  const int off = code_offset(t);
  const bool affine = off == 0;
  for (int64_t g = 0; g < I / kGroup; g++) {
    const float c = s.sc[g], m = s.mn[g];
    float* w = s.w.data() + g * kGroup;
    const uint8_t* u = s.u.data() + g * kGroup;
    if (affine)
      for (int i = 0; i < kGroup; i++) w[i] = c * static_cast<float>(u[i]) + m;
    else if (t == Q4_G32)  // int4.py's (q - 8) * s + z
      for (int i = 0; i < kGroup; i++) w[i] = c * static_cast<float>(static_cast<int>(u[i]) - off) + m;
    else
      for (int i = 0; i < kGroup; i++) w[i] = c * static_cast<float>(static_cast<int>(u[i]) - off);
  }
}

// sum(w * x) over I in fp32, 16 lane-wise partial sums (vectorisable without reassociation).
inline float dot_f32(const float* w, const float* x, int64_t I) {
  float acc[16] = {};
  for (int64_t i = 0; i < I; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += w[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; j++) s += acc[j];
  return s;
}

template <typename F>
void for_rows(int64_t O, int nthreads, F&& body) {
  const int64_t blocks = (O + kRows - 1) / kRows;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; b++)
    for (int64_t o = b * kRows; o < std::min(O, (b + 1) * kRows); o++) body(o);
}

// fp32 products: every row decoded once, dotted with every activation row (X as fp32 (M, I)).
void linear_exact(int t, const uint8_t* W, int64_t row_bytes, const float* X, void* Y, int64_t M, int64_t O, int64_t I,
                  int y_bf16, int nthreads) {
  for_rows(O, nthreads, [&](int64_t o) {
    RowScratch& s = row_scratch;
    s.fit(I);
    unpack_row(t, W + o * row_bytes, I, s);
    decode_row(t, s, I);
    for (int64_t m = 0; m < M; m++) store_y(Y, m * O + o, dot_f32(s.w.data(), X + m * I, I), y_bf16);
  });
}

#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
#include "gguf_simd.h"
#endif

}  // namespace

extern "C" {

// Whether type t (a ggml type id) has a kernel here.
int ember_gguf_supports(int t) { return block_elems(t) != 0; }

// Y (M, O) = X (M, I) @ W^T in X's dtype; W (O, row_bytes) ggml blocks of type t. act_q8: bf16 X on byte
// products where the build has them. Returns 0 (nothing written) for a type or shape it does not take.
int ember_gguf_linear(const uint8_t* W, int64_t row_bytes, int t, const void* X, int x_bf16, void* Y, int64_t M,
                      int64_t O, int64_t I, int act_q8, int nthreads) {
  const int be = block_elems(t);
  if (!be || I % be || row_bytes != I / be * block_bytes(t)) return 0;
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  if (x_bf16 && act_q8) {
    linear_simd(t, W, row_bytes, static_cast<const uint16_t*>(X), static_cast<uint16_t*>(Y), M, O, I, nthreads);
    return 1;
  }
#else
  (void)act_q8;
#endif
  if (x_bf16) {
    std::vector<float> xf(static_cast<size_t>(M * I));
    for (int64_t i = 0; i < M * I; i++) xf[i] = bf16_to_f32(static_cast<const uint16_t*>(X)[i]);
    linear_exact(t, W, row_bytes, xf.data(), Y, M, O, I, 1, nthreads);
  } else {
    linear_exact(t, W, row_bytes, static_cast<const float*>(X), Y, M, O, I, 0, nthreads);
  }
  return 1;
}

// Y (M, O) bf16 = X (M, I) bf16 @ W^T for many rows (prefill) of a 32-value type on the int8-activation path, a
// chunk of kPrefillRows activation rows at a time (their int8 rows stay in L2 while every weight row passes), four
// activation rows per decode of a pair of blocks' codes (gguf_simd.h's rows32_xn). Returns 0 (nothing written) where
// the build has no such path (portable), for a type it leaves to the tiles, or a shape it does not take. Types: the
// 4-bit ones whose codes are bytes after one mask (Q4_0, Q4_1, MXFP4, Q4_G32); for Q5_0, Q5_1 (the fifth bit),
// Q8_0, IQ4_NL (signed products) and the 256-value types, a decoded tile and PyTorch's fp32 GEMM were as fast on
// one AVX2 core (a 128-row product).
int ember_gguf_rows_q8(const uint8_t* W, int64_t row_bytes, int t, const uint16_t* X, uint16_t* Y, int64_t M,
                       int64_t O, int64_t I, int nthreads) {
  const bool four_bit = t == Q4_0 || t == Q4_1 || t == MXFP4 || t == Q4_G32;
  if (!four_bit || I % 32 || row_bytes != I / 32 * block_bytes(t)) return 0;
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  constexpr int64_t kPrefillRows = 64;
  for (int64_t m = 0; m < M; m += kPrefillRows)
    linear_simd(t, W, row_bytes, X + m * I, Y + m * O, std::min(kPrefillRows, M - m), O, I, nthreads);
  return 1;
#else
  (void)X, (void)Y, (void)M, (void)O, (void)nthreads;
  return 0;
#endif
}

// Y[j] (O[j],) bf16 = X[j] (I,) bf16 @ W_j^T for n <= 8 weights of type t with rows of row_bytes, on the
// int8-activation path, in one parallel region: X quantized once where every X[j] is the same row (q/k/v, gate/up),
// else each row once (the down projections of a token's experts). The same bits as one ember_gguf_linear call per
// weight. Returns 0 (nothing written) where this build has no such path, or for a type or shape it does not take.
int ember_gguf_linear_jobs(int n, const uint8_t* const* W, const int64_t* O, int64_t row_bytes, int t,
                           const void* const* X, void* const* Y, int64_t I, int nthreads) {
  const int be = block_elems(t);
  if (!be || I % be || row_bytes != I / be * block_bytes(t) || n < 1) return 0;
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  if (n > kMaxSimdJobs) return 0;
  bool shared = true;
  for (int j = 1; j < n; j++) shared = shared && X[j] == X[0];
  thread_local std::vector<uint16_t> rows;  // the distinct rows, stacked (n, I)
  if (!shared) {
    rows.resize(static_cast<size_t>(n * I));
    for (int j = 0; j < n; j++) std::memcpy(rows.data() + j * I, X[j], static_cast<size_t>(I) * 2);
  }
  SimdJob jobs[kMaxSimdJobs];
  for (int j = 0; j < n; j++)
    jobs[j] = {W[j], O[j], static_cast<uint16_t*>(Y[j]), shared ? 0 : j, 1, nullptr};
  linear_simd_many(t, jobs, n, row_bytes, shared ? static_cast<const uint16_t*>(X[0]) : rows.data(), shared ? 1 : n,
                   I, nthreads);
  return 1;
#else
  (void)W, (void)O, (void)X, (void)Y, (void)nthreads;
  return 0;
#endif
}

// Y (M, O) bf16 = X (M, I) bf16 @ W^T for W in gpt-oss's hub layout of MXFP4 (blocks (O, I/32, 16), element 2j
// in the low nibble, scales (O, I/32) E8M0 apart; mxfp4.cpp): the int8-activation path of GGUF's MXFP4 blocks.
// Returns 0 (nothing written) where the build has no such path or I % 32.
int ember_mxfp4_q8(const uint8_t* blocks, const uint8_t* scales, const uint16_t* X, uint16_t* Y, int64_t M, int64_t O,
                   int64_t I, int nthreads) {
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  if (I % 32 == 0) {
    linear_simd_t<MXFP4_HUB>(blocks, I / 2, X, Y, M, O, I, nthreads, scales);
    return 1;
  }
#else
  (void)blocks, (void)scales, (void)X, (void)Y, (void)M, (void)O, (void)nthreads;
#endif
  (void)I;
  return 0;
}

// Rows r0..r1 of W decoded to out ((r1 - r0, I), bf16 or fp32), with the reference's roundings.
int ember_gguf_dequant(const uint8_t* W, int64_t row_bytes, int t, int64_t I, int64_t r0, int64_t r1, void* out,
                       int out_bf16, int nthreads) {
  const int be = block_elems(t);
  if (!be || I % be || row_bytes != I / be * block_bytes(t)) return 0;
  for_rows(r1 - r0, nthreads, [&](int64_t r) {
    RowScratch& s = row_scratch;
    s.fit(I);
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
    if (!decode_row_simd(t, W + (r0 + r) * row_bytes, I, s.w.data())) {
      unpack_row(t, W + (r0 + r) * row_bytes, I, s);
      decode_row(t, s, I);
    }
    store_row_simd(static_cast<char*>(out) + r * I * (out_bf16 ? 2 : 4), s.w.data(), I, out_bf16);
#else
    unpack_row(t, W + (r0 + r) * row_bytes, I, s);
    decode_row(t, s, I);
    for (int64_t i = 0; i < I; i++) store_y(out, r * I + i, s.w[i], out_bf16);
#endif
  });
  return 1;
}

}  // extern "C"
