// DeepSeek-V3's multi-head latent attention (ember.models.mla.MLAttention after its RMSNorm) for one token, in
// the absorbed form over the latent cache: Lc (max_len, r) the normed latents, Rc (max_len, dr) the rotated
// shared keys; w_kvb is kv_b_proj's plain weight (nh * (dn + dv), r), its rows per head [W_uk (dn) | W_uv (dv)].
//
// Per head the step is four small products over the latent width r: q_lat = q_nope W_uk (dn x r), the scores
// q_lat . Lc[j] + q_rot . Rc[j], o_lat = sum_j p_j Lc[j], out = W_uv o_lat (dv x r). They run as fp32 dot
// products and axpys over rows of the weights and caches as stored (bf16 widened in registers), eight lanes at
// a time, heads split across threads; roundings as the module's (each einsum/matmul result rounded).
#include "common.h"
#include "cpu_api.h"  // LinearDesc and the shared kernels
#include "vec.h"

using namespace ember_common;
using namespace ember_vec;

struct MlaDesc {
  const LinearDesc* q;    // q_proj, or null: q_b(rms_norm(q_a(h)))
  const LinearDesc* q_a;
  const LinearDesc* q_b;
  const LinearDesc* kv_a;  // (r + dr, H)
  const LinearDesc* o;
  const void* norm;  // input RMSNorm (H,)
  const void* q_a_norm;
  const void* kv_norm;
  const void* w_kvb;
  int64_t H, nh, r, dn, dr, dv, q_rank, interleaved;
  float eps, q_a_eps, kv_eps, scaling;
};

namespace {

// The rope channels (dr) of src into dst: as stored, or [evens | odds] for DeepSeek's interleaved rotation (whose
// result, laid out so, is the half-split rotation of that order: ember_rope then applies).
void rope_channels(const void* src, void* dst, int64_t dr, int interleaved, int is_bf16) {
  for (int64_t c = 0; c < dr; c++) {
    const int64_t from = interleaved ? (c < dr / 2 ? 2 * c : 2 * (c - dr / 2) + 1) : c;
    store_y(dst, c, load_f(src, from, is_bf16), is_bf16);
  }
}

constexpr int HB = 4;  // heads per block: each latent row loaded (and widened) once for four heads' products

// out[h][i] = ql[h] . L_i (fp32) for h < HB and the two rows L_0, L_1 (r values each, as stored): 2 * HB independent
// sums, so the FMAs do not wait on each other.
template <typename T>
void dots_block(const float* const* ql, const T* L0, const T* L1, int64_t r, float (&out)[HB][2]) {
#ifdef EMBER_VEC_SIMD
  if (r % 8 == 0) {
    __m256 acc[HB][2];
    for (int h = 0; h < HB; h++) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < r; t += 8) {
      const __m256 l0 = load8(L0 + t), l1 = load8(L1 + t);
      for (int h = 0; h < HB; h++) {
        const __m256 qv = _mm256_loadu_ps(ql[h] + t);
        acc[h][0] = _mm256_fmadd_ps(qv, l0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(qv, l1, acc[h][1]);
      }
    }
    for (int h = 0; h < HB; h++) out[h][0] = hsum(acc[h][0]), out[h][1] = hsum(acc[h][1]);
    return;
  }
#endif
  for (int h = 0; h < HB; h++) out[h][0] = dot(ql[h], L0, r), out[h][1] = dot(ql[h], L1, r);
}

// out[h] = dot(qr[h], row, dr) for h < HB, the row (dr values, as stored) loaded once for the four heads: vec.h's
// dot with its order of sums (two 8-lane chains over 16 values, an odd 8 into the first, hsum), so the same bits.
template <typename T>
void rope_dots(const float (&qr)[HB][512], const T* row, int64_t dr, float (&out)[HB]) {
#ifdef EMBER_VEC_SIMD
  if (dr % 8 == 0) {
    __m256 s0[HB], s1[HB];
    for (int h = 0; h < HB; h++) s0[h] = s1[h] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= dr; i += 16) {
      const __m256 b0 = load8(row + i), b1 = load8(row + i + 8);
      for (int h = 0; h < HB; h++) {
        s0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qr[h] + i), b0, s0[h]);
        s1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qr[h] + i + 8), b1, s1[h]);
      }
    }
    if (i < dr) {
      const __m256 b0 = load8(row + i);
      for (int h = 0; h < HB; h++) s0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qr[h] + i), b0, s0[h]);
    }
    for (int h = 0; h < HB; h++) out[h] = hsum(_mm256_add_ps(s0[h], s1[h]));
    return;
  }
