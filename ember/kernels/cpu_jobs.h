// Activation preparation and job runners: one quantized activation row shared by several weights.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "cpu_vnni.h"

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

