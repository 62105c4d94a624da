// Ember's CPU matmul kernels for decode and small batches: Y (M, O) = X (M, I) @ W^T, W (O, I).
//
// Decode multiplies a few activation rows by every weight of the model, so its speed is how fast
// the weights stream from DRAM. These kernels stream each weight row block once, decode it in
// registers and multiply it with up to 4 activation rows at a time (further rows re-read the block
// from L1/L2, not DRAM).
//
//   dense_bf16  W bf16, X bf16   AVX512-BF16 vdpbf16ps (fp32 accumulate)
//   dense_bf16_amx  the same on AMX tiles (5-32 rows: batched decode), where the CPU has them
//   dense_f32   W fp32, X fp32   FMA
//   int8        W int8 (O, I) + fp32 scale per row: w = q * s             X -> fp32, FMA
//   q4          W 4-bit (O, I/2), element 2j in the high nibble of byte j, 2j+1 in the low one
//               (the bitsandbytes order, Ember's canonical int4/NF4 layout), mode:
//                 int4: w = (q - 8) * scale[g] + zero[g], groups of 32/64/128 along I
//                 nf4:  w = NF4[q] * absmax[b], blocks of 64 along I (absmax fp32, or bitsandbytes'
//                       double quantization: absmax = DYN[c[b]] * scale2[b / 256] + offset)
//               X bf16: nibbles -> bf16 table lookup (vpermw), vdpbf16ps, scale folded per group
//               X fp32: nibbles -> fp32 table lookup (vpermps), FMA; exact against the dequantized weight
//   int8 / int4 with ``act_q8`` (bf16 activations, AVX512-VNNI): the activations are quantized to int8 per
//               128 values (x ~ sx * xq, sx = max|x| / 127) and the weights multiplied as bytes with vpdpbusd
//               (u8 x s8, 64 products per instruction, int32 per step, one fp32 FMA per step): where
//               vdpbf16ps issues at a fraction of vpdpbusd's rate the bf16 paths run out of compute before
//               DRAM runs out of bandwidth. Exact against the dequantized weight times the dequantized
//               activation (fp32 accumulation).
//
// Without AVX512-BF16 (or with -DEMBER_PORTABLE) every kernel is the portable C++ loop below it.
// Threads: OpenMP over contiguous blocks of 4 output rows, ``nthreads`` from the caller
// (torch.get_num_threads()); the process's libgomp is torch's, so the thread pool is shared.
//
// File layout (each section's vector code sits under #ifdef of its ISA tier, with the portable loop beside it):
//   ISA tiers and prefetch distances ....... EMBER_X86 (AVX512-BF16), EMBER_VNNI, EMBER_AVX2, EMBER_AMX
//   shared helpers .......................... bf16 conversion, row pointers, scratch
//   AVX2 + FMA row kernels .................. the same blocking as AVX512 on 8-lane vectors
//   dense bf16 / dense fp32 / int8 / 4-bit .. AVX512 row kernels per weight format
//   int8 activations (VNNI) ................. byte products for int8 and 4-bit weights, code lookups
//   dense bf16 on AMX tiles
//   entry points: dense products
//   activation preparation and job runners .. one quantized activation row shared by several weights
//   entry points: int8 and 4-bit products, dequantization
//   entry points: RMSNorm and RoPE
//   single-query attention .................. ember_attn_decode, ember_attn_runs (each row over its own key run)
//   prepared linear calls ................... LinearDesc: ember_linear, ember_linear_many
//   decoder blocks for one token ............ ember_attn_block, ember_mlp_block, ember_moe_block,
//                                             ember_decode_layers (every layer of a step in one call)

#include "common.h"