#endif
  for (int h = 0; h < HB; h++) out[h] = dot(qr[h], row, dr);
}

// ol[h] (r) = sum_j p[h][j] * L[j] (fp32) for h < HB, L (S, r) as stored: sixteen channels of every head at a time.
template <typename T>
void weighted_rows(const float* const* p, const T* L, int64_t S, int64_t r, float* const* ol) {
#ifdef EMBER_VEC_SIMD
  if (r % 16 == 0) {
    for (int64_t t = 0; t < r; t += 16) {
      __m256 acc[HB][2];
      for (int h = 0; h < HB; h++) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
      for (int64_t j = 0; j < S; j++) {
        const __m256 l0 = load8(L + j * r + t), l1 = load8(L + j * r + t + 8);
        for (int h = 0; h < HB; h++) {
          const __m256 pv = _mm256_set1_ps(p[h][j]);
          acc[h][0] = _mm256_fmadd_ps(pv, l0, acc[h][0]);
          acc[h][1] = _mm256_fmadd_ps(pv, l1, acc[h][1]);
        }
      }
      for (int h = 0; h < HB; h++) _mm256_storeu_ps(ol[h] + t, acc[h][0]), _mm256_storeu_ps(ol[h] + t + 8, acc[h][1]);
    }
    return;
  }
#endif
  for (int h = 0; h < HB; h++) {
    std::fill(ol[h], ol[h] + r, 0.f);
    for (int64_t j = 0; j < S; j++) axpy(ol[h], p[h][j], L + j * r, r);
  }
}

// out[v] = a . W[v] (rounded to the output's type) for the n rows of W (r values each, as stored), four at a time.
template <typename T>
void rows_dot(const float* a, const T* W, int64_t n, int64_t r, T* out) {
  int64_t v = 0;
#ifdef EMBER_VEC_SIMD
  if (r % 8 == 0)
    for (; v + 4 <= n; v += 4) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t t = 0; t < r; t += 8) {
        const __m256 av = _mm256_loadu_ps(a + t);
        for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(av, load8(W + (v + i) * r + t), acc[i]);
      }
      for (int i = 0; i < 4; i++) put(out + v + i, hsum(acc[i]));
    }
#endif
  for (; v < n; v++) put(out + v, dot(a, W + v * r, r));
}

// Whether q_b's rows can be made per head inside latent_heads' region: a dense weight of x's dtype without a bias
// and on the plain kernel (ember_linear's path at one row then is ember_dense_bf16 / ember_dense_f32).
bool q_rows_per_head(const LinearDesc* qb, int is_bf16) {
  return qb && qb->kind == 1 && qb->w_bf16 == is_bf16 && !qb->bias && !(is_bf16 && qb->amx_min_rows == 1);
}

// Heads n0..n0+nreal-1 of q = q_b(qa) (each head's dq rows of the weight, as ember_linear makes them: n0 is a multiple
// of HB, 4 = the dense kernel's rows per block, so the blocks are ember_linear's), then their rope channels into qr,
// rotated (ember_rope per head).
template <typename T>
void head_queries(const MlaDesc* d, const T* qa, const void* cos, const void* sin, int64_t n0, int nreal, T* q,
                  T* qr) {
  const int64_t dn = d->dn, dr = d->dr, dq = dn + dr, I = d->q_b->I, r0 = n0 * dq;
  constexpr int bf = std::is_same_v<T, uint16_t>;
  if constexpr (bf)
    ember_dense_bf16(static_cast<const T*>(d->q_b->W) + r0 * I, qa, q + r0, 1, nreal * dq, I, 1, 1);
  else
    ember_dense_f32(static_cast<const T*>(d->q_b->W) + r0 * I, qa, q + r0, 1, nreal * dq, I, 0, 1);
  for (int64_t n = n0; n < n0 + nreal; n++)
    rope_channels(q + n * dq + dn, qr + n * dr, dr, static_cast<int>(d->interleaved), bf);
  ember_rope(qr + n0 * dr, cos, sin, 1, nreal, dr, bf);
}

