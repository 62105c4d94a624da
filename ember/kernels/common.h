// Shared by every kernel source in this folder: the ISA tiers a build compiled, prefetch distances, and the
// bf16 <-> fp32 helpers. Each .cpp is its own translation unit; everything here is inline or has internal linkage.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(EMBER_PORTABLE) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define EMBER_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Software prefetch: the same offset of the row 4 rows ahead, i.e. the next 4-row block (a thread's rows are
// one contiguous run). Within a row the hardware prefetchers keep up; at each block boundary they do not,
// and rows of quantized weights are short (1 KB for 2048 int4 values), so without this every block starts
// with cold misses.
// The 4-bit and VNNI int8 kernels prefetch into L2 only (T1): an L1 prefetch holds one of the core's few L1
// fill buffers until its line arrives, which stalls the loads behind it.
// The 4-bit kernels prefetch 8 rows ahead (two 4-row blocks; one block of the 8-row decode kernel): their 1 KB
// rows (2048 values) stream in about DRAM's latency, which one block ahead does not cover.
#ifndef PF_Q4
#define PF_Q4 (8 * I / 2)
#endif
#ifndef PF_Q4_AVX2  // the AVX2 tier's: one block ahead
#define PF_Q4_AVX2 (4 * I / 2)
#endif
#ifndef PF_I8
#define PF_I8 1024
#endif
#ifndef PF_I8_VNNI
#define PF_I8_VNNI (4 * I)
#endif
#ifndef PF_DENSE
#define PF_DENSE (4 * I * 2)
#endif
// bf16/fp32 rows prefetch into L1 (T0) on Intel; on AMD Zen into L2 (T1), where T0 prefetches of streamed
// rows hold back the plain read rate. GCC names every Zen core __znverN__ under -march=native.
#ifndef PF_HINT
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define PF_HINT _MM_HINT_T1
#else
#define PF_HINT _MM_HINT_T0
#endif
#endif
#ifndef PF_Q4_HINT
#define PF_Q4_HINT _MM_HINT_T1
#endif
#ifndef PF_I8_HINT
#define PF_I8_HINT _MM_HINT_T1
#endif

#if !defined(EMBER_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#define EMBER_X86 1
#include <immintrin.h>
#endif
#if defined(EMBER_X86) && defined(__AVX512VNNI__)
#define EMBER_VNNI 1
#endif
#if !defined(EMBER_PORTABLE) && !defined(EMBER_X86) && defined(__AVX2__) && defined(__FMA__)
#define EMBER_AVX2 1
#include <immintrin.h>
#endif
// What this build compiled, for the library's queries (ember_kernels_*).
#if defined(EMBER_X86)
constexpr int kIsa = 1;
#elif defined(EMBER_AVX2)
constexpr int kIsa = 2;
#else
constexpr int kIsa = 0;
#endif
#if defined(EMBER_VNNI)
constexpr int kVnni = 1, kActQ8Levels = 127;
#elif defined(EMBER_AVX2)
constexpr int kVnni = 0, kActQ8Levels = 63;
#else
constexpr int kVnni = 0, kActQ8Levels = 0;
#endif

namespace ember_common {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: the rounding torch uses for fp32 -> bf16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float load_f(const void* p, int64_t i, int is_bf16) {
  return is_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_y(void* Y, int64_t i, float v, int y_bf16) {
  if (y_bf16)
    static_cast<uint16_t*>(Y)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(Y)[i] = v;
}

#ifdef EMBER_X86
// 16 fp32 values to out[i..i+15] as fp32, or as bf16 rounded to nearest even (vcvtneps2bf16, as torch rounds).
inline void store16(void* out, int64_t i, __m512 v, int out_bf16) {
  if (out_bf16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), (__m256i)_mm512_cvtneps_pbh(v));
  else
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
}

// A 64-byte load kept in a register: without the empty asm the compiler folds the load into both ops of a nibble
// split (vpsrlw and vpandd with a memory operand), which reads each vector of codes from L1 twice.
inline __m512i load_once(const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return v;
}

// The first min(n, 16) lanes: the mask of a loop's last, partial vector.
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
#endif

}  // namespace ember_common