namespace {

constexpr int R = 4;   // output rows per block
constexpr int MB = 4;  // activation rows per pass over a block
#ifndef Q4_ROW_BLOCK
#define Q4_ROW_BLOCK 8  // weight rows per block of the one-activation-row 4-bit kernel (q4_vnni_row)
#endif

using namespace ember_common;

// Rows o0..o0+3 of W (row pointers clamped to the last row, so a short last block reads valid memory).
template <typename T>
inline void row_ptrs(const T* W, int64_t o0, int64_t O, int64_t ld, const T* rows[R]) {
  for (int r = 0; r < R; r++) rows[r] = W + std::min(o0 + r, O - 1) * ld;
}

// The same for N rows, with the (clamped) row indices too.
template <typename T, int N = R>
inline void row_ptrs(const T* W, int64_t o0, int64_t O, int64_t ld, const T* rows[N], int64_t idx[N]) {
  for (int r = 0; r < N; r++) idx[r] = std::min(o0 + r, O - 1), rows[r] = W + idx[r] * ld;
}

// X (M, I) in bf16 or fp32 -> fp32 (M, I) scratch.
void to_f32(const void* X, int x_bf16, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = load_f(X, i, x_bf16);
}

thread_local std::vector<float> scratch_f;
thread_local std::vector<uint16_t> scratch_h;
thread_local std::vector<float> scratch_stats;

// Per-thread buffer for one row block's decoded scales and zeros (rows x 2 x G floats).
float* block_scratch(int64_t G, int64_t rows = R) {
  if (scratch_stats.size() < static_cast<size_t>(rows * 2 * G)) scratch_stats.resize(static_cast<size_t>(rows * 2 * G));
  return scratch_stats.data();
}

// Per-call buffers of the int8-activation kernels: the quantized rows, and their float statistics.
thread_local std::vector<int8_t> scratch_q8;
thread_local std::vector<float> scratch_q8f;

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


#if defined(EMBER_AMX) && defined(EMBER_X86)
// ============================================================================ dense bf16 on AMX tiles
// Batched decode (5-32 activation rows) is compute-bound for vdpbf16ps on a small core count; AMX
// tiles multiply 16 weight rows x 32 inputs by 16 activation rows per instruction. Computed as
// Y^T = W X^T so that W, row-major, *is* the A-tile layout (16 rows of 32 bf16, stride I): only X is
// repacked, into the VNNI pair layout B needs ([I/2][MP][2]: row j holds (x[m][2j], x[m][2j+1]) for
// each m), once per call. Tiles: 0-1 C (16 W rows x 16 X rows fp32), 2 A, 3-4 B.
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_permitted() {
  // Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

template <int NB>
void dense_bf16_amx(const uint16_t* W, const uint16_t* xp, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                    int nthreads) {
  constexpr int MP = 16 * NB;
  const int64_t blocks = O / 16;
#pragma omp parallel num_threads(nthreads)
  {
    TileConfig cfg = {};
    cfg.palette_id = 1;
    for (int t = 0; t < 5; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    alignas(64) float c[NB][16][16];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const uint16_t* wb = W + b * 16 * I;
      _tile_zero(0);
      if (NB == 2) _tile_zero(1);
      for (int64_t k = 0; k < I; k += 32) {
        if (PF_DENSE) _mm_prefetch(reinterpret_cast<const char*>(wb + k) + 16 * I * 2, PF_HINT);
        _tile_loadd(2, wb + k, I * 2);
        _tile_loadd(3, xp + (k / 2) * MP * 2, MP * 4);
        _tile_dpbf16ps(0, 2, 3);
        if (NB == 2) {
          _tile_loadd(4, xp + (k / 2) * MP * 2 + 32, MP * 4);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, c[0], 64);
      if (NB == 2) _tile_stored(1, c[NB - 1], 64);
      for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < 16; r++) store_y(Y, m * O + b * 16 + r, c[m / 16][r][m % 16], y_bf16);
    }
    _tile_release();
  }
}
#endif
}  // namespace

// ============================================================================ entry points: dense products
// ember_dense_bf16 / _amx / _f32: each ISA tier's row kernels (AVX512, AVX2, portable) dealt over the threads in
// 4-row blocks (for_row_blocks); the AMX kernel from AMX_MIN_ROWS rows where the OS grants the tiles.

extern "C" {

// Whether this build has the AMX kernel and the OS lets this process use the tiles.
int ember_kernels_amx() {
#if defined(EMBER_AMX) && defined(EMBER_X86)
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Whether this build has the AVX512-VNNI int8-activation kernels.
int ember_kernels_vnni() { return kVnni; }

// Which code path this build compiled: 1 = AVX512-BF16 intrinsics, 2 = AVX2 + FMA, 0 = portable loops.
int ember_kernels_isa() { return kIsa; }

// The int8-activation kernels' NF4 code-book resolution: code c is multiplied as round(levels c) / levels
// (127 with VNNI, 63 with AVX2); 0 where this build has no int8-activation kernels.
int ember_kernels_act_q8_levels() { return kActQ8Levels; }

void ember_dense_bf16(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                      int nthreads) {
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const uint16_t* w[R];
    row_ptrs(W, o0, O, I, w);
    dense_bf16_rows(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

// Y = X W^T on AMX tiles for 1 <= M <= 32, I % 32 == 0; returns 0 (nothing written) where this build or
// the OS has no AMX. The last O % 16 rows go through the AVX512 kernel.
int ember_dense_bf16_amx(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                         int nthreads) {
#if defined(EMBER_AMX) && defined(EMBER_X86)
  if (M < 1 || M > 32 || I % 32 != 0 || !amx_permitted()) return 0;
  const int NB = M > 16 ? 2 : 1;
  const int64_t MP = 16 * NB;
  static thread_local std::vector<uint16_t> packed;
  packed.assign(static_cast<size_t>(I * MP), 0);
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < I; k++) packed[(k / 2) * MP * 2 + m * 2 + (k & 1)] = X[m * I + k];
  if (NB == 2)
    dense_bf16_amx<2>(W, packed.data(), Y, M, O, I, y_bf16, nthreads);
  else
    dense_bf16_amx<1>(W, packed.data(), Y, M, O, I, y_bf16, nthreads);
  float out[R * MB];
  for (int64_t o0 = O / 16 * 16; o0 < O; o0 += R)
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const uint16_t* w[R];
      row_ptrs(W, o0, O, I, w);
      int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
      dense_bf16_rows(w, X + m0 * I, I, nm, out);
      store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
    }
  return 1;
#else
  (void)W, (void)X, (void)Y, (void)M, (void)O, (void)I, (void)y_bf16, (void)nthreads;
  return 0;
#endif
}

void ember_dense_f32(const float* W, const float* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                     int nthreads) {
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const float* w[R];
    row_ptrs(W, o0, O, I, w);
    dense_f32_rows(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

}  // extern "C"

namespace {
// ============================================================================ activation preparation and job runners
// The int8-activation paths quantize a row once (q4_activations, int8_activations) and run one or several
// weights that read it in one parallel region (Q4RowJob, I8RowJob, DenseRowJob over for_job_blocks).

#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
// What the 4-bit int8-activation kernels take besides the weights, for bf16 activation rows X (M, I): the rows
// quantized (Xq, in scratch_q8, VNNI's order 1 or AVX2's order 2), sx (M, I / 128) in the code book's unit, zt (M, 2G):
// per group the x sum, then offset * the xq sum; and the code bytes tb = levels + 1 + round(levels c) (the code
// book 4 times; int4 codes are q in 0..15 for q - 8, so offset 8; nf4's tq - levels - 1 in units of 1 / levels).
struct Q4Act {
  const int8_t* Xq;
  float* sx;
  float* zt;
  uint8_t tb[64];
};

Q4Act q4_activations(const uint16_t* X, int64_t M, int64_t I, int mode, int64_t group, const float* table) {
#ifdef EMBER_VNNI
  constexpr int levels = 127, order = 1;  // vpdpbusd: u8 codes up to 255
#else
  constexpr int levels = 63, order = 2;  // vpmaddubsw: u8 codes up to 127 keep its s16 pairs from saturating
#endif
  const int64_t S = I / 128, G = I / group;
  const float offset = mode == 0 ? 8.f : levels + 1.f, x_unit = mode == 0 ? 1.f : 1.f / levels;
  Q4Act a;
  for (int i = 0; i < 64; i++) a.tb[i] = static_cast<uint8_t>(levels + 1 + std::lrint(levels * table[i % 16]));
  scratch_q8.resize(static_cast<size_t>(M * I));
  scratch_q8f.assign(static_cast<size_t>(M * S + 3 * M * G), 0.f);  // sx, zt, then qsum (M, G)
  a.Xq = scratch_q8.data(), a.sx = scratch_q8f.data(), a.zt = a.sx + M * S;
  float* qsum = a.zt + 2 * M * G;
  for (int64_t m = 0; m < M; m++) {
#ifdef EMBER_VNNI
    quantize_x8(X + m * I, 1, I, order, group, scratch_q8.data() + m * I, a.sx + m * S, qsum + m * G, a.zt + m * 2 * G);
#else
    quantize_x8_avx2(X + m * I, 1, I, order, group, scratch_q8.data() + m * I, a.sx + m * S, qsum + m * G,
                     a.zt + m * 2 * G);
#endif
    for (int64_t g = 0; g < G; g++) a.zt[m * 2 * G + G + g] = offset * qsum[m * G + g];
  }
  for (int64_t i = 0; i < M * S; i++) a.sx[i] *= x_unit;
  return a;
}
#endif

}  // namespace

namespace {

// Most weights one for_job_blocks call shares out: a MoE token's gate and up products, eight experts' and a
// shared expert's; GGUF weights go at most kMaxGgufJobs to one call (gguf.cpp's kMaxSimdJobs).
constexpr int kMaxJobs = 18;
constexpr int kMaxGgufJobs = 8;

// The blocks of ``rows`` weight rows of n jobs (each with a row count O), dealt out over the threads as one range
// in one parallel region: body(j, o0) for each block, o0 its first row in job j. Guided: each thread takes long
// contiguous runs (the first half the range, then halves of what is left), so the prefetch of the next block stays
// useful, and the last small runs go to whichever thread is free (with a static split one core waits at the
// barrier whenever the memory system serves the other's half more slowly).
template <typename Job, typename F>
void for_job_blocks(const Job* jobs, int n, int64_t rows, int nthreads, F&& body) {
  int64_t first[kMaxJobs + 1] = {0};  // job j's blocks are [first[j], first[j + 1]) of the range
  for (int j = 0; j < n; j++) first[j + 1] = first[j] + (jobs[j].O + rows - 1) / rows;
#pragma omp parallel for num_threads(nthreads) schedule(guided)
  for (int64_t t = 0; t < first[n]; t++) {
    int j = 0;
    while (t >= first[j + 1]) j++;
    body(j, (t - first[j]) * rows);
  }
}

// One weight of the one-activation-row dense kernels: W (O, I) bf16 (T uint16_t) or fp32, Y (O,).
template <typename T>
struct DenseRowJob {
  const T* W;
  int64_t O;
  void* Y;
  const T* X;  // this job's own activation row, or null for the shared X
};

// n <= kMaxJobs dense weights of X's dtype that read the same activation row (q/k/v, gate/up, the gate/up of a
// token's experts) or each their own (job.X: the down projections of a token's experts): their R-row blocks in
// one parallel region (for_job_blocks), not a fork, join and cold prefetch start per weight; the same products
// as ember_dense_bf16 / ember_dense_f32.
template <typename T>
void dense_row_jobs(const DenseRowJob<T>* jobs, int n, const T* X, int64_t I, int y_bf16, int nthreads) {
  for_job_blocks(jobs, n, R, nthreads, [&](int j, int64_t o0) {
    const DenseRowJob<T>& job = jobs[j];
    const T* w[R];
    row_ptrs(job.W, o0, job.O, I, w);
    float out[R * MB];
    if constexpr (std::is_same_v<T, uint16_t>) dense_bf16_rows(w, job.X ? job.X : X, I, 1, out);
    else dense_f32_rows(w, job.X ? job.X : X, I, 1, out);
    store_block(job.Y, job.O, o0, 0, 1, out, nullptr, y_bf16);
  });
}

}  // namespace

#ifdef EMBER_VNNI
namespace {

// One weight of the one-activation-row 4-bit kernel: W (O, I/2) codes, Y (O,), its format.
struct Q4RowJob {
  const uint8_t* W;
  int64_t O;
  void* Y;
  Q4Params p;
};

// One weight of the one-activation-row int8 kernel: W (O, I), its per-row scales, Y (O,).
struct I8RowJob {
  const int8_t* W;
  int64_t O;
  void* Y;
  const float* scales;
};

// What int8_vnni takes besides the weights, for bf16 activation rows X (M <= MB, I): the rows quantized in natural
// order (scratch_q8), sx (M, I / 128) (scratch_q8f), and corr[m] = the 128 * sum(xq) the u8 flip of the weights adds.
const int8_t* int8_activations(const uint16_t* X, int64_t M, int64_t I, const float** sx_out, float* corr) {
  const int64_t S = I / 128;
  scratch_q8.resize(static_cast<size_t>(M * I));
  scratch_q8f.assign(static_cast<size_t>(2 * M * S), 0.f);  // sx (M, S), qsum (M, S)
  float* sx = scratch_q8f.data();
  float* qsum = sx + M * S;
  quantize_x8(X, M, I, 0, 128, scratch_q8.data(), sx, qsum, nullptr);
  for (int64_t m = 0; m < M; m++) {
    corr[m] = 0.f;
    for (int64_t c = 0; c < S; c++) corr[m] += 128.f * sx[m * S + c] * qsum[m * S + c];
  }
  *sx_out = sx;
  return scratch_q8.data();
}

// n <= kMaxJobs int8 weights that read the same bf16 activation row, I % 128 == 0: the row quantized once (per 128
// values, natural order), the weights' 4-row blocks in one parallel region (for_job_blocks).
void int8_row_jobs(const I8RowJob* jobs, int n, const uint16_t* X, int64_t I, int y_bf16, int nthreads) {
  const float* sx;
  float corr[1];
  const int8_t* Xq = int8_activations(X, 1, I, &sx, corr);
  for_job_blocks(jobs, n, R, nthreads, [&](int j, int64_t o0) {
    const I8RowJob& job = jobs[j];
    const int8_t* w[R];
    row_ptrs(job.W, o0, job.O, I, w);
    float out[R * MB];
    int8_vnni<1>(w, Xq, sx, corr, I, out);
    store_block(job.Y, job.O, o0, 0, 1, out, job.scales, y_bf16);
  });
}

// Whether q4_vnni_row takes rows of I values in groups of ``group``.
inline bool q4_row_fits(int64_t I, int64_t group) {
  return I % 128 == 0 && (group == 32 || group == 64 || group == 128);
}

// n <= kMaxJobs weights that read the same activation row (q/k/v, gate/up), all of one mode, group and code table,
// I values a row: the row is quantized once and the weights' blocks of Q4_ROW_BLOCK rows are shared out over the
// threads as one range (for_job_blocks), in one parallel region, instead of one quantization, fork and join (and
// cold start of the prefetch) per weight.
void q4_row_jobs(Q4RowJob* jobs, int n, const uint16_t* X, int64_t I, int y_bf16, int nthreads) {
  const Q4Params& p0 = jobs[0].p;
  const int mode = p0.mode;
  const int64_t group = p0.group, G = I / group, half = I / 2;
  const Q4Act act = q4_activations(X, 1, I, mode, group, p0.table);
  const __m512i tq = _mm512_loadu_si512(act.tb);
  const float* zt = act.zt;
  thread_local std::vector<float> sx_group;  // sx of each group
  sx_group.resize(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; g++) sx_group[g] = act.sx[g * group / 128];
#ifdef __AVX512VBMI__
  const float* dyn = nullptr;  // the double-quantization map of the NF4 jobs that have one (one map: q4_row_group)
  for (int j = 0; j < n; j++)
    if (mode == 1 && !jobs[j].p.absmax) dyn = jobs[j].p.am_dyn;
  if (dyn) {  // q4_vnni_row's whole-block lookups
    thread_local std::vector<float> sxg_rep;
    sxg_rep.resize(static_cast<size_t>(Q4_ROW_BLOCK * G));
    for (int64_t f = 0; f < Q4_ROW_BLOCK * G; f++) sxg_rep[f] = sx_group[f % G];
    // every NF4 weight has the same map: its planes are remade only when it changes
    thread_local float planes_of[256];
    thread_local uint8_t planes[1024];
    thread_local bool have = false;
    if (!have || std::memcmp(planes_of, dyn, sizeof(planes_of)) != 0) {
      dyn_byte_planes(dyn, planes);
      std::memcpy(planes_of, dyn, sizeof(planes_of));
      have = true;
    }
    for (int j = 0; j < n; j++) jobs[j].p.sxg_rep = sxg_rep.data(), jobs[j].p.dyn_planes = planes;
  }
#endif
  constexpr int RB = Q4_ROW_BLOCK;
  const float* sxg = sx_group.data();
  const int8_t* Xq = act.Xq;
  for_job_blocks(jobs, n, RB, nthreads, [&](int j, int64_t o0) {
    const Q4RowJob& job = jobs[j];
    float* st = block_scratch(G, RB);
    const uint8_t* w[RB];
    int64_t rows[RB];
    row_ptrs<uint8_t, RB>(job.W, o0, job.O, half, w, rows);
    float out[RB];
#define Q4ROW(MD_, GR_) q4_vnni_row<MD_, GR_, RB>(w, job.p, rows, sxg, zt, zt + G, Xq, I, tq, st, out)
    if (mode == 0) {
      if (group == 128) Q4ROW(0, 128); else if (group == 64) Q4ROW(0, 64); else Q4ROW(0, 32);
    } else {
      if (group == 128) Q4ROW(1, 128); else if (group == 64) Q4ROW(1, 64); else Q4ROW(1, 32);
    }
#undef Q4ROW
    for (int r = 0; r < RB && o0 + r < job.O; r++) store_y(job.Y, o0 + r, out[r], y_bf16);
  });
}

}  // namespace
#endif

// ============================================================================ entry points: int8 and 4-bit products, dequantization
// ember_int8 / ember_q4 pick the tier (VNNI int8 activations, AVX512 bf16/fp32, AVX2, portable) per call;
// ember_*_dequant fill a float tile of rows for PyTorch's GEMM above MAX_ROWS rows (prefill).

extern "C" {

// scales: (O,) fp32. act_q8: bf16 activations may be quantized to int8 for the VNNI kernel (see the header).
void ember_int8(const int8_t* W, const float* scales, const void* X, int x_bf16, void* Y, int64_t M, int64_t O,
                int64_t I, int y_bf16, int act_q8, int nthreads) {
#ifdef EMBER_VNNI
  if (act_q8 && x_bf16 && M == 1 && I % 128 == 0) {  // decode
    const I8RowJob job{W, O, Y, scales};
    int8_row_jobs(&job, 1, static_cast<const uint16_t*>(X), I, y_bf16, nthreads);
    return;
  }
  if (act_q8 && x_bf16 && M <= MB && I % 128 == 0) {
    const float* sxp;
    float corr[MB] = {};
    const int8_t* Xq = int8_activations(static_cast<const uint16_t*>(X), M, I, &sxp, corr);
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      switch (nm) {
        case 1: int8_vnni<1>(w, Xq, sxp, corr, I, out); break;
        case 2: int8_vnni<2>(w, Xq, sxp, corr, I, out); break;
        case 3: int8_vnni<3>(w, Xq, sxp, corr, I, out); break;
        default: int8_vnni<4>(w, Xq, sxp, corr, I, out); break;
      }
      store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
    });
    return;
  }
#elif defined(EMBER_AVX2)
  if (act_q8 && x_bf16 && M <= MB && I % 128 == 0) {
    const int64_t S = I / 128;
    scratch_q8.resize(static_cast<size_t>(M * I));
    scratch_q8f.assign(static_cast<size_t>(2 * M * S), 0.f);  // sx (M, S), qsum (M, S: unused, the products are signed)
    float* sx = scratch_q8f.data();
    quantize_x8_avx2(static_cast<const uint16_t*>(X), M, I, 0, 128, scratch_q8.data(), sx, sx + M * S, nullptr);
    const int8_t* Xq = scratch_q8.data();
    const float* sxp = sx;
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      in_pairs(nm, [&](auto n, int m) {
        int8_q8_avx2<decltype(n)::value>(w, Xq + (m0 + m) * I, sxp + (m0 + m) * S, I, out + m);
      });
      store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
    });
    return;
  }
#else
  (void)act_q8;
#endif
#ifdef EMBER_X86
  if (x_bf16 && M == 1 && I % 64 == 0) {
    // x per 64 values as [x_even, 16 x_even, x_odd, 16 x_odd] (see int8_bf16_rows); 16 x is exact in bf16.
    std::vector<uint16_t>& xp = scratch_h;
    xp.resize(static_cast<size_t>(2 * I));
    const uint16_t* xs = static_cast<const uint16_t*>(X);
    double total = 0.0;
    for (int64_t c = 0; c < I / 64; c++)
      for (int j = 0; j < 32; j++) {
        const float e = bf16_to_f32(xs[c * 64 + 2 * j]), o = bf16_to_f32(xs[c * 64 + 2 * j + 1]);
        xp[c * 128 + j] = xs[c * 64 + 2 * j];
        xp[c * 128 + 32 + j] = f32_to_bf16(16.f * e);
        xp[c * 128 + 64 + j] = xs[c * 64 + 2 * j + 1];
        xp[c * 128 + 96 + j] = f32_to_bf16(16.f * o);
        total += static_cast<double>(e) + o;
      }
    const float xsum = static_cast<float>(total);
    const uint16_t* Xp = xp.data();
    for_row_blocks(O, 1, nthreads, [&](int64_t o0, int64_t, int, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      int8_bf16_rows(w, Xp, xsum, I, out);
      store_block(Y, O, o0, 0, 1, out, scales, y_bf16);
    });
    return;
  }
#endif
  std::vector<float>& xf = scratch_f;
  xf.resize(static_cast<size_t>(M * I));
  to_f32(X, x_bf16, M * I, xf.data());
  const float* Xf = xf.data();
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const int8_t* w[R];
    row_ptrs(W, o0, O, I, w);
    int8_rows(w, Xf + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
  });
}


// mode 0 int4 (scales/zeros (O, I/group) in bf16 or fp32), 1 nf4 (absmax fp32, or am_code/am_dyn/am_scale2/am_offset).
// table: the 16 code values in fp32 (q - 8, or the NF4 code book).
void ember_q4(const uint8_t* W, const void* X, int x_bf16, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
              int mode, int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
              const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
              const float* table, int act_q8, int nthreads) {
  Q4Params p{mode, group, scales, zeros, stats_bf16, absmax, am_code, am_dyn, am_scale2, am_offset, {}};
  std::memcpy(p.table, table, sizeof(p.table));
  const int64_t G = I / group;
  const int64_t half = I / 2;
#ifdef EMBER_VNNI
  if (act_q8 && x_bf16 && M == 1 && q4_row_fits(I, group)) {  // decode
    Q4RowJob job{W, O, Y, p};
    q4_row_jobs(&job, 1, static_cast<const uint16_t*>(X), I, y_bf16, nthreads);
    return;
  }
#endif
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  if (act_q8 && x_bf16 && I % 128 == 0 && 128 % group == 0 && M <= 8) {
    const Q4Act act = q4_activations(static_cast<const uint16_t*>(X), M, I, mode, group, table);
#ifdef EMBER_VNNI
    const __m512i tq = _mm512_loadu_si512(act.tb);
#define Q4K(RR_, N_, MD_) q4_vnni<RR_, N_, MD_>(w, st, Xq, sxp, ztp, I, group, tq, out)
#else
    const __m256i tq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.tb));