// att (nh * dv) = the attention of every head over slots 0..S-1: q (nh, dn + dr) with its rope channels
// replaced by qr (nh, dr, rotated), Lc (S, r), Rc (S, dr), W (nh * (dn + dv), r). scratch: per head 2S + 2r floats.
// Heads run in blocks of HB (a short last block repeats its last head, whose results are written twice, equal).
// qa not null: each block first makes its heads' q and qr from q_b (head_queries), in the same parallel region,
// so the step has no region (fork, join, cold prefetch start) of its own for q_b.
template <typename T>
void latent_heads(const MlaDesc* d, const T* qa, const void* cos, const void* sin, T* q, T* qr, const T* Lc,
                  const T* Rc, const T* W, int64_t S, T* att, float* scratch, int nthreads) {
  const int64_t nh = d->nh, r = d->r, dn = d->dn, dr = d->dr, dv = d->dv, dq = dn + dr, nb = (nh + HB - 1) / HB;
  const T tag{};
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nb > 1)
  for (int64_t b = 0; b < nb; b++) {
    const int nreal = static_cast<int>(std::min<int64_t>(HB, nh - b * HB));
    if (qa) head_queries(d, qa, cos, sin, b * HB, nreal, q, qr);
    const float* qlc[HB];
    const float* pc[HB];
    float *sc[HB], *ql[HB], *ol[HB];
    float qrf[HB][512], mx[HB];
    for (int i = 0; i < HB; i++) {
      const int64_t n = b * HB + std::min(i, nreal - 1);
      sc[i] = scratch + n * (2 * S + 2 * r);  // scores (S), probabilities (S), q_lat (r), o_lat (r)
      qlc[i] = ql[i] = sc[i] + 2 * S;
      ol[i] = ql[i] + r;
      pc[i] = sc[i] + S;
      mx[i] = -INFINITY;
    }
    for (int i = 0; i < nreal; i++) {
      const int64_t n = b * HB + i;
      const T* w = W + n * (dn + dv) * r;  // this head's W_uk rows
      std::fill(ql[i], ql[i] + r, 0.f);
      for (int64_t c = 0; c < dn; c++) axpy(ql[i], to_f(q[n * dq + c]), w + c * r, r);
      for (int64_t t = 0; t < r; t++) ql[i][t] = round_as(ql[i][t], tag);
      for (int64_t c = 0; c < dr; c++) qrf[i][c] = to_f(qr[n * dr + c]);
    }
    for (int i = nreal; i < HB; i++) std::copy(qrf[nreal - 1], qrf[nreal - 1] + dr, qrf[i]);
    for (int64_t j = 0; j < S; j += 2) {
      float a[HB][2], rd[2][HB];
      dots_block(qlc, Lc + j * r, Lc + std::min(j + 1, S - 1) * r, r, a);
      rope_dots(qrf, Rc + j * dr, dr, rd[0]);
      rope_dots(qrf, Rc + std::min(j + 1, S - 1) * dr, dr, rd[1]);
      for (int i = 0; i < nreal; i++)
        for (int64_t jj = 0; jj < 2 && j + jj < S; jj++) {
          const float bv = round_as(rd[jj][i], tag);
          const float s = round_as(round_as(round_as(a[i][jj], tag) + bv, tag) * d->scaling, tag);
          sc[i][j + jj] = s;
          mx[i] = std::max(mx[i], s);
        }
    }
    for (int i = 0; i < nreal; i++) {
      float sum = 0.f;
      for (int64_t j = 0; j < S; j++) sum += (sc[i][S + j] = std::exp(sc[i][j] - mx[i]));
      for (int64_t j = 0; j < S; j++) sc[i][S + j] = round_as(sc[i][S + j] / sum, tag);
    }
    weighted_rows(pc, Lc, S, r, ol);
    for (int i = 0; i < nreal; i++) {
      const int64_t n = b * HB + i;
      for (int64_t t = 0; t < r; t++) ol[i][t] = round_as(ol[i][t], tag);
      rows_dot(ol[i], W + (n * (dn + dv) + dn) * r, dv, r, att + n * dv);  // this head's W_uv rows
    }
  }
}

}  // namespace

