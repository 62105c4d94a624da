#pragma once

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
// File layout (one library: every *.cpp here compiles into it; the headers hold what several share):
//   cpu_base.h      Shared by the matmul kernels: block sizes, row pointers, per-thread scratch.
//   cpu_avx2.h      AVX2 + FMA row kernels (no AVX512): dense, int8 activations, 4-bit.
//   cpu_avx512.h    AVX512 row kernels per weight format: dense bf16, dense fp32, int8, 4-bit.
//   cpu_vnni.h      int8-activation kernels (AVX512-VNNI) for int8 and 4-bit weights, the AVX2 fp32 4-bit kernel,
//                   and the row-block runners.
//   cpu_jobs.h      Activation preparation and job runners: one quantized activation row shared by several weights.
//   cpu_linear.h    Helpers of the prepared linear calls: bias, grouping of weights into one job call, the exact
//                   several-row dense kernel.
//   cpu_norms.h     Element-wise helpers of the decoder blocks: dtype rounding, exp, RMSNorm / RoPE rows, SiLU /
//                   GELU products, soft-capping.
//   cpu_api.h       The C-level surface the units share: the prepared-weight and block descriptors (ctypes mirrors
//                   them) and the extern "C" functions.
//   cpu.cpp         Kernel build queries, dense products (AVX512, AVX2, AMX tiles), RMSNorm and RoPE entry points.
//                   The overview of the kernels is in cpu_base.h.
//   cpu_quant.cpp   Entry points of the int8 and 4-bit products and their dequantization.
//   cpu_attn.cpp    Single-query attention (ember_attn_decode).
//   cpu_linear.cpp  Prepared linear calls: ember_linear, ember_linear_many, ember_linear_rows.
//   cpu_blocks.cpp  Decoder blocks for one token: attention, MLP and mixture-of-experts blocks, every layer of a
//                   step in one call.
//   cpu_rows.cpp    Decode steps of several rows (speculative verification passes).

#pragma once

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

}  // namespace