#define Q4K(RR_, N_, MD_) q4_q8_avx2<RR_, N_, MD_>(w, st, Xq, sxp, ztp, I, group, tq, out)
#endif
    const int8_t* Xq = act.Xq;
    const float* sx = act.sx;
    const float* zt = act.zt;
    const float* sxp = sx;
    const float* ztp = zt;
    const int64_t rr = M == 1 ? 4 : 1;  // decode: 4 weight rows per pass; batches: one row, up to 8 activations
    const int64_t blocks = (O + rr - 1) / rr;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t o0 = b * rr;
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w, rows);
      float* st = block_scratch(G);
      block_stats(p, rows, G, st);
      float out[R * MB * 2];
      if (rr == 4) {
#ifndef EMBER_VNNI
        if (mode == 0 && group == 32 && I % 256 == 0) q4_q8_avx2_g32(w, st, Xq, sxp, ztp, I, out);
        else
#endif
        if (mode == 0) Q4K(4, 1, 0);
        else Q4K(4, 1, 1);
        store_block(Y, O, o0, 0, 1, out, nullptr, y_bf16);
      } else {
        switch (M) {
#define Q4V(N) case N: if (mode == 0) Q4K(1, N, 0); else Q4K(1, N, 1); break;
          Q4V(1) Q4V(2) Q4V(3) Q4V(4) Q4V(5) Q4V(6) Q4V(7) Q4V(8)
#undef Q4V
        }
        for (int64_t m = 0; m < M; m++) store_y(Y, m * O + o0, out[m], y_bf16);
      }
    }
#undef Q4K
    return;
  }
#else
  (void)act_q8;
#endif
  // Per-group sums of x for the int4 zero term, (M, G) fp32.
  thread_local std::vector<float> xsum;
  xsum.assign(static_cast<size_t>(M * G), 0.f);
  if (mode == 0)
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < G; g++) {
        float t = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; k++) t += load_f(X, m * I + k, x_bf16);
        xsum[m * G + g] = t;
      }
  const float* xsums = xsum.data();  // thread_local: the parallel regions below must not name it
#ifdef EMBER_X86
  if (x_bf16 && I % 128 == 0) {
    std::vector<uint16_t>& x4 = scratch_h;
    x4.resize(static_cast<size_t>(M * I));
    const uint16_t* xs = static_cast<const uint16_t*>(X);
    static const auto orders = [] {  // the 128-value step permutation of each mode, made once
      std::vector<int> o(256);
      for (int md = 0; md < 2; md++)
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 32; j++) o[md * 128 + 32 * i + j] = x_order(md, i, j);
      return o;
    }();
    const int* order = orders.data() + (mode == 0 ? 0 : 128);
    for (int64_t m = 0; m < M; m++)
      for (int64_t c = 0; c < I / 128; c++) {
        const uint16_t* src = xs + m * I + c * 128;
        uint16_t* dst = x4.data() + m * I + c * 128;
        for (int v = 0; v < 128; v++) dst[v] = src[order[v]];
      }
    uint8_t tb[64] = {};
    for (int i = 0; i < 16; i++) {
      const uint16_t h = f32_to_bf16(table[i]);
      tb[i] = static_cast<uint8_t>(h & 0xFF), tb[16 + i] = static_cast<uint8_t>(h >> 8);
    }
    const __m512i tv = _mm512_loadu_si512(tb);
    const uint16_t* X4 = x4.data();
    const int int4 = mode == 0;
    // int4 codes count as 128 + q: fold the -(128 + 8) * scale into the zero of each group.
    Q4Params pz = p;
    const int64_t rr = M == 1 ? 4 : 1;  // decode: 4 weight rows per pass; batches: one row, 8 activations
    const int64_t blocks = (O + rr - 1) / rr;
    const int64_t mstep = M == 1 ? 1 : 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t o0 = b * rr;
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w);
      for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
      float* st = block_scratch(G);
      block_stats(pz, rows, G, st, int4 ? 136.f : 0.f);
      float out[R * MB * 2];
      for (int64_t m0 = 0; m0 < M; m0 += mstep) {
        const int nm = static_cast<int>(std::min<int64_t>(mstep, M - m0));
        const uint16_t* x = X4 + m0 * I;
        const float* xs_ = xsums + m0 * G;
        float o8[8 * MB];
        if (rr == 4) {
          if (int4) q4_bf16x128<4, 1, 0>(w, st, x, xs_, I, group, tv, out);
          else q4_bf16x128<4, 1, 1>(w, st, x, xs_, I, group, tv, out);
          store_block(Y, O, o0, m0, 1, out, nullptr, y_bf16);
        } else {
          // one row, up to 8 activation rows: out index m (MB stride unused with RR = 1)
          switch (nm) {
#define Q4CASE(N) case N: if (int4) q4_bf16x128<1, N, 0>(w, st, x, xs_, I, group, tv, o8); \
                          else q4_bf16x128<1, N, 1>(w, st, x, xs_, I, group, tv, o8); break;
            Q4CASE(1) Q4CASE(2) Q4CASE(3) Q4CASE(4) Q4CASE(5) Q4CASE(6) Q4CASE(7) Q4CASE(8)
#undef Q4CASE
          }
          for (int m = 0; m < nm; m++) store_y(Y, (m0 + m) * O + o0, o8[m], y_bf16);
        }
      }
    }
    return;
  }
#endif
  std::vector<float>& xf = scratch_f;
  xf.resize(static_cast<size_t>(M * I));
  to_f32(X, x_bf16, M * I, xf.data());
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  if (I % 32 == 0 && group % 32 == 0) {
    std::vector<float> xd(static_cast<size_t>(M * I));
    for (int64_t m = 0; m < M; m++)
      for (int64_t c = 0; c < I / 32; c++)
        for (int j = 0; j < 16; j++) {
          xd[m * I + c * 32 + j] = xf[m * I + c * 32 + 2 * j];
          xd[m * I + c * 32 + 16 + j] = xf[m * I + c * 32 + 2 * j + 1];
        }
    const float* Xd = xd.data();
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w);
      for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
      float* st = block_scratch(G);
      if (m0 == 0) block_stats(p, rows, G, st);
      const float* x = Xd + m0 * I;
      const float* xs_ = xsums + m0 * G;
#ifdef EMBER_X86
      switch (nm) {
        case 1: q4_f32_block<1>(w, st, x, xs_, I, p, out); break;
        case 2: q4_f32_block<2>(w, st, x, xs_, I, p, out); break;
        case 3: q4_f32_block<3>(w, st, x, xs_, I, p, out); break;
        default: q4_f32_block<4>(w, st, x, xs_, I, p, out); break;
      }
#else
      for (int m = 0; m < nm; m++) q4_f32_avx2(w, st, x + m * I, xs_ + m * G, I, p, out + m);  // block from L1
#endif
      store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
    });
    return;
  }
#endif
  const float* Xf = xf.data();
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const uint8_t* w[R];
    int64_t rows[R];
    row_ptrs(W, o0, O, half, w);
    for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
    float* st = block_scratch(G);
    if (m0 == 0) block_stats(p, rows, G, st);
    q4_rows_portable(w, st, Xf + m0 * I, I, nm, p, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

// Rows [a, b) of the dequantized weight into ``out`` ((b - a, I), bf16 or fp32): the large-M path
// dequantizes a cache-sized tile of rows with this, then multiplies it with a PyTorch GEMM.
void ember_int8_dequant(const int8_t* W, const float* scales, int64_t I, int64_t a, int64_t b, void* out,
                        int out_bf16, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = a; o < b; o++) {
    const int8_t* row = W + o * I;
    const float sc = scales[o];
    int64_t k = 0;
#ifdef EMBER_X86
    const __m512 s = _mm512_set1_ps(sc);
    for (; k + 16 <= I; k += 16) {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), s);
      store16(out, (o - a) * I + k, v, out_bf16);
    }
#endif
    for (; k < I; k++) store_y(out, (o - a) * I + k, static_cast<float>(row[k]) * sc, out_bf16);
  }
}

void ember_q4_dequant(const uint8_t* W, int64_t I, int64_t a, int64_t b, void* out, int out_bf16, int mode,
                      int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
                      const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
                      const float* table, int nthreads) {
  Q4Params p{mode, group, scales, zeros, stats_bf16, absmax, am_code, am_dyn, am_scale2, am_offset, {}};
  std::memcpy(p.table, table, sizeof(p.table));
  const int64_t G = I / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = a; o < b; o++) {
    const uint8_t* row = W + o * (I / 2);
    for (int64_t g = 0; g < G; g++) {
      const float sc = group_scale(p, o, g, G), z = group_zero(p, o, g, G);
      int64_t k = g * group;
#ifdef EMBER_X86
      // 16 bytes -> 32 values: high nibbles are the even elements, low nibbles the odd ones.
      const __m512 table = _mm512_loadu_ps(p.table), s = _mm512_set1_ps(sc), zv = _mm512_set1_ps(z);
      const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (; k + 32 <= (g + 1) * group; k += 32) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        __m512 even = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), s, zv);
        __m512 odd = _mm512_fmadd_ps(_mm512_permutexvar_ps(bytes, table), s, zv);
        store16(out, (o - a) * I + k, _mm512_permutex2var_ps(even, lo_idx, odd), out_bf16);
        store16(out, (o - a) * I + k + 16, _mm512_permutex2var_ps(even, hi_idx, odd), out_bf16);
      }
#endif
      for (; k < (g + 1) * group; k += 2) {
        const uint8_t v = row[k / 2];
        store_y(out, (o - a) * I + k, p.table[v >> 4] * sc + z, out_bf16);
        store_y(out, (o - a) * I + k + 1, p.table[v & 0x0F] * sc + z, out_bf16);
      }
    }
  }
}

}  // extern "C"

namespace {
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t H, float eps);
template <typename T>
void rope_head(T* x, const T* cos, const T* sin, int64_t hd);
}

// ============================================================================ entry points: RMSNorm and RoPE

extern "C" {

// RMSNorm as HF computes it: h = x in fp32; h *= 1 / sqrt(mean(h^2) + eps); out = weight * h.to(dtype), where
// (bf16) the cast and the product are each rounded to bf16. x, weight, out: bf16 or fp32 (is_bf16), (rows, H).
// The sum of squares in double (each square is exact in it).
void ember_rms_norm(const void* X, const void* Wt, void* Out, int64_t rows, int64_t H, float eps, int is_bf16,
                    int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    if (is_bf16)
      rms_norm_row(static_cast<const uint16_t*>(X) + r * H, static_cast<const uint16_t*>(Wt),
                   static_cast<uint16_t*>(Out) + r * H, H, eps);
    else
      rms_norm_row(static_cast<const float*>(X) + r * H, static_cast<const float*>(Wt),
                   static_cast<float*>(Out) + r * H, H, eps);
  }
}

// Rotary embedding in place, HF's half-split layout: x (n_rows, heads, hd), hd even, with cos/sin (n_rows, hd)
// per row; out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); in bf16 each product and the
// sum are rounded as PyTorch's bf16 ops round them.
void ember_rope(void* X, const void* Cos, const void* Sin, int64_t n_rows, int64_t heads, int64_t hd, int is_bf16) {
  for (int64_t t = 0; t < n_rows; t++)
    for (int64_t h = 0; h < heads; h++) {
      const int64_t base = (t * heads + h) * hd;
      if (is_bf16)
        rope_head(static_cast<uint16_t*>(X) + base, static_cast<const uint16_t*>(Cos) + t * hd,
                  static_cast<const uint16_t*>(Sin) + t * hd, hd);
      else
        rope_head(static_cast<float*>(X) + base, static_cast<const float*>(Cos) + t * hd,
                  static_cast<const float*>(Sin) + t * hd, hd);
    }
}

}  // extern "C"

// ============================================================================ single-query attention
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

// Heads h0..h1-1 of batch row b, all in kv group g: scores against keys 0..S-1 (fp32 dot products of the
// bf16/fp32 values, scaled), softmax in fp32 (masked slots weigh 0), then the weighted sum of values.
// Each key/value row is read once for the group's heads. buf: (heads * S) scores + (heads * hd) sums.
#ifdef EMBER_X86
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// e^x for x <= 0, 16 lanes: exp_nonpos's steps.
inline __m512 exp16_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Sixteen vectors -> one: lane j = the sum of a[j]'s lanes (a transpose-and-add tree, 45 shuffles/adds).
inline __m512 hsum16x16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// out[h] += sum_s p[h][s] v[s] over the S value rows (V + s * vs, bf16 or fp32, read in place: no fp32 copy to
// evict L1), NC x 16 of the hd sums of four heads at a time in registers (each value vector loaded once for four
// heads' FMAs).
template <int NC, typename T>
inline void pv_rows(const T* V, int64_t vs, int64_t S, int64_t d0, const float* sc, int64_t Sp, int nh, int64_t hd,
                    float* acc) {
  constexpr int NHP = 4;
  for (int h = 0; h < nh; h += NHP) {
    const int nhp = std::min(NHP, nh - h);  // heads past nh (the last pass) read head h's scores, are not stored
    __m512 a[NHP][NC];
    const float* p[NHP];
    for (int i = 0; i < NHP; i++) {
      p[i] = sc + (h + (i < nhp ? i : 0)) * Sp;
      for (int c = 0; c < NC; c++) a[i][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < S; j++) {
      __m512 w[NHP];
      for (int i = 0; i < NHP; i++) w[i] = _mm512_set1_ps(p[i][j]);
      for (int c = 0; c < NC; c++) {
        const __m512 v = load16f(V + j * vs + d0 + 16 * c);
        for (int i = 0; i < NHP; i++) a[i][c] = _mm512_fmadd_ps(w[i], v, a[i][c]);
      }
    }
    for (int i = 0; i < nhp; i++)
      for (int c = 0; c < NC; c++) _mm512_storeu_ps(acc + (h + i) * hd + d0 + 16 * c, a[i][c]);
  }
}

// A 16 x 16 block of 32-bit values (r[i] = row i) transposed in place: r[e] = element e of every row. Three rounds
// of interleaves (32-bit, 64-bit, then 128-bit lanes), 64 shuffles.
inline void transpose16x16(__m512i* r) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; i++) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // b[4 g + k], rows 4g..4g+3: in 128-bit lane L, element 4 L + k of each of the four rows
  for (int g = 0; g < 4; g++) {
    b[4 * g] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int k = 0; k < 4; k++) {
    const __m512i c01 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x44);
    const __m512i c23 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xEE);
    const __m512i d01 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x44);
    const __m512i d23 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(c01, d01, 0x88), r[4 + k] = _mm512_shuffle_i32x4(c01, d01, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(c23, d23, 0x88), r[12 + k] = _mm512_shuffle_i32x4(c23, d23, 0xDD);
  }
}

