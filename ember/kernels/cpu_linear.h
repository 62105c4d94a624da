// Helpers of the prepared linear calls: bias, grouping of weights into one job call, the exact several-row dense
// kernel.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_jobs.h"
#include "cpu_api.h"

namespace {

constexpr int kWideRows = 6;  // activation rows of one rows_wide pass at most (12 accumulators)
// rows_wide runs where kWideRows activation rows take at most this much of L1 (fp32 I <= 1024, bf16 I <= 2048):
// longer rows miss L1 on every FMA operand, and there the 1-3-row kernels, which share each activation load
// between two weight rows, run faster.
constexpr int64_t kWideL1Bytes = 24 * 1024;

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

// 16 values of a row (weights or activations) as the one-row kernels pair them: fp32 the first and the last 8, bf16
// the 8 even and the 8 odd values (bf16_pairs), each an fp32 vector.
inline void split16(const float* p, __m256& a, __m256& b) { a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8); }
inline void split16(const uint16_t* p, __m256& a, __m256& b) { bf16_pairs(p, a, b); }

// Activation rows X (NM, I) times a block of R weight rows in one pass, row after row: each weight vector is
// loaded once and feeds all NM rows, into the two accumulators per (weight row, activation row) of the one-row
// kernels (2 NM <= 12 of them), both operands split as split16 splits them (bf16 activations in registers: their
// rows stay half the size in L1, and a split copy would cost a store per value). Each accumulator sums its
// products in the one-row kernel's order, so every product has its bits. Whole rows in order keep the hardware
// prefetcher streaming; bf16 weights, with twice the FMAs per byte, also prefetch the next block's lines (PF;
// fp32 rows stream faster without).
template <int NM, bool PF, typename T>
inline void rows_wide(const T* const* w, const T* X, int64_t I, float* out) {
  for (int r = 0; r < R; r++) {
    __m256 acc[NM][2];
    for (int m = 0; m < NM; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const T* wr = w[r];
    for (int64_t k = 0; k < I; k += 16) {
      if (PF && (k * sizeof(T)) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k + 4 * I), _MM_HINT_T0);
      __m256 a, b;
      split16(wr + k, a, b);
      for (int m = 0; m < NM; m++) {
        __m256 xa, xb;
        split16(X + m * I + k, xa, xb);
        acc[m][0] = _mm256_fmadd_ps(a, xa, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(b, xb, acc[m][1]);
      }
    }
    for (int m = 0; m < NM; m++) out[r * kWideRows + m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

template <bool PF, typename T>
inline void rows_wide_n(int nm, const T* const* w, const T* X, int64_t I, float* out) {
  constexpr bool pf = PF && std::is_same_v<T, uint16_t>;
  if (nm == 4) rows_wide<4, pf>(w, X, I, out);
  else if (nm == 5) rows_wide<5, pf>(w, X, I, out);
  else rows_wide<6, pf>(w, X, I, out);
}
#endif

// How many activation rows the next group takes, `left` of them left. With wide (their fp32 rows fit L1 beside the
// streamed weights): 4-6 in one rows_wide pass (8-12 accumulator chains cover the FMA latency), fewer through the
// 1-3-row kernels, more in wide groups that leave no 1-3 tail where they can (7: 4 + 3). Without: threes (the most
// rows_avx2_exact's registers hold), and 2 + 2 rather than 3 + 1 (a lone row leaves the FMA latency uncovered).
inline int row_group(int64_t left, bool wide) {
  if (!wide) return left == 4 ? 2 : static_cast<int>(std::min<int64_t>(3, left));
  if (left <= kWideRows) return static_cast<int>(left);
  return left - kWideRows >= 4 ? kWideRows : 4;
}

template <typename T>
inline void dense_rows_portable(const T* const* w, const T* X, int64_t I, int nm, float* out) {
  if constexpr (std::is_same_v<T, uint16_t>) dense_bf16_rows(w, X, I, nm, out);
  else dense_f32_rows(w, X, I, nm, out);
}

// out (R, stride) -> rows m0.. of Y (M, O) in Y's dtype: the one-row kernels' store_block with a wider stride.
inline void store_rows(void* Y, int64_t O, int64_t o0, int64_t m0, int nm, const float* out, int stride, int y_bf16) {
  for (int r = 0; r < R && o0 + r < O; r++)
    for (int m = 0; m < nm; m++) store_y(Y, (m0 + m) * O + o0 + r, out[r * stride + m], y_bf16);
}

// Weight d's 4-row block at o0 times all M rows of X, stored into Y: the block is read from memory once (by the
// first group's pass) and every further group of rows finds it in L1/L2. Groups of 4-6 rows take rows_wide
// where kWideRows rows of X fit kWideL1Bytes, the rest the 1-3-row kernels. Where the one-row kernels' AVX2 condition does not hold, their portable loops (exact at any nm).
template <typename T>
inline void rows_block(const LinearDesc& d, int64_t o0, const T* X, int64_t M, void* Y) {
  const int64_t I = d.I, O = d.O;
  constexpr int y_bf16 = std::is_same_v<T, uint16_t>;
  const T* w[R];
  row_ptrs(static_cast<const T*>(d.W), o0, O, I, w);
  float out[R * kWideRows];
#ifdef EMBER_AVX2
  if (I % (y_bf16 ? 32 : 16) == 0) {
    const bool wide = kWideRows * I * static_cast<int64_t>(sizeof(T)) <= kWideL1Bytes;
    for (int64_t m0 = 0; m0 < M;) {
      const int nm = row_group(M - m0, wide);
      if (nm >= 4) {
        m0 == 0 ? rows_wide_n<true>(nm, w, X + m0 * I, I, out) : rows_wide_n<false>(nm, w, X + m0 * I, I, out);
        store_rows(Y, O, o0, m0, nm, out, kWideRows, y_bf16);
      } else if constexpr (y_bf16) {  // pairs, a lone row through the one-row kernel itself
        for (int p = 0; p < nm; p += 2) {
          if (nm - p >= 2) rows_bf16_pair(w, X + (m0 + p) * I, I, out);
          else dense_bf16_avx2<1>(w, X + (m0 + p) * I, I, out);
          store_block(Y, O, o0, m0 + p, std::min(2, nm - p), out, nullptr, 1);
        }
      } else {
        const float* x = X + m0 * I;
        if (nm == 3) m0 == 0 ? rows_avx2_exact<3, true>(w, x, I, out) : rows_avx2_exact<3, false>(w, x, I, out);
        else if (nm == 2) m0 == 0 ? rows_avx2_exact<2, true>(w, x, I, out) : rows_avx2_exact<2, false>(w, x, I, out);
        else m0 == 0 ? rows_avx2_exact<1, true>(w, x, I, out) : rows_avx2_exact<1, false>(w, x, I, out);
        store_block(Y, O, o0, m0, nm, out, nullptr, 0);
      }
      m0 += nm;
    }
    return;
  }
#endif
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
    dense_rows_portable(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  }
}

}  // namespace