extern "C" {

// x (H,) += o(MLA(rms_norm(x))) for the token at slot pos, its latent and rotated key written at pos; roundings
// as the module's _absorbed (each product of the einsums and matmuls rounded to the dtype, softmax in fp32).
// Returns 0 (nothing done) where a projection refuses x's dtype or pos is past the cache.
int ember_mla_block(const MlaDesc* d, void* x, const void* cos, const void* sin, void* Lc, void* Rc, int64_t max_len,
                    int64_t pos, int is_bf16, int nthreads) {
  const int64_t H = d->H, nh = d->nh, r = d->r, dn = d->dn, dr = d->dr, dv = d->dv, esz = is_bf16 ? 2 : 4;
  const int64_t dq = dn + dr, S = pos + 1;
  if (pos >= max_len || dr % 2 || dr > 512) return 0;
  thread_local std::vector<float> buf;
  const int64_t n_el = H + d->q_rank + nh * dq + r + dr + nh * dr + nh * dv + H;
  buf.resize(static_cast<size_t>(n_el * esz / 4 + nh * (2 * S + 2 * r) + 16));
  float* scratch = buf.data();
  char* base = reinterpret_cast<char*>(scratch + nh * (2 * S + 2 * r));
  void* h = base;
  void* qa = base + H * esz;
  void* q = base + (H + d->q_rank) * esz;
  void* kv = base + (H + d->q_rank + nh * dq) * esz;
  void* qr = base + (H + d->q_rank + nh * dq + r + dr) * esz;
  void* att = base + (H + d->q_rank + nh * dq + r + dr + nh * dr) * esz;
  void* o = base + (H + d->q_rank + nh * dq + r + dr + nh * dr + nh * dv) * esz;
  ember_rms_norm(x, d->norm, h, 1, H, d->eps, is_bf16, 1);
  bool per_head = false;  // q_b's rows made inside the attention's region
  if (d->q) {
    const LinearDesc* two[2] = {d->q, d->kv_a};
    void* outs[2] = {q, kv};
    if (ember_linear_many(2, two, h, outs, 1, is_bf16, nthreads) != 2) return 0;
  } else {
    const LinearDesc* two[2] = {d->q_a, d->kv_a};
    void* outs[2] = {qa, kv};
    if (ember_linear_many(2, two, h, outs, 1, is_bf16, nthreads) != 2) return 0;
    ember_rms_norm(qa, d->q_a_norm, qa, 1, d->q_rank, d->q_a_eps, is_bf16, 1);
    per_head = nh > HB && q_rows_per_head(d->q_b, is_bf16);  // one block of heads: q_b on every thread instead
    if (!per_head && !ember_linear(d->q_b, qa, q, 1, is_bf16, nthreads)) return 0;
  }
  char* lat = static_cast<char*>(Lc) + pos * r * esz;
  char* rot = static_cast<char*>(Rc) + pos * dr * esz;
  ember_rms_norm(kv, d->kv_norm, lat, 1, r, d->kv_eps, is_bf16, 1);
  rope_channels(static_cast<char*>(kv) + r * esz, rot, dr, static_cast<int>(d->interleaved), is_bf16);
  ember_rope(rot, cos, sin, 1, 1, dr, is_bf16);
  if (!per_head) {
    for (int64_t n = 0; n < nh; n++)
      rope_channels(static_cast<char*>(q) + (n * dq + dn) * esz, static_cast<char*>(qr) + n * dr * esz, dr,
                    static_cast<int>(d->interleaved), is_bf16);
    ember_rope(qr, cos, sin, 1, nh, dr, is_bf16);
  }
  if (is_bf16)
    latent_heads(d, per_head ? static_cast<const uint16_t*>(qa) : nullptr, cos, sin, static_cast<uint16_t*>(q),
                 static_cast<uint16_t*>(qr), static_cast<const uint16_t*>(Lc), static_cast<const uint16_t*>(Rc),
                 static_cast<const uint16_t*>(d->w_kvb), S, static_cast<uint16_t*>(att), scratch, nthreads);
  else
    latent_heads(d, per_head ? static_cast<const float*>(qa) : nullptr, cos, sin, static_cast<float*>(q),
                 static_cast<float*>(qr), static_cast<const float*>(Lc), static_cast<const float*>(Rc),
                 static_cast<const float*>(d->w_kvb), S, static_cast<float*>(att), scratch, nthreads);
  if (!ember_linear(d->o, att, o, 1, is_bf16, nthreads)) return 0;
  for (int64_t c = 0; c < H; c++) store_y(x, c, load_f(x, c, is_bf16) + load_f(o, c, is_bf16), is_bf16);
  return 1;
}

}  // extern "C"