// Scores of NH query heads (qw: their bf16 values as (NH, hd / 2) 32-bit pairs) against n <= 16 bf16 keys (rows
// k0 + j * ks), scaled: out[h * Sp + j] for j < 16 (zero past n). The keys are transposed to pair-major (kt[p]: pair
// p of the 16 keys), so one vdpbf16ps per pair and head makes 16 scores with no horizontal sums: 2 per score at hd
// 64, against 4 FMAs and a share of a transpose-add tree on fp32 copies of the keys.
template <int NH>
inline void scores_bf16_16(const uint16_t* k0, int64_t ks, int64_t n, int64_t hd, const uint32_t* qw, float scale,
                           float* out, int64_t Sp) {
  const int64_t P = hd / 2;  // 32-bit pairs per row, a multiple of 16
  __m512 acc[NH];
  for (int h = 0; h < NH; h++) acc[h] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    __m512i kt[16];
    for (int j = 0; j < 16; j++)
      kt[j] = j < n ? _mm512_loadu_si512(k0 + j * ks + 2 * p0) : _mm512_setzero_si512();
    transpose16x16(kt);
    for (int i = 0; i < 16; i++)
      for (int h = 0; h < NH; h++)
        acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)kt[i],
                                  (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[h * P + p0 + i])));
  }
  for (int h = 0; h < NH; h++) _mm512_storeu_ps(out + h * Sp, _mm512_mul_ps(acc[h], _mm512_set1_ps(scale)));
}

// sc (nh, Sp) = scale * q k for the group's nh heads and S keys (K + s * ks), from bf16 keys as they are
// (scores_bf16_16, eight heads at a time); hd % 32 == 0.
inline void attn_scores_bf16(const uint16_t* q, const uint16_t* K, int64_t ks, int64_t S, int64_t hd, int nh,
                             float scale, float* sc, int64_t Sp) {
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(q);
  for (int64_t s0 = 0; s0 < S; s0 += 16)
    for (int h0 = 0; h0 < nh; h0 += 8) {
      const uint16_t* k0 = K + s0 * ks;
      const int64_t n = std::min<int64_t>(16, S - s0);
      const uint32_t* qh = qw + h0 * hd / 2;
      float* o = sc + h0 * Sp + s0;
      switch (std::min(8, nh - h0)) {
        case 1: scores_bf16_16<1>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 2: scores_bf16_16<2>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 3: scores_bf16_16<3>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 4: scores_bf16_16<4>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 5: scores_bf16_16<5>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 6: scores_bf16_16<6>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 7: scores_bf16_16<7>(k0, ks, n, hd, qh, scale, o, Sp); break;
        default: scores_bf16_16<8>(k0, ks, n, hd, qh, scale, o, Sp); break;
      }
    }
}

// The same for any hd % 16 == 0 (fp32 keys, or bf16 with hd % 32 != 0): kBlock keys at a time converted to fp32
// (blk) for all heads, one FMA per 16 values and a transpose-add tree per 16 scores. qf: (nh, hd) scratch.
template <typename T>
void attn_scores_f32(const T* q, const T* K, int64_t ks, int64_t S, int64_t hd, int nh, float scale, float* sc,
                     int64_t Sp, float* qf, float* blk, int64_t kBlock) {
  const int64_t C = hd / 16;
  for (int h = 0; h < nh; h++)
    for (int64_t c = 0; c < C; c++)
      _mm512_storeu_ps(qf + h * hd + 16 * c, _mm512_mul_ps(load16f(q + h * hd + 16 * c), _mm512_set1_ps(scale)));
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t n = std::min(kBlock, S - s0);
    for (int64_t j = 0; j < (n + 15) / 16 * 16; j++)  // zero rows pad the last 16-key step
      for (int64_t c = 0; c < C; c++)
        _mm512_storeu_ps(blk + j * hd + 16 * c, j < n ? load16f(K + (s0 + j) * ks + 16 * c) : _mm512_setzero_ps());
    for (int h = 0; h < nh; h++) {
      const float* qh = qf + h * hd;
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 a[16];
        for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c++) {
          const __m512 qv = _mm512_loadu_ps(qh + 16 * c);
          for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(blk + (j0 + j) * hd + 16 * c), a[j]);
        }
        _mm512_storeu_ps(sc + h * Sp + s0 + j0, hsum16x16(a));
      }
    }
  }
}

// The AVX512 form of attn_group below, for hd % 16 == 0: the group's scores (attn_scores_bf16 / _f32), softmax in
// place, then the values weighted by them, read in place (pv_rows): no fp32 copies of the keys and values.
template <typename T>
void attn_group_avx512(const T* q, const T* K, const T* V, T* out, int64_t hd, int64_t S, int64_t ks, int64_t vs,
                       const uint8_t* mask, int64_t mss, int nh, float scale, std::vector<float>& buf) {
  constexpr int64_t kBlock = 128;
  const int64_t Sp = (S + 15) / 16 * 16;  // score rows padded to whole 16-key steps
  buf.resize(static_cast<size_t>(nh * Sp + 2 * nh * hd + kBlock * hd));
  float* sc = buf.data();      // (nh, Sp)
  float* qf = sc + nh * Sp;    // (nh, hd)
  float* acc = qf + nh * hd;   // (nh, hd)
  float* blk = acc + nh * hd;  // (kBlock, hd)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (hd % 32 == 0) attn_scores_bf16(q, K, ks, S, hd, nh, scale, sc, Sp);
    else attn_scores_f32(q, K, ks, S, hd, nh, scale, sc, Sp, qf, blk, kBlock);
  } else {
    attn_scores_f32(q, K, ks, S, hd, nh, scale, sc, Sp, qf, blk, kBlock);
  }
  // Softmax per head over the S real keys; masked and padding slots weigh 0.
  for (int h = 0; h < nh; h++) {
    float* row = sc + h * Sp;
    float mx = -INFINITY;
    if (!mask) {
      __m512 vm = _mm512_set1_ps(-INFINITY);
      for (int64_t s = 0; s < S; s += 16) vm = _mm512_mask_max_ps(vm, lanes16(S - s), vm, _mm512_loadu_ps(row + s));
      mx = _mm512_reduce_max_ps(vm);
    } else {
      for (int64_t s = 0; s < S; s++)
        if (mask[s * mss]) mx = row[s] > mx ? row[s] : mx;
    }
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (int64_t s = 0; s < Sp; s += 16) {
      __mmask16 keep = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      if (mask)
        for (int j = 0; j < 16 && s + j < S; j++)
          if (!mask[(s + j) * mss]) keep &= static_cast<__mmask16>(~(1u << j));
      const __m512 e = _mm512_maskz_mov_ps(keep, exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(row + s), vmx)));
      _mm512_storeu_ps(row + s, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);  // no visible key (never while decoding)
    for (int64_t s = 0; s < Sp; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv));
  }
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    switch (std::min<int64_t>(4, (hd - d0) / 16)) {
      case 1: pv_rows<1>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      case 2: pv_rows<2>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      case 3: pv_rows<3>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      default: pv_rows<4>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
    }
  }
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) {
      if constexpr (std::is_same_v<T, float>) out[h * hd + d] = acc[h * hd + d];
      else out[h * hd + d] = f32_to_bf16(acc[h * hd + d]);
    }
}
#endif

template <typename T>
void attn_group(const T* q, const T* K, const T* V, T* out, int64_t hd, int64_t S, int64_t ks, int64_t vs,
                const uint8_t* mask, int64_t mss, int nh, float scale, std::vector<float>& buf) {
#ifdef EMBER_X86
  if (hd % 16 == 0) return attn_group_avx512(q, K, V, out, hd, S, ks, vs, mask, mss, nh, scale, buf);
#endif
  buf.resize(static_cast<size_t>(nh * (S + 2 * hd)));
  float* sc = buf.data();         // (nh, S)
  float* qf = sc + nh * S;        // (nh, hd)
  float* acc = qf + nh * hd;      // (nh, hd)
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) qf[h * hd + d] = to_float(q[h * hd + d]);
  float kf[512];
  for (int64_t s = 0; s < S; s++) {
    const T* kr = K + s * ks;
#pragma omp simd
    for (int64_t d = 0; d < hd; d++) kf[d] = to_float(kr[d]);
    for (int h = 0; h < nh; h++) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; d++) dot += qf[h * hd + d] * kf[d];
      sc[h * S + s] = dot * scale;
    }
  }
  for (int h = 0; h < nh; h++) {
    float* row = sc + h * S;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++)
      if (!mask || mask[s * mss]) mx = row[s] > mx ? row[s] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < S; s++) {
      const float e = (!mask || mask[s * mss]) ? exp_nonpos(row[s] - mx) : 0.f;
      row[s] = e;
      sum += e;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key (never for a decoding row): zeros
    for (int64_t s = 0; s < S; s++) row[s] *= inv;
    for (int64_t d = 0; d < hd; d++) acc[h * hd + d] = 0.f;
  }
  for (int64_t s = 0; s < S; s++) {
    const T* vr = V + s * vs;
#pragma omp simd
    for (int64_t d = 0; d < hd; d++) kf[d] = to_float(vr[d]);
    for (int h = 0; h < nh; h++) {
      const float p = sc[h * S + s];
      if (p == 0.f) continue;
#pragma omp simd
      for (int64_t d = 0; d < hd; d++) acc[h * hd + d] += p * kf[d];
    }
  }
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) {
      if constexpr (std::is_same_v<T, float>) out[h * hd + d] = acc[h * hd + d];
      else out[h * hd + d] = f32_to_bf16(acc[h * hd + d]);
    }
}

}  // namespace

extern "C" {

// Attention of one query token per batch row (decode) over S cached keys, grouped-query: q (B, nh, hd) and out
// (B, nh, hd) contiguous; K/V element strides (b, head, slot), the last axis contiguous; mask: 1 where a key is
// visible, element strides (b, slot), or null for all visible. Work items are (b, kv group, a slice of the
// group's query heads), enough of them to keep every thread busy. Returns 0 (nothing written) for hd > 512.
int ember_attn_decode(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t nh, int64_t nkv,
                      int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                      int64_t vss, const uint8_t* mask, int64_t msb, int64_t mss, float scale, int is_bf16,
                      int nthreads) {
  if (hd > 512 || nh % nkv) return 0;
  const int64_t rep = nh / nkv;
  int64_t split = 1;  // query-head slices per group
  while (split < rep && B * nkv * split < 2 * nthreads && rep % (split * 2) == 0) split *= 2;
  const int64_t per = rep / split, items = B * nkv * split;
#pragma omp parallel num_threads(nthreads) if (items > 1)
  {
    static thread_local std::vector<float> buf;  // kept between calls: no allocation per decode step
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
      const int64_t b = it / (nkv * split), g = (it / split) % nkv, h0 = g * rep + (it % split) * per;
      const uint8_t* mk = mask ? mask + b * msb : nullptr;
      if (is_bf16) {
        const auto* q = static_cast<const uint16_t*>(Q) + (b * nh + h0) * hd;
        attn_group(q, static_cast<const uint16_t*>(K) + b * ksb + g * ksh, static_cast<const uint16_t*>(V) + b * vsb + g * vsh,
                   static_cast<uint16_t*>(Out) + (b * nh + h0) * hd, hd, S, kss, vss, mk, mss, static_cast<int>(per),
                   scale, buf);
      } else {
        const auto* q = static_cast<const float*>(Q) + (b * nh + h0) * hd;
        attn_group(q, static_cast<const float*>(K) + b * ksb + g * ksh, static_cast<const float*>(V) + b * vsb + g * vsh,
                   static_cast<float*>(Out) + (b * nh + h0) * hd, hd, S, kss, vss, mk, mss, static_cast<int>(per),
                   scale, buf);
      }
    }
  }
  return 1;
}

