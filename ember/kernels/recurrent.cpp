// Per-token state updates of the recurrent layers (one decode step), fp32 state updated in place:
//
//  * ember_gated_delta_step: Gated DeltaNet's delta rule (Qwen3-Next / Qwen3.5), per (row, head) a (dk, dv)
//    matrix S:   S <- exp(g) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
//  * ember_mamba2_step: Mamba-2's selective state update (Nemotron-H), per (row, head) a (P, N) matrix S:
//    S <- exp(dt A) S + dt x B^T;  y = S C + D x   (B and C shared by the heads of a group)
//
// Each (row, head) is independent: OpenMP splits them over threads. A head's state (64 KB for a 128 x 128
// DeltaNet head) stays in L2 between the kernel's two passes over it, so the step reads and writes the state
// once from memory, as the roofline of a decode step counts it. The inner loops run over the state's last axis
// (dv or N) 16 (AVX512) or 8 (AVX2) lanes at a time; the portable build runs them as plain loops. Sums are taken
// in a different order than PyTorch's einsum/matmul, so results agree with the torch path to fp32 rounding.
#include "common.h"

#include <cmath>
#include <cstdint>

namespace {

// y[j] += a * x[j] for j < n
inline void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t j = 0;
#if defined(EMBER_X86)
  const __m512 va = _mm512_set1_ps(a);
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j)));
#elif defined(EMBER_AVX2)
  const __m256 va = _mm256_set1_ps(a);
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; j++) y[j] += a * x[j];
}

// s[j] = d * s[j] + a * x[j], and returns sum_j s[j] * c[j] (the new row read along c)
inline float decay_write_read(float* s, float d, float a, const float* x, const float* c, int64_t n) {
  int64_t j = 0;
  float acc = 0.0f;
#if defined(EMBER_X86)
  const __m512 vd = _mm512_set1_ps(d), va = _mm512_set1_ps(a);
  __m512 vacc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_fmadd_ps(va, _mm512_loadu_ps(x + j), _mm512_mul_ps(vd, _mm512_loadu_ps(s + j)));
    _mm512_storeu_ps(s + j, v);
    vacc = _mm512_fmadd_ps(v, _mm512_loadu_ps(c + j), vacc);
  }
  acc = _mm512_reduce_add_ps(vacc);
#elif defined(EMBER_AVX2)
  const __m256 vd = _mm256_set1_ps(d), va = _mm256_set1_ps(a);
  __m256 vacc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_mul_ps(vd, _mm256_loadu_ps(s + j)));
    _mm256_storeu_ps(s + j, v);
    vacc = _mm256_fmadd_ps(v, _mm256_loadu_ps(c + j), vacc);
  }
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(vacc), _mm256_extractf128_ps(vacc, 1));
  const __m128 h2 = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  acc = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
#endif
  for (; j < n; j++) {
    s[j] = d * s[j] + a * x[j];
    acc += s[j] * c[j];
  }
  return acc;
}

// One DeltaNet head: S (dk, dv) row-major, q/k (dk), v/out (dv); u is dv floats of scratch.
void delta_head(float* S, const float* q, const float* k, const float* v, float g, float beta, float* out, float* u,
                int64_t dk, int64_t dv) {
  const float decay = std::exp(g);
  // pass 1: u = S^T k (before the decay; the decay scales it), rows of S weighted by k
  for (int64_t j = 0; j < dv; j++) u[j] = 0.0f;
  for (int64_t i = 0; i < dk; i++) axpy(u, k[i], S + i * dv, dv);
  for (int64_t j = 0; j < dv; j++) u[j] = beta * (v[j] - decay * u[j]);
  // pass 2: S <- decay S + k u^T, and o = S^T q over the new rows
  for (int64_t j = 0; j < dv; j++) out[j] = 0.0f;
  for (int64_t i = 0; i < dk; i++) {
    float* row = S + i * dv;
    int64_t j = 0;
#if defined(EMBER_X86)
    const __m512 vd = _mm512_set1_ps(decay), vk = _mm512_set1_ps(k[i]), vq = _mm512_set1_ps(q[i]);
    for (; j + 16 <= dv; j += 16) {
      const __m512 s = _mm512_fmadd_ps(vk, _mm512_loadu_ps(u + j), _mm512_mul_ps(vd, _mm512_loadu_ps(row + j)));
      _mm512_storeu_ps(row + j, s);
      _mm512_storeu_ps(out + j, _mm512_fmadd_ps(vq, s, _mm512_loadu_ps(out + j)));
    }
#elif defined(EMBER_AVX2)
    const __m256 vd = _mm256_set1_ps(decay), vk = _mm256_set1_ps(k[i]), vq = _mm256_set1_ps(q[i]);
    for (; j + 8 <= dv; j += 8) {
      const __m256 s = _mm256_fmadd_ps(vk, _mm256_loadu_ps(u + j), _mm256_mul_ps(vd, _mm256_loadu_ps(row + j)));
      _mm256_storeu_ps(row + j, s);
      _mm256_storeu_ps(out + j, _mm256_fmadd_ps(vq, s, _mm256_loadu_ps(out + j)));
    }
#endif
    for (; j < dv; j++) {
      row[j] = decay * row[j] + k[i] * u[j];
      out[j] += q[i] * row[j];
    }
  }
}

}  // namespace

extern "C" {

// Gated delta rule, one token. S (BH, dk, dv) fp32 in place; q, k (BH, dk); v, out (BH, dv); g, beta (BH,);
// BH = rows x value heads (q and k already repeated to the value heads, q scaled, both L2-normed).
void ember_gated_delta_step(float* S, const float* q, const float* k, const float* v, const float* g,
                            const float* beta, float* out, int64_t BH, int64_t dk, int64_t dv, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (BH > 1)
  {
    std::vector<float> u(static_cast<size_t>(dv));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; bh++)
      delta_head(S + bh * dk * dv, q + bh * dk, k + bh * dk, v + bh * dv, g[bh], beta[bh], out + bh * dv, u.data(),
                 dk, dv);
  }
}

// Mamba-2 selective state update, one token. S (B, H, P, N) fp32 in place; x, y (B, H, P); dt (B, H) after
// softplus and clamp; A, D (H,); Bm, Cm (B, G, N), head h reading group h / (H / G).
void ember_mamba2_step(float* S, const float* x, const float* dt, const float* A, const float* Bm, const float* Cm,
                       const float* D, float* y, int64_t B, int64_t H, int64_t P, int64_t N, int64_t G,
                       int nthreads) {
  const int64_t per_group = H / G;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B * H > 1)
  for (int64_t bh = 0; bh < B * H; bh++) {
    const int64_t b = bh / H, h = bh % H, grp = b * G + h / per_group;
    const float step = dt[bh], decay = std::exp(step * A[h]);
    const float* xs = x + bh * P;
    for (int64_t p = 0; p < P; p++)
      y[bh * P + p] = decay_write_read(S + (bh * P + p) * N, decay, step * xs[p], Bm + grp * N, Cm + grp * N, N)
                      + D[h] * xs[p];
  }
}

}  // extern "C"
