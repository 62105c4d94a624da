// Helpers of the prepared linear calls: bias, grouping of weights into one job call, the exact several-row dense
// kernel.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_jobs.h"
#include "cpu_api.h"

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

// Activation rows X (nm <= MB, I) times a block of R weight rows, each (weight row, activation row) product with
// the bits of the one-activation-row kernel (dense_*_rows with nm = 1). The AVX512 and portable kernels sum each
// pair the same way whatever nm is; the AVX2 kernels keep two accumulators for one activation row and one for two,
// so here two activation rows at a time get the one-row kernel's two accumulators each (two weight rows at a time,
// to stay within the 16 vector registers).
#ifdef EMBER_AVX2
// 16 weights or activations as two fp32 vectors, split as the one-row kernels split them: bf16 as (even, odd)
// (bf16_pairs), fp32 as (first 8, last 8).
inline void halves(const uint16_t* p, __m256& a, __m256& b) { bf16_pairs(p, a, b); }
inline void halves(const float* p, __m256& a, __m256& b) { a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8); }

template <int NM, typename T>
inline void rows_avx2_exact(const T* const* w, const T* X, int64_t I, float* out) {
  for (int r0 = 0; r0 < R; r0 += 2) {
    __m256 acc[2][NM][2];
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < NM; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < I; k += 16) {
      __m256 xa[NM], xb[NM];
      for (int m = 0; m < NM; m++) halves(X + m * I + k, xa[m], xb[m]);
      for (int r = 0; r < 2; r++) {
        if (k % (64 / sizeof(T)) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r0 + r] + k + 4 * I), PF_HINT);
        __m256 wa, wb;
        halves(w[r0 + r] + k, wa, wb);
        for (int m = 0; m < NM; m++) {
          acc[r][m][0] = _mm256_fmadd_ps(wa, xa[m], acc[r][m][0]);
          acc[r][m][1] = _mm256_fmadd_ps(wb, xb[m], acc[r][m][1]);
        }
      }
    }
    for (int r = 0; r < 2; r++)
      for (int m = 0; m < NM; m++) out[(r0 + r) * MB + m] = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
  }
}
#endif

template <typename T>
inline void dense_rows_exact(const T* const* w, const T* X, int64_t I, int nm, float* out) {
  constexpr bool bf = std::is_same_v<T, uint16_t>;
#ifdef EMBER_AVX2
  if (I % (bf ? 32 : 16) == 0) {  // the one-row kernels' condition; otherwise their portable loop, exact at any nm
    in_pairs(nm, [&](auto n, int m) { rows_avx2_exact<decltype(n)::value>(w, X + m * I, I, out + m); });
    return;
  }
#endif
  if constexpr (bf) dense_bf16_rows(w, X, I, nm, out);
  else dense_f32_rows(w, X, I, nm, out);
}

}  // namespace