// Attention of T query rows per batch row, each over the run of keys its mask row shows, computed exactly as
// ember_attn_decode computes one query over just those keys (no mask, the run's first key at slot 0): a row's
// result does not depend on how far the batch left-pads it nor on how many rows ride beside it, so a served
// step, plain or verifying proposals, rounds as generate's one-token step. Q and Out (B, T, nh, hd)
// contiguous; K/V as ember_attn_decode; mask (b, t, slot) element strides, 1 where visible. A row with no
// visible key gets zeros. Returns 0 (nothing written) where some row's visible keys are not one run, or hd > 512.
int ember_attn_runs(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t T, int64_t nh,
                    int64_t nkv, int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                    int64_t vss, const uint8_t* mask, int64_t msb, int64_t mst, int64_t mss, float scale, int is_bf16,
                    int nthreads) {
  if (hd > 512 || nh % nkv) return 0;
  std::vector<int64_t> run(static_cast<size_t>(2 * B * T));  // per row: first visible slot, visible count
  for (int64_t r = 0; r < B * T; r++) {
    const uint8_t* m = mask + (r / T) * msb + (r % T) * mst;
    int64_t lo = 0, hi = 0, n = 0;
    for (int64_t s = 0; s < S; s++)
      if (m[s * mss]) {
        if (n++ == 0) lo = s;
        hi = s + 1;
      }
    if (n != hi - lo) return 0;
    run[2 * r] = lo;
    run[2 * r + 1] = n;
  }
  const int64_t rep = nh / nkv, R = B * T;
  int64_t split = 1;  // query-head slices per group
  while (split < rep && R * nkv * split < 2 * nthreads && rep % (split * 2) == 0) split *= 2;
  const int64_t per = rep / split, items = R * nkv * split;
  const size_t esz = is_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads) if (items > 1)
  {
    static thread_local std::vector<float> buf;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
      const int64_t r = it / (nkv * split), b = r / T, g = (it / split) % nkv, h0 = g * rep + (it % split) * per;
      const int64_t lo = run[2 * r], n = run[2 * r + 1];
      char* o = static_cast<char*>(Out) + (r * nh + h0) * hd * esz;
      if (n == 0) {
        std::memset(o, 0, static_cast<size_t>(per * hd) * esz);
        continue;
      }
      const int64_t ko = (b * ksb + g * ksh + lo * kss) * esz, vo = (b * vsb + g * vsh + lo * vss) * esz;
      const char* q = static_cast<const char*>(Q) + (r * nh + h0) * hd * esz;
      if (is_bf16)
        attn_group(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(static_cast<const char*>(K) + ko),
                   reinterpret_cast<const uint16_t*>(static_cast<const char*>(V) + vo), reinterpret_cast<uint16_t*>(o),
                   hd, n, kss, vss, nullptr, 0, static_cast<int>(per), scale, buf);
      else
        attn_group(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(static_cast<const char*>(K) + ko),
                   reinterpret_cast<const float*>(static_cast<const char*>(V) + vo), reinterpret_cast<float*>(o),
                   hd, n, kss, vss, nullptr, 0, static_cast<int>(per), scale, buf);
    }
  }
  return 1;
}

int ember_gguf_linear_jobs(int n, const uint8_t* const* W, const int64_t* O, int64_t row_bytes, int t,
                           const void* const* X, void* const* Y, int64_t I, int nthreads);  // gguf.cpp
}  // extern "C"

// ============================================================================ prepared linear calls
// Everything about one weight but its activations, filled in once by the Python side (ctypes mirrors this
// struct: keep the two in step), so a decode-time call passes 6 arguments instead of up to 21.
struct LinearDesc {
  int64_t kind;  // 1 dense (w_bf16: bf16 weight with bf16 x, else fp32 with fp32 x), 2 int8, 3 int4/NF4,
                 // 4 GGUF blocks (gguf.cpp: mode = ggml type, group = bytes per row)
  int64_t O, I;
  int64_t w_bf16;
  int64_t amx_min_rows;  // dense bf16: AMX tiles from this many rows (0: never)
  int64_t act_q8;        // int8/4-bit: int8 activations where the build has them
  const void* W;
  const void* bias;  // (O,) or null, added after the product's rounding (y + bias, as PyTorch's add)
  int64_t bias_bf16;
  const float* scales;  // int8: (O,) fp32
  int64_t mode, group;  // 4-bit: as ember_q4
  const void* q_scales;
  const void* q_zeros;
  int64_t stats_bf16;
  const float* absmax;
  const uint8_t* am_code;
  const float* am_dyn;
  const float* am_scale2;
  const float* table;
  float am_offset;
};

namespace {

// Y (M, O) += the weight's bias (after the product's rounding, as PyTorch's add).
void add_bias(const LinearDesc* d, void* Y, int64_t M, int x_bf16) {
  if (!d->bias) return;
  for (int64_t m = 0; m < M; m++)
    for (int64_t o = 0; o < d->O; o++)
      store_y(Y, m * d->O + o, load_f(Y, m * d->O + o, x_bf16) + load_f(d->bias, o, static_cast<int>(d->bias_bf16)),
              x_bf16);
}

#ifdef EMBER_VNNI
Q4Params q4_params(const LinearDesc& d) {
  Q4Params p{static_cast<int>(d.mode), d.group, d.q_scales, d.q_zeros, static_cast<int>(d.stats_bf16), d.absmax,
             d.am_code, d.am_dyn, d.am_scale2, d.am_offset, {}};
  std::memcpy(p.table, d.table, sizeof(p.table));
  return p;
}

// Whether d[0..n) can share one q4_row_jobs call: 4-bit weights on the int8-activation kernel with the same row
// width, mode, group, code book and (NF4 with double quantization) dynamic map.
bool q4_row_group(int n, const LinearDesc* const* d) {
  const float* dyn = nullptr;
  for (int i = 0; i < n; i++) {
    if (d[i]->kind != 3 || !d[i]->act_q8 || d[i]->I != d[0]->I || d[i]->mode != d[0]->mode ||
        d[i]->group != d[0]->group || std::memcmp(d[i]->table, d[0]->table, 16 * sizeof(float)) != 0)
      return false;
    if (d[i]->mode == 1 && !d[i]->absmax) {
      if (dyn && std::memcmp(dyn, d[i]->am_dyn, 256 * sizeof(float)) != 0) return false;
      dyn = d[i]->am_dyn;
    }
  }
  return q4_row_fits(d[0]->I, d[0]->group);
}

// The same for int8 weights (int8_row_jobs): the int8-activation kernel and one row width, a multiple of 128.
bool int8_row_group(int n, const LinearDesc* const* d) {
  for (int i = 0; i < n; i++)
    if (d[i]->kind != 2 || !d[i]->act_q8 || d[i]->I != d[0]->I) return false;
  return d[0]->I % 128 == 0;
}
#endif

// Whether dense weights can share one dense_row_jobs call: all of X's dtype, one row width, none on AMX tiles
// for one row.
bool dense_row_group(int n, const LinearDesc* const* d, int x_bf16) {
  for (int i = 0; i < n; i++)
    if (d[i]->kind != 1 || d[i]->w_bf16 != x_bf16 || d[i]->I != d[0]->I || d[i]->amx_min_rows == 1) return false;
  return true;
}

template <typename T>
void run_dense_row_jobs(int n, const LinearDesc* const* d, const void* X, void* const* Y, int nthreads) {
  DenseRowJob<T> jobs[kMaxJobs];
  for (int i = 0; i < n; i++) jobs[i] = {static_cast<const T*>(d[i]->W), d[i]->O, Y[i], nullptr};
  dense_row_jobs(jobs, n, static_cast<const T*>(X), d[0]->I, std::is_same_v<T, uint16_t>, nthreads);
}

// n <= kMaxJobs GGUF weights of one type and row width on the int8-activation path, times one bf16 row each
// (X[i]; the same pointer for weights that share it) in one ember_gguf_linear_jobs call. Returns 0 (nothing
// written) where they differ in type or shape, or the build has no such path.
int gguf_row_jobs(int n, const LinearDesc* const* d, const void* const* X, void* const* Y, int x_bf16, int nthreads) {
  if (n < 2 || n > kMaxJobs || !x_bf16) return 0;
  const uint8_t* W[kMaxJobs];
  int64_t O[kMaxJobs];
  for (int i = 0; i < n; i++) {
    if (d[i]->kind != 4 || !d[i]->act_q8 || d[i]->mode != d[0]->mode || d[i]->group != d[0]->group ||
        d[i]->I != d[0]->I)
      return 0;
    W[i] = static_cast<const uint8_t*>(d[i]->W), O[i] = d[i]->O;
  }
  if (!ember_gguf_linear_jobs(n, W, O, d[0]->group, static_cast<int>(d[0]->mode), X, Y, d[0]->I, nthreads)) return 0;
  for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, 1);
  return 1;
}

// Activation rows X (nm <= 3, I) times a block of R weight rows, each (weight row, activation row) product with
// the bits of the one-activation-row kernel (dense_*_rows with nm = 1). The AVX512 and portable kernels sum each
// pair the same way whatever nm is; the AVX2 one-row kernels keep two accumulators per pair (fp32: the first and
// the last 8 of every 16 values; bf16: the even and the odd ones), so here every pair gets those two. fp32: two
// weight rows x three activation rows x two halves = 12 accumulators, plus one weight and one activation vector,
// fill the 16 vector registers; 5 loads feed 6 FMAs and 12 independent chains cover the FMA latency.
#ifdef EMBER_AVX2
template <int NM, bool PF>
inline void rows_avx2_exact(const float* const* w, const float* X, int64_t I, float* out) {
  for (int r0 = 0; r0 < R; r0 += 2) {
    __m256 acc[2][NM][2];
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < NM; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    const float* w0 = w[r0];
    const float* w1 = w[r0 + 1];
    for (int64_t k = 0; k < I; k += 16) {
      if (PF) {  // the next block's lines (fp32 weights: one 64-byte line per 16 values)
        _mm_prefetch(reinterpret_cast<const char*>(w0 + k + 4 * I), PF_HINT);
        _mm_prefetch(reinterpret_cast<const char*>(w1 + k + 4 * I), PF_HINT);
      }
      for (int h = 0; h < 2; h++) {
        const __m256 a = _mm256_loadu_ps(w0 + k + 8 * h), b = _mm256_loadu_ps(w1 + k + 8 * h);
        for (int m = 0; m < NM; m++) {
          const __m256 x = _mm256_loadu_ps(X + m * I + k + 8 * h);
          acc[0][m][h] = _mm256_fmadd_ps(a, x, acc[0][m][h]);
          acc[1][m][h] = _mm256_fmadd_ps(b, x, acc[1][m][h]);
        }
      }
    }
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < NM; m++) out[(r0 + r) * MB + m] = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
  }
}

// Two bf16 activation rows x a block of R bf16 weight rows, two weight rows at a time: both operands are split
// into (even, odd) in registers (bf16_pairs), 8 accumulators + 4 activation + 2 weight vectors. Converting the
// weights costs two ALU ops per 16 values and pass, which beats widening them into a buffer (its stores).
inline void rows_bf16_pair(const uint16_t* const* w, const uint16_t* X, int64_t I, float* out) {
  for (int r0 = 0; r0 < R; r0 += 2) {
    __m256 acc[2][2][2];
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < 2; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < I; k += 16) {
      __m256 xe[2], xo[2];
      for (int m = 0; m < 2; m++) bf16_pairs(X + m * I + k, xe[m], xo[m]);
      for (int r = 0; r < 2; r++) {
        if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r0 + r] + k + 4 * I), PF_HINT);
        __m256 we, wo;
        bf16_pairs(w[r0 + r] + k, we, wo);
        for (int m = 0; m < 2; m++) {
          acc[r][m][0] = _mm256_fmadd_ps(we, xe[m], acc[r][m][0]);
          acc[r][m][1] = _mm256_fmadd_ps(wo, xo[m], acc[r][m][1]);
        }
      }
    }
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < 2; m++) out[(r0 + r) * MB + m] = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
  }
}
#endif

// How many activation rows the next group takes, `left` of them left: threes (the most the registers hold), and
// 2 + 2 rather than 3 + 1 (a lone row leaves the FMA latency uncovered).
inline int row_group(int64_t left) { return left == 4 ? 2 : static_cast<int>(std::min<int64_t>(3, left)); }

template <typename T>
inline void dense_rows_portable(const T* const* w, const T* X, int64_t I, int nm, float* out) {
  if constexpr (std::is_same_v<T, uint16_t>) dense_bf16_rows(w, X, I, nm, out);
  else dense_f32_rows(w, X, I, nm, out);
}

// Weight d's 4-row block at o0 times all M rows of X, stored into Y: the block is read from memory once (the
// first group's pass prefetches the next one) and every further group of rows finds it in L1/L2. Where the one-row
// kernels' AVX2 condition does not hold, their portable loops (exact at any nm).
template <typename T>
inline void rows_block(const LinearDesc& d, int64_t o0, const T* X, int64_t M, void* Y) {
  const int64_t I = d.I, O = d.O;
  const T* w[R];
  row_ptrs(static_cast<const T*>(d.W), o0, O, I, w);
  float out[R * MB];
#ifdef EMBER_AVX2
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (I % 32 == 0) {  // pairs of rows, a last lone row through the one-row kernel itself (four weight rows)
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int nm = M - m0 >= 2 ? 2 : 1;
        if (nm == 2) rows_bf16_pair(w, X + m0 * I, I, out);
        else dense_bf16_avx2<1>(w, X + m0 * I, I, out);
        store_block(Y, O, o0, m0, nm, out, nullptr, 1);
      }
      return;
    }
  } else if (I % 16 == 0) {
    for (int64_t m0 = 0; m0 < M;) {
      const int nm = row_group(M - m0);
      const float* x = X + m0 * I;
      if (nm == 3) m0 == 0 ? rows_avx2_exact<3, true>(w, x, I, out) : rows_avx2_exact<3, false>(w, x, I, out);
      else if (nm == 2) m0 == 0 ? rows_avx2_exact<2, true>(w, x, I, out) : rows_avx2_exact<2, false>(w, x, I, out);
      else m0 == 0 ? rows_avx2_exact<1, true>(w, x, I, out) : rows_avx2_exact<1, false>(w, x, I, out);
      store_block(Y, O, o0, m0, nm, out, nullptr, 0);
      m0 += nm;
    }
    return;
  }
#endif
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
    dense_rows_portable(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, std::is_same_v<T, uint16_t>);
  }
}

}  // namespace

