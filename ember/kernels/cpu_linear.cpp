// Prepared linear calls: ember_linear, ember_linear_many, ember_linear_rows.
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_linear.h"

// ============================================================================ prepared linear calls

extern "C" {

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
// stands for). Dense weights stream each 4-row block once for all M rows (rows_block: 4-6 rows in one pass);
// other formats (and AMX at one row) run ember_linear_many row by row. Returns 0 (nothing guaranteed written) where a weight has no
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