extern "C" {

int ember_gguf_linear(const uint8_t* W, int64_t row_bytes, int t, const void* X, int x_bf16, void* Y, int64_t M,
                      int64_t O, int64_t I, int act_q8, int nthreads);  // gguf.cpp

// Y (M, O) = X (M, I) @ W^T (+ bias) for one prepared weight, in X's dtype (x_bf16). Returns 0 (nothing
// written) for a dense weight whose dtype is not X's.
int ember_linear(const LinearDesc* d, const void* X, void* Y, int64_t M, int x_bf16, int nthreads) {
  switch (d->kind) {
    case 1:
      if (d->w_bf16 != x_bf16) return 0;
      if (x_bf16) {
        if (!(d->amx_min_rows && M >= d->amx_min_rows && d->I % 32 == 0 &&
              ember_dense_bf16_amx(static_cast<const uint16_t*>(d->W), static_cast<const uint16_t*>(X), Y, M, d->O,
                                   d->I, 1, nthreads)))
          ember_dense_bf16(static_cast<const uint16_t*>(d->W), static_cast<const uint16_t*>(X), Y, M, d->O, d->I, 1,
                           nthreads);
      } else {
        ember_dense_f32(static_cast<const float*>(d->W), static_cast<const float*>(X), Y, M, d->O, d->I, 0, nthreads);
      }
      break;
    case 2:
      ember_int8(static_cast<const int8_t*>(d->W), d->scales, X, x_bf16, Y, M, d->O, d->I, x_bf16,
                 static_cast<int>(d->act_q8), nthreads);
      break;
    case 3:
      ember_q4(static_cast<const uint8_t*>(d->W), X, x_bf16, Y, M, d->O, d->I, x_bf16, static_cast<int>(d->mode),
               d->group, d->q_scales, d->q_zeros, static_cast<int>(d->stats_bf16), d->absmax, d->am_code, d->am_dyn,
               d->am_scale2, d->am_offset, d->table, static_cast<int>(d->act_q8), nthreads);
      break;
    case 4:
      if (!ember_gguf_linear(static_cast<const uint8_t*>(d->W), d->group, static_cast<int>(d->mode), X, x_bf16, Y, M,
                             d->O, d->I, static_cast<int>(d->act_q8), nthreads))
        return 0;
      break;
    default:
      return 0;
  }
  add_bias(d, Y, M, x_bf16);
  return 1;
}

// Several prepared weights applied to the same X (q/k/v, gate/up): one call from Python. Returns how many
// were done; the caller computes the rest itself. One bf16 row times int8 weights, or 4-bit weights of one format
// (the usual q/k/v and gate/up), runs them all in one parallel region (int8_row_jobs, q4_row_jobs).
int ember_linear_many(int n, const LinearDesc* const* d, const void* X, void* const* Y, int64_t M, int x_bf16,
                      int nthreads) {
#ifdef EMBER_VNNI
  if (M == 1 && x_bf16 && n > 1 && n <= kMaxJobs && q4_row_group(n, d)) {
    Q4RowJob jobs[kMaxJobs];
    for (int i = 0; i < n; i++) jobs[i] = {static_cast<const uint8_t*>(d[i]->W), d[i]->O, Y[i], q4_params(*d[i])};
    q4_row_jobs(jobs, n, static_cast<const uint16_t*>(X), d[0]->I, 1, nthreads);
    for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, 1);
    return n;
  }
  if (M == 1 && x_bf16 && n > 1 && n <= kMaxJobs && int8_row_group(n, d)) {
    I8RowJob jobs[kMaxJobs];
    for (int i = 0; i < n; i++) jobs[i] = {static_cast<const int8_t*>(d[i]->W), d[i]->O, Y[i], d[i]->scales};
    int8_row_jobs(jobs, n, static_cast<const uint16_t*>(X), d[0]->I, 1, nthreads);
    for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, 1);
    return n;
  }
#endif
  if (M == 1 && n > 1 && n <= kMaxJobs) {
    const void* xs[kMaxJobs];
    std::fill(xs, xs + n, X);
    if (gguf_row_jobs(n, d, xs, Y, x_bf16, nthreads)) return n;
  }
  if (M == 1 && n > 1 && n <= kMaxJobs && dense_row_group(n, d, x_bf16)) {
    if (x_bf16) run_dense_row_jobs<uint16_t>(n, d, X, Y, nthreads);
    else run_dense_row_jobs<float>(n, d, X, Y, nthreads);
    for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, x_bf16);
    return n;
  }
  for (int i = 0; i < n; i++)
    if (!ember_linear(d[i], X, Y[i], M, x_bf16, nthreads)) return i;
  return n;
}

// Y[i] (M, O_i) = X (M, I) @ W_i^T for n prepared weights, each activation row's products with the same bits as
// ember_linear_many over that row alone (a speculative verification pass must round as the one-token step it
// stands for). Dense weights stream each 4-row block once for all M rows (rows_block); other formats (and
// AMX at one row) run ember_linear_many row by row. Returns 0 (nothing guaranteed written) where a weight has no
// kernel for X's dtype.
int ember_linear_rows(int n, const LinearDesc* const* d, const void* X, void* const* Y, int64_t M, int x_bf16,
                      int nthreads) {
  bool dense = n <= 8;
  for (int i = 0; i < n; i++)
    dense = dense && d[i]->kind == 1 && d[i]->w_bf16 == x_bf16 && d[i]->I == d[0]->I && d[i]->amx_min_rows != 1;
  const int64_t I = d[0]->I, esz = x_bf16 ? 2 : 4;
  if (!dense || M == 1) {
    for (int64_t m = 0; m < M; m++) {
      void* Ym[8];
      if (n > 8) return 0;
      for (int i = 0; i < n; i++) Ym[i] = static_cast<char*>(Y[i]) + m * d[i]->O * esz;
      if (ember_linear_many(n, d, static_cast<const char*>(X) + m * I * esz, Ym, 1, x_bf16, nthreads) != n) return 0;
    }
    return 1;
  }
  int64_t first[9] = {0};  // weight i's 4-row blocks are [first[i], first[i + 1]) of one range over the threads
  for (int i = 0; i < n; i++) first[i + 1] = first[i] + (d[i]->O + R - 1) / R;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < first[n]; t++) {
    int i = 0;
    while (t >= first[i + 1]) i++;
    const int64_t o0 = (t - first[i]) * R;
    if (x_bf16) rows_block(*d[i], o0, static_cast<const uint16_t*>(X), M, Y[i]);
    else rows_block(*d[i], o0, static_cast<const float*>(X), M, Y[i]);
  }
  for (int i = 0; i < n; i++) add_bias(d[i], Y[i], M, x_bf16);
  return 1;
}

}  // extern "C"

// ============================================================================ decoder blocks for one token
// A decode step of one sequence spends more time between its kernels (Python, PyTorch's small ops) than a
// 4-bit model spends streaming weights through some of them. These run a whole pre-norm block in one call,
// from the same kernels and with the same roundings as the modules' own forward: each product, norm and add
// rounded to the model dtype where PyTorch rounds it.
struct AttnBlockDesc {
  const LinearDesc* q;
  const LinearDesc* k;
  const LinearDesc* v;
  const LinearDesc* o;
  const void* norm;    // input RMSNorm weight (H,)
  const void* q_norm;  // (hd,) q/k RMSNorm (Qwen3) or null
  const void* k_norm;
  int64_t H, nh, nkv, hd;
  float eps, qk_eps;
  // Gemma-style variants (all zero for Llama's block): the norms scale by (1 + w) in fp32 with one rounding
  // (norm_offset); the attention output is normed by post_norm before the residual add (sandwich norms);
  // keys older than window slots are hidden (0: none); the rotation uses the second (hd,) row of cos/sin
  // (local_rope: the sliding layers' own RoPE base); scale 0 means 1/sqrt(hd).
  const void* post_norm;
  int64_t norm_offset, window, local_rope;
  float scale;
  // GLM-4.5 / MiniMax-M2 / Gemma 2 (zero: off): RoPE on the first rot channels of each head only (cos/sin (rot,));
  // q_norm/k_norm over all heads' channels at once (qk_full, weights (nh * hd,) and (nkv * hd,)); the logits
  // soft-capped, cap * tanh(logit / cap) (softcap, variants.cpp).
  int64_t rot, qk_full;
  float softcap;
  // Gemma 4 (zero: off): the values normed per head with no weight (x / rms, fp32, one rounding; eps qk_eps).
  int64_t v_norm;
};

struct MlpBlockDesc {
  const LinearDesc* gate;
  const LinearDesc* up;
  const LinearDesc* down;
  const void* norm;  // post-attention RMSNorm weight (H,)
  int64_t H, F;
  float eps;
  // Gemma-style variants (zero for Llama's block): act 1 = tanh-GELU gate (GeGLU) instead of SiLU, act 2 = no
  // gate, relu(up)^2 (Nemotron-H); norm_offset as norm_rows; the MLP output normed by post_norm before the add.
  const void* post_norm;
  int64_t norm_offset, act;
  const void* out_scale;  // Gemma 4's layer_scalar (one value of the dtype) times x after the add, or null
};

namespace {

thread_local std::vector<float> block_buf;

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
// the product rounded. e^-g from exp_clamped's polynomial, 16 lanes at a time where the build has AVX512 (the
// scalar loop does not vectorize), the same bits either way.
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

extern "C" {
void ember_softcap_attn(const void* q, const void* K, const void* V, void* out, int64_t nh, int64_t nkv, int64_t hd,
                        int64_t hs, int64_t S, float scale, float cap, int is_bf16, int nthreads);

// x (H,) += o_proj(attention(rope(q/k/v(rms_norm(x))))) for the token at slot pos, its k/v written into the
// caches Kc/Vc (nkv, max_len, hd) at pos (a sliding layer's ring of window slots: at pos % window); cos/sin (hd,)
// of its position ((2, hd): global then local, for a block with local_rope). With the AttnBlockDesc's Gemma
// fields: (1 + w) norms, post_norm on the output, the window's keys only, its own scale. Returns 0 (nothing done) where a projection has no kernel for x's dtype.
int ember_attn_block(const AttnBlockDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                     int64_t max_len, int64_t pos, int is_bf16, int nthreads) {
  // a sliding layer's ring (ember.cache.SlidingWindowKV): max_len == window slots, the token at p in slot p % window
  const bool ring = d->window > 0 && max_len == d->window;
  if (d->hd % 2 || (!ring && pos >= max_len)) return 0;  // rope's halves; a full cache's end
  const int64_t slot = ring ? pos % max_len : pos;
  const int64_t H = d->H, nq = d->nh * d->hd, nk = d->nkv * d->hd, esz = is_bf16 ? 2 : 4;
  block_buf.resize(static_cast<size_t>((H + 2 * nq + 2 * nk + H) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(block_buf.data());
  void* h = base;
  void* q = base + H * esz;
  void* k = base + (H + nq) * esz;
  void* v = base + (H + nq + nk) * esz;
  void* a = base + (H + nq + 2 * nk) * esz;
  void* o = base + (H + 2 * nq + 2 * nk) * esz;
  norm_rows(x, d->norm, h, 1, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* qkv[3] = {d->q, d->k, d->v};
  void* qkv_out[3] = {q, k, v};
  if (ember_linear_many(3, qkv, h, qkv_out, 1, is_bf16, nthreads) != 3) return 0;
  if (d->q_norm) {  // row by row: in place is safe
    norm_rows(q, d->q_norm, q, d->qk_full ? 1 : d->nh, d->qk_full ? nq : d->hd, d->qk_eps, d->norm_offset, is_bf16);
    norm_rows(k, d->k_norm, k, d->qk_full ? 1 : d->nkv, d->qk_full ? nk : d->hd, d->qk_eps, d->norm_offset, is_bf16);
  }
  if (d->v_norm) {
    if (is_bf16) rms_unweighted_rows(static_cast<uint16_t*>(v), d->nkv, d->hd, d->qk_eps);
    else rms_unweighted_rows(static_cast<float*>(v), d->nkv, d->hd, d->qk_eps);
  }
  if (d->local_rope) {  // the second row of the (2, hd) tables
    cos = static_cast<const char*>(cos) + d->hd * esz;
    sin = static_cast<const char*>(sin) + d->hd * esz;
  }
  if (d->rot > 0 && d->rot < d->hd) {  // the first rot channels of each head turn, the rest pass
    for (int64_t n = 0; n < d->nh + d->nkv; n++)
      ember_rope(n < d->nh ? static_cast<char*>(q) + n * d->hd * esz : static_cast<char*>(k) + (n - d->nh) * d->hd * esz,
                 cos, sin, 1, 1, d->rot, is_bf16);
  } else {
    ember_rope(q, cos, sin, 1, d->nh, d->hd, is_bf16);
    ember_rope(k, cos, sin, 1, d->nkv, d->hd, is_bf16);
  }
  for (int64_t g = 0; g < d->nkv; g++) {
    std::memcpy(static_cast<char*>(Kc) + (g * max_len + slot) * d->hd * esz, static_cast<char*>(k) + g * d->hd * esz,
                d->hd * esz);
    std::memcpy(static_cast<char*>(Vc) + (g * max_len + slot) * d->hd * esz, static_cast<char*>(v) + g * d->hd * esz,
                d->hd * esz);
  }
  const int64_t hs = max_len * d->hd;
  // a sliding window sees positions pos - window + 1 .. pos (HF's mask: query - key < window): in a full cache
  // those slots, in a ring its first min(pos + 1, window) slots (in ring order; the softmax does not mind)
  const int64_t s0 = !ring && d->window > 0 ? std::max<int64_t>(0, pos - d->window + 1) : 0;
  const int64_t n_keys = ring ? std::min(pos + 1, max_len) : pos + 1 - s0;
  const float scale = d->scale > 0.f ? d->scale : 1.f / std::sqrt(static_cast<float>(d->hd));
  if (d->softcap > 0.f)
    ember_softcap_attn(q, static_cast<const char*>(Kc) + s0 * d->hd * esz,
                       static_cast<const char*>(Vc) + s0 * d->hd * esz, a, d->nh, d->nkv, d->hd, hs, n_keys,
                       scale, d->softcap, is_bf16, nthreads);
  else if (!ember_attn_decode(q, static_cast<const char*>(Kc) + s0 * d->hd * esz, static_cast<const char*>(Vc) + s0 * d->hd * esz,
                         a, 1, d->nh, d->nkv, d->hd, n_keys, d->nkv * hs, hs, d->hd, d->nkv * hs, hs, d->hd,
                         nullptr, 0, 0, scale, is_bf16, nthreads))
    return 0;
  if (!ember_linear(d->o, a, o, 1, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(o, d->post_norm, o, 1, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_rows(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(o), H);
  else add_rows(static_cast<float*>(x), static_cast<const float*>(o), H);
  return 1;
}

// x (H,) += down(silu(gate(h)) * up(h)), h = rms_norm(x); silu and the product each rounded to the dtype.
// Gemma (act 1, norm_offset, post_norm): x += post_norm(down(gelu_tanh(gate(h)) * up(h))), (1 + w) norms.
int ember_mlp_block(const MlpBlockDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, esz = is_bf16 ? 2 : 4;
  block_buf.resize(static_cast<size_t>((2 * H + 2 * F) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(block_buf.data());
  void* h = base;
  void* g = base + H * esz;
  void* u = base + (H + F) * esz;
  void* y = base + (H + 2 * F) * esz;
  norm_rows(x, d->norm, h, 1, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* gu[2] = {d->gate, d->up};
  void* outs[2] = {g, u};
  if (d->act == 2) {  // g = relu(up(h))^2: the relu exact, the square rounded
    if (!ember_linear(d->up, h, g, 1, is_bf16, nthreads)) return 0;
    for (int64_t i = 0; i < F; i++) {
      const float v = std::max(load_f(g, i, is_bf16), 0.f);
      store_y(g, i, v * v, is_bf16);
    }
  } else {
    if (ember_linear_many(2, gu, h, outs, 1, is_bf16, nthreads) != 2) return 0;
    if (d->act == 1 && is_bf16) gelu_tanh_mul(static_cast<uint16_t*>(g), static_cast<const uint16_t*>(u), F);
    else if (d->act == 1) gelu_tanh_mul(static_cast<float*>(g), static_cast<const float*>(u), F);
    else if (is_bf16) silu_mul(static_cast<uint16_t*>(g), static_cast<const uint16_t*>(u), F);
    else silu_mul(static_cast<float*>(g), static_cast<const float*>(u), F);
  }
  if (!ember_linear(d->down, g, y, 1, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(y, d->post_norm, y, 1, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_rows(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(y), H);
  else add_rows(static_cast<float*>(x), static_cast<const float*>(y), H);
  if (d->out_scale) {  // x * layer_scalar, rounded to the dtype
    const float sc = load_f(d->out_scale, 0, is_bf16);
    for (int64_t i = 0; i < H; i++) store_y(x, i, load_f(x, i, is_bf16) * sc, is_bf16);
  }
  return 1;
}

}  // extern "C"

struct MoeBlockDesc {
  const LinearDesc* router;          // (E, H)
  const LinearDesc* const* experts;  // E x (gate, up, down)
  const void* norm;                  // post-attention RMSNorm weight (H,)
  int64_t H, E, k, F, norm_topk;
  float eps;
  // GLM-4.5 / DeepSeek-V3 routing (sigmoid_router, else the softmax above): router (E, H) fp32 applied to h in
  // fp32, sigmoid, + correction (E,) fp32 for the choice, the topk_group best of n_group groups (a group scores
  // its two best), top k inside them; weights the uncorrected sigmoids, renormalised (norm_topk), times scaling.
  // shared (gate, up, down) or null: a SwiGLU every token runs, added to the routed sum. sigmoid_router 2
  // (MiniMax-M2): the router of x's dtype applied to h as it is, logits rounded, one group.
  int64_t sigmoid_router;
  const float* correction;
  int64_t n_group, topk_group;
  float scaling;
  const LinearDesc* shared[3];
  int64_t shared_F;
};

namespace {

// The experts and weights of the sigmoid group-limited router (MoeBlockDesc's comment) for h (H,) of the dtype.
bool route_sigmoid_groups(const MoeBlockDesc* d, const void* h, int is_bf16, int nthreads, int64_t* ids, float* w) {
  const int64_t H = d->H, E = d->E, K = d->k, G = d->n_group, per = G > 0 ? E / G : 0;
  if (G < 1 || E % G || per < 2 || d->topk_group > G || K > d->topk_group * per || E > 512) return false;
  thread_local std::vector<float> f;
  f.resize(static_cast<size_t>(H + 2 * E));
  float* s = f.data() + H;
  if (d->sigmoid_router == 2) {  // MiniMax-M2: a router of x's dtype, its logits rounded to it
    if (!ember_linear(d->router, h, s + E, 1, is_bf16, nthreads)) return false;
    for (int64_t e = 0; e < E; e++) s[e] = load_f(s + E, e, is_bf16);
  } else {
    for (int64_t i = 0; i < H; i++) f[i] = load_f(h, i, is_bf16);
    if (!ember_linear(d->router, f.data(), s, 1, 0, nthreads)) return false;
  }
  float choice[512], gscore[512];
  for (int64_t e = 0; e < E; e++) {
    s[e] = 1.f / (1.f + std::exp(-s[e]));
    choice[e] = s[e] + d->correction[e];
  }
  for (int64_t g = 0; g < G; g++) {  // the sum of the group's two best
    float a = -INFINITY, b = -INFINITY;
    for (int64_t e = g * per; e < (g + 1) * per; e++) {
      if (choice[e] > a) b = a, a = choice[e];
      else if (choice[e] > b) b = choice[e];
    }
    gscore[g] = a + b;
  }
  bool keep[512] = {}, taken[512] = {};
  for (int64_t t = 0; t < d->topk_group; t++) {
    int64_t best = -1;
    for (int64_t g = 0; g < G; g++)
      if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
    keep[best] = true;
  }
  float wsum = 0.f;
  for (int64_t j = 0; j < K; j++) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (keep[e / per] && !taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
    taken[best] = true;
    ids[j] = best;
    wsum += (w[j] = s[best]);
  }
  for (int64_t j = 0; j < K; j++) w[j] = (d->norm_topk ? w[j] / (wsum + 1e-20f) : w[j]) * d->scaling;
  return true;
}

// Y[i] (O_i,) = X[i] (I,) @ W_i^T for n weights, each with its own activation row (the down projections of a
// token's experts): one parallel region where all are dense of X's dtype or GGUF blocks of one type (the bits of
// ember_linear at one row), else one ember_linear each. Returns 0 where a weight has no kernel for X's dtype.
int linear_each(int n, const LinearDesc* const* d, const void* const* X, void* const* Y, int x_bf16,
                int nthreads) {
  if (n > 1 && n <= kMaxJobs && dense_row_group(n, d, x_bf16)) {
    auto run = [&](auto t) {
      using T = decltype(t);
      DenseRowJob<T> jobs[kMaxJobs];
      for (int i = 0; i < n; i++)
        jobs[i] = {static_cast<const T*>(d[i]->W), d[i]->O, Y[i], static_cast<const T*>(X[i])};
      dense_row_jobs(jobs, n, static_cast<const T*>(X[0]), d[0]->I, x_bf16, nthreads);
    };
    if (x_bf16) run(uint16_t{});
    else run(float{});
    for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, x_bf16);
    return 1;
  }
  if (gguf_row_jobs(n, d, X, Y, x_bf16, nthreads)) return 1;
  for (int i = 0; i < n; i++)
    if (!ember_linear(d[i], X[i], Y[i], 1, x_bf16, nthreads)) return 0;
  return 1;
}

}  // namespace

extern "C" {

// x (H,) += the mixture of experts' output for h = rms_norm(x), routed as SparseMoE.route: softmax of the
// router's logits (rounded to the dtype) in fp32, the top k (ties to the lower index), renormalised when
// norm_topk; each chosen expert's SwiGLU output (as ember_mlp_block, without the add) weighted in fp32, the sum
// rounded once, then the residual add. Returns 0 (nothing done) where a kernel refuses x's dtype.
int ember_moe_block(const MoeBlockDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, E = d->E, K = d->k, esz = is_bf16 ? 2 : 4;
  if (K > E || K > 64) return 0;
  block_buf.resize(static_cast<size_t>(((K + 1) * H + 2 * K * F + E) * esz / 4 + H + 16));
  float* acc = block_buf.data();  // (H,) fp32
  char* base = reinterpret_cast<char*>(acc + H);
  void* h = base;
  char* gu = base + H * esz;  // (K, 2, F): each chosen expert's gate and up outputs
  char* y = base + (H + 2 * K * F) * esz;  // (K, H): each chosen expert's down output
  void* lg = base + ((K + 1) * H + 2 * K * F) * esz;
  ember_rms_norm(x, d->norm, h, 1, H, d->eps, is_bf16, 1);
  int64_t ids[64];
  float w[64], wsum = 0.f;
  if (d->sigmoid_router) {
    if (!route_sigmoid_groups(d, h, is_bf16, nthreads, ids, w)) return 0;
  } else {
    if (!ember_linear(d->router, h, lg, 1, is_bf16, nthreads)) return 0;
    float p[512];
    if (E > 512) return 0;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; e++) mx = std::max(mx, p[e] = load_f(lg, e, is_bf16));
    for (int64_t e = 0; e < E; e++) sum += (p[e] = std::exp(p[e] - mx));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    bool taken[512] = {};
    for (int64_t j = 0; j < K; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = true;
      ids[j] = best;
      wsum += (w[j] = p[best]);
    }
    if (d->norm_topk)
      for (int64_t j = 0; j < K; j++) w[j] /= wsum;
  }
  // The chosen experts' gate and up weights and the shared expert's all read h: one ember_linear_many call (one
  // parallel region where the formats allow); then every expert's down projection, the shared one's too, in one
  // linear_each call. GGUF blocks go at most kMaxGgufJobs to a call, in whole experts.
  const int64_t Fs = d->shared[0] ? d->shared_F : 0, ns = d->shared[0] ? 1 : 0, n_exp = K + ns;
  thread_local std::vector<float> sb;  // the shared expert's gate, up (Fs each) and down (H) outputs
  sb.resize(static_cast<size_t>((2 * Fs + H) * esz / 4 + 8));
  char* sg = reinterpret_cast<char*>(sb.data());
  char* sy = sg + 2 * Fs * esz;
  const LinearDesc* ex[65][3];  // expert e's (gate, up, down); the shared expert last
  void* ex_out[65][2];          // its gate and up outputs; down reads the gate's (silu(gate) * up, in place)
  for (int64_t j = 0; j < n_exp; j++) {
    const bool sh = j == K;
    for (int t = 0; t < 3; t++) ex[j][t] = sh ? d->shared[t] : d->experts[3 * ids[j] + t];
    ex_out[j][0] = sh ? sg : gu + 2 * j * F * esz;
    ex_out[j][1] = sh ? sg + Fs * esz : gu + (2 * j + 1) * F * esz;
  }
  const int per = (ex[0][0]->kind == 4 ? kMaxGgufJobs : kMaxJobs) / 2;  // experts per call
  for (int64_t j0 = 0; j0 < n_exp; j0 += per) {
    const int nj = static_cast<int>(std::min<int64_t>(per, n_exp - j0));
    const LinearDesc* gu_desc[kMaxJobs];
    void* gu_out[kMaxJobs];
    for (int j = 0; j < nj; j++)
      for (int t = 0; t < 2; t++) gu_desc[2 * j + t] = ex[j0 + j][t], gu_out[2 * j + t] = ex_out[j0 + j][t];
    if (ember_linear_many(2 * nj, gu_desc, h, gu_out, 1, is_bf16, nthreads) != 2 * nj) return 0;
  }
  const void* dn_in[65];
  void* dn_out[65];
  const LinearDesc* dn_desc[65];
  for (int64_t j = 0; j < n_exp; j++) {
    const int64_t Fj = j == K ? Fs : F;
    if (is_bf16) silu_mul(static_cast<uint16_t*>(ex_out[j][0]), static_cast<const uint16_t*>(ex_out[j][1]), Fj);
    else silu_mul(static_cast<float*>(ex_out[j][0]), static_cast<const float*>(ex_out[j][1]), Fj);
    dn_desc[j] = ex[j][2], dn_in[j] = ex_out[j][0], dn_out[j] = j == K ? sy : y + j * H * esz;
  }
  const int64_t n_dn = Fs == F ? n_exp : K;  // a wider shared expert (n_shared_experts > 1) runs its down alone
  for (int64_t j0 = 0; j0 < n_dn; j0 += 2 * per) {
    const int nj = static_cast<int>(std::min<int64_t>(2 * per, n_dn - j0));
    if (!linear_each(nj, dn_desc + j0, dn_in + j0, dn_out + j0, is_bf16, nthreads)) return 0;
  }
  if (n_dn < n_exp && !ember_linear(dn_desc[K], dn_in[K], sy, 1, is_bf16, nthreads)) return 0;
  // the routed outputs summed in the routing order (fp32), rounded; plus the shared one's, rounded
  std::fill(acc, acc + H, 0.f);
  for (int64_t j = 0; j < K; j++)
    for (int64_t i = 0; i < H; i++) acc[i] += load_f(y + j * H * esz, i, is_bf16) * w[j];
  for (int64_t i = 0; i < H; i++) acc[i] = round_to_dtype(acc[i], is_bf16);
  if (ns)
    for (int64_t i = 0; i < H; i++) acc[i] = round_to_dtype(acc[i] + load_f(sy, i, is_bf16), is_bf16);
  for (int64_t i = 0; i < H; i++) store_y(x, i, load_f(x, i, is_bf16) + acc[i], is_bf16);
  return 1;
}

}  // extern "C"

// One decoder layer of a decode step (ember_decode_layers): its attention block, its MLP or mixture-of-experts
// block (moe != 0) and its layer's key and value caches (nkv, max_len, hd); with mla != 0 the attention is
// latent.cpp's MlaDesc and Kc/Vc its latent cache (max_len, r) and rotated keys (max_len, dr).
struct LayerStepDesc {
  const AttnBlockDesc* attn;
  const void* mlp;
  int64_t moe;
  void* Kc;
  void* Vc;
  int64_t max_len;
  int64_t mla;
};

struct MlaDesc;  // latent.cpp

extern "C" {
int ember_mla_block(const MlaDesc* d, void* x, const void* cos, const void* sin, void* Lc, void* Rc, int64_t max_len,
                    int64_t pos, int is_bf16, int nthreads);

// Every layer of one decode step in one call: x (H,) through layers[0..n) in order, as ember_attn_block then
// ember_mlp_block / ember_moe_block each, then (head not null) logits (V,) = head(rms_norm(x, norm)): no Python
// between the blocks (argument conversion, cache lookups) while the other threads wait. Returns how many blocks were applied
// (two a layer), plus one when the logits were written: the caller runs the rest itself, from the first block not
// done (slot pos past a cache's end, a kernel that refused the dtype).
int ember_decode_layers(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                        int nthreads) {
  for (int i = 0; i < n; i++) {
    const LayerStepDesc& s = layers[i];
    // past a full cache the blocks return 0 (a sliding layer's ring never ends)
    const int attn = s.mla ? pos < s.max_len && ember_mla_block(reinterpret_cast<const MlaDesc*>(s.attn), x, cos, sin,
                                                                 s.Kc, s.Vc, s.max_len, pos, is_bf16, nthreads)
                           : ember_attn_block(s.attn, x, cos, sin, s.Kc, s.Vc, s.max_len, pos, is_bf16, nthreads);
    if (!attn) return 2 * i;
    const int done = s.moe ? ember_moe_block(static_cast<const MoeBlockDesc*>(s.mlp), x, is_bf16, nthreads)
                           : ember_mlp_block(static_cast<const MlpBlockDesc*>(s.mlp), x, is_bf16, nthreads);
    if (!done) return 2 * i + 1;
  }
  if (head) {
    thread_local std::vector<float> h;
    h.resize(static_cast<size_t>(head->I));  // room for H values of either dtype
    ember_rms_norm(x, norm, h.data(), 1, head->I, eps, is_bf16, 1);
    if (ember_linear(head, h.data(), logits, 1, is_bf16, nthreads)) return 2 * n + 1;
  }
  return 2 * n;
}

// ember_decode_layers with Gemma's head: the final norm with (1 + w) (norm_offset 1, as norm_rows) and, cap > 0,
// the logits soft-capped in place, cap * tanh(logits / cap), each step rounded to the dtype as HF's Gemma 2 head.
int ember_decode_layers_gemma(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin,
                              int64_t pos, const void* norm, float eps, int64_t norm_offset, float cap,
                              const LinearDesc* head, void* logits, int is_bf16, int nthreads) {
  const int done = ember_decode_layers(layers, n, x, cos, sin, pos, nullptr, eps, nullptr, nullptr, is_bf16, nthreads);
  if (done < 2 * n || !head) return done;
  thread_local std::vector<float> h;
  h.resize(static_cast<size_t>(head->I));
  norm_rows(x, norm, h.data(), 1, head->I, eps, norm_offset, is_bf16);
  if (!ember_linear(head, h.data(), logits, 1, is_bf16, nthreads)) return 2 * n;
  if (cap > 0.f) {
    if (is_bf16)
      softcap_values(static_cast<uint16_t*>(logits), head->O, cap);
    else
      softcap_values(static_cast<float*>(logits), head->O, cap);
  }
  return 2 * n + 1;
}

}  // extern "C"

// ============================================================================ decode steps of several rows
// A speculative verification pass of one sequence: rows r = 0..T-1 are tokens at slots pos + r, row r attending
// to slots 0..pos + r. Each row gets the bits ember_decode_layers gives that token alone (ember_linear_rows,
// per-row norms, RoPE and attention), while each weight streams from memory once for all rows.
namespace {

thread_local std::vector<float> rows_buf;

template <typename T>
void add_all_rows(void* x, const void* y, int64_t n) {
  add_rows(static_cast<T*>(x), static_cast<const T*>(y), n);
}

// x (T, H) += o_proj(attention(...)) for each row, as ember_attn_block for that row alone.
// Gemma's variants as the one-row block: norm_offset, post_norm, v_norm, the scale, soft-capped logits; RoPE from
// tables of cs values a row (cs = 2 * table width where the step passes two: a layer with local_rope reads the
// second, at d->hd, as the one-row block does).
int attn_block_rows(const AttnBlockDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                    int64_t max_len, int64_t pos, int64_t T, int is_bf16, int nthreads, int64_t cs) {
  if (d->hd % 2) return 0;
  const int64_t H = d->H, nq = d->nh * d->hd, nk = d->nkv * d->hd, hd = d->hd, esz = is_bf16 ? 2 : 4;
  rows_buf.resize(static_cast<size_t>(T * (H + 2 * nq + 2 * nk + H) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(rows_buf.data());
  char* h = base;
  char* q = h + T * H * esz;
  char* k = q + T * nq * esz;
  char* v = k + T * nk * esz;
  char* a = v + T * nk * esz;
  char* o = a + T * nq * esz;
  norm_rows(x, d->norm, h, T, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* qkv[3] = {d->q, d->k, d->v};
  void* qkv_out[3] = {q, k, v};
  if (!ember_linear_rows(3, qkv, h, qkv_out, T, is_bf16, nthreads)) return 0;
  if (d->q_norm) {  // per head, or over each row's whole projection (qk_full)
    norm_rows(q, d->q_norm, q, d->qk_full ? T : T * d->nh, d->qk_full ? nq : hd, d->qk_eps, d->norm_offset, is_bf16);
    norm_rows(k, d->k_norm, k, d->qk_full ? T : T * d->nkv, d->qk_full ? nk : hd, d->qk_eps, d->norm_offset, is_bf16);
  }
  if (d->v_norm) {
    if (is_bf16) rms_unweighted_rows(reinterpret_cast<uint16_t*>(v), T * d->nkv, hd, d->qk_eps);
    else rms_unweighted_rows(reinterpret_cast<float*>(v), T * d->nkv, hd, d->qk_eps);
  }
  if (d->rot > 0 && d->rot < hd) {  // partial RoPE: the first rot channels of each head, tables (T, rot)
    for (int64_t r = 0; r < T; r++)
      for (int64_t n = 0; n < d->nh + d->nkv; n++)
        ember_rope(n < d->nh ? q + (r * nq + n * hd) * esz : k + (r * nk + (n - d->nh) * hd) * esz,
                   static_cast<const char*>(cos) + r * d->rot * esz, static_cast<const char*>(sin) + r * d->rot * esz,
                   1, 1, d->rot, is_bf16);
  } else if (cs == hd && !d->local_rope) {
    ember_rope(q, cos, sin, T, d->nh, hd, is_bf16);
    ember_rope(k, cos, sin, T, d->nkv, hd, is_bf16);
  } else {
    const int64_t off = d->local_rope ? hd : 0;
    for (int64_t r = 0; r < T; r++) {
      const char* c = static_cast<const char*>(cos) + (r * cs + off) * esz;
      const char* sn = static_cast<const char*>(sin) + (r * cs + off) * esz;
      ember_rope(q + r * nq * esz, c, sn, 1, d->nh, hd, is_bf16);
      ember_rope(k + r * nk * esz, c, sn, 1, d->nkv, hd, is_bf16);
    }
  }
  for (int64_t r = 0; r < T; r++)
    for (int64_t g = 0; g < d->nkv; g++) {
      const int64_t slot = (g * max_len + pos + r) * hd * esz, src = (r * nk + g * hd) * esz;
      std::memcpy(static_cast<char*>(Kc) + slot, k + src, hd * esz);
      std::memcpy(static_cast<char*>(Vc) + slot, v + src, hd * esz);
    }
  const int64_t hs = max_len * hd;
  const float scale = d->scale > 0.f ? d->scale : 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t r = 0; r < T; r++) {
    if (d->softcap > 0.f)
      ember_softcap_attn(q + r * nq * esz, Kc, Vc, a + r * nq * esz, d->nh, d->nkv, hd, hs, pos + r + 1, scale,
                         d->softcap, is_bf16, nthreads);
    else if (!ember_attn_decode(q + r * nq * esz, Kc, Vc, a + r * nq * esz, 1, d->nh, d->nkv, hd, pos + r + 1,
                                d->nkv * hs, hs, hd, d->nkv * hs, hs, hd, nullptr, 0, 0, scale, is_bf16, nthreads))
      return 0;
  }
  const LinearDesc* od[1] = {d->o};
  void* oo[1] = {o};
  if (!ember_linear_rows(1, od, a, oo, T, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(o, d->post_norm, o, T, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_all_rows<uint16_t>(x, o, T * H);
  else add_all_rows<float>(x, o, T * H);
  return 1;
}

// x (T, H) += down(silu(gate(h)) * up(h)) for each row, as ember_mlp_block for that row alone (Gemma's GeGLU,
// norm_offset, post_norm and layer scalar too).
int mlp_block_rows(const MlpBlockDesc* d, void* x, int64_t T, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, esz = is_bf16 ? 2 : 4;
  rows_buf.resize(static_cast<size_t>(T * (2 * H + 2 * F) * esz / 4 + 8));
  char* h = reinterpret_cast<char*>(rows_buf.data());
  char* g = h + T * H * esz;
  char* u = g + T * F * esz;
  char* y = u + T * F * esz;
  if (d->act == 2) return 0;  // Nemotron-H's relu^2: one row at a time
  norm_rows(x, d->norm, h, T, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* gu[2] = {d->gate, d->up};
  void* outs[2] = {g, u};
  if (!ember_linear_rows(2, gu, h, outs, T, is_bf16, nthreads)) return 0;
  if (d->act == 1 && is_bf16) gelu_tanh_mul(reinterpret_cast<uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), T * F);
  else if (d->act == 1) gelu_tanh_mul(reinterpret_cast<float*>(g), reinterpret_cast<const float*>(u), T * F);
  else if (is_bf16) silu_mul(reinterpret_cast<uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), T * F);
  else silu_mul(reinterpret_cast<float*>(g), reinterpret_cast<const float*>(u), T * F);
  const LinearDesc* dd[1] = {d->down};
  void* yy[1] = {y};
  if (!ember_linear_rows(1, dd, g, yy, T, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(y, d->post_norm, y, T, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_all_rows<uint16_t>(x, y, T * H);
  else add_all_rows<float>(x, y, T * H);
  if (d->out_scale) {  // x * layer_scalar, rounded to the dtype
    const float sc = load_f(d->out_scale, 0, is_bf16);
    for (int64_t i = 0; i < T * H; i++) store_y(x, i, load_f(x, i, is_bf16) * sc, is_bf16);
  }
  return 1;
}

}  // namespace

extern "C" {

// ember_decode_layers for T rows of one sequence (a verification pass): x (T, H) at slots pos..pos+T-1, cos/sin
// (T, cs) (cs 0: each layer's hd; else the width of a row's tables, two where the step passes two), logits (T, V),
// the head's norm offset and final-logit cap as ember_decode_layers_gemma's. Every row's result has the bits ember_decode_layers gives it alone. A mixture of
// experts runs ember_moe_block row by row (each row routes its own way). Returns 2 * n + 1 when the logits were
// written, else 0: the caller then runs the pass as its modules (the cache slots written are rewritten there).
int ember_decode_rows_v(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        int64_t T, int64_t cs, const void* norm, float eps, int64_t norm_offset, float cap,
                        const LinearDesc* head, void* logits, int is_bf16, int nthreads) {
  if (!head || T < 1) return 0;
  const int64_t esz = is_bf16 ? 2 : 4;
  for (int i = 0; i < n; i++) {
    const LayerStepDesc& s = layers[i];
    if (s.mla) return 0;  // latent attention: one row at a time only
    const int64_t H = s.attn->H;
    if (pos + T > s.max_len ||
        !attn_block_rows(s.attn, x, cos, sin, s.Kc, s.Vc, s.max_len, pos, T, is_bf16, nthreads, cs ? cs : s.attn->hd))
      return 0;
    if (s.moe) {
      for (int64_t r = 0; r < T; r++)
        if (!ember_moe_block(static_cast<const MoeBlockDesc*>(s.mlp), static_cast<char*>(x) + r * H * esz, is_bf16,
                             nthreads))
          return 0;
    } else if (!mlp_block_rows(static_cast<const MlpBlockDesc*>(s.mlp), x, T, is_bf16, nthreads)) {
      return 0;
    }
  }
  thread_local std::vector<float> h;
  h.resize(static_cast<size_t>(T * head->I));
  norm_rows(x, norm, h.data(), T, head->I, eps, norm_offset, is_bf16);
  const LinearDesc* hd[1] = {head};
  void* out[1] = {logits};
  if (!ember_linear_rows(1, hd, h.data(), out, T, is_bf16, nthreads)) return 0;
  if (cap > 0.f) {
    if (is_bf16) softcap_values(static_cast<uint16_t*>(logits), T * head->O, cap);
    else softcap_values(static_cast<float*>(logits), T * head->O, cap);
  }
  return 2 * n + 1;
}

// ember_decode_rows_v with (T, hd) tables and Llama's head.
int ember_decode_rows(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                      int64_t T, const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                      int nthreads) {
  return ember_decode_rows_v(layers, n, x, cos, sin, pos, T, 0, norm, eps, 0, 0.f, head, logits, is_bf16, nthreads);
}

}  // extern "C"
