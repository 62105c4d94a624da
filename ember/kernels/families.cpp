// Decode blocks of the families whose pieces differ from Llama's (one token of one sequence, the residual add
// included), built from the same kernels as cpu_blocks.cpp's blocks and rounded where the modules round.
//
// gpt-oss's mixture of experts (ember.models.gpt_oss.GptOssMLP over ember.quant.mxfp4.Mxfp4Experts): the
// router (a Linear with bias) picks the k largest logits, a softmax over those k weighs them; each chosen expert
// multiplies its MXFP4 blocks as stored (ember_mxfp4), adds its bias and applies the clamped SwiGLU of its
// interleaved gate/up columns: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
// Experts from a llama.cpp GGUF file (ember.loading.gguf.family_weights.GGUFGptOssExperts: a gate, up and down
// projection per expert in the file's block types) run as those projections' kernels (ember_linear).
#include "common.h"
#include "cpu_api.h"  // LinearDesc and the shared kernels

using namespace ember_common;

extern "C" {
int ember_mxfp4(const uint8_t* blocks, const uint8_t* scales, const void* X, int x_bf16, void* Y, int y_bf16,
                int64_t M, int64_t O, int64_t I, int act_q8, int nthreads);  // mxfp4.cpp
}

struct GptOssMoeDesc {
  const LinearDesc* router;  // (E, H) with its bias
  const void* norm;          // post-attention RMSNorm weight (H,)
  const uint8_t* gu_blocks;  // (E, 2I, H/32, 16)
  const uint8_t* gu_scales;  // (E, 2I, H/32)
  const void* gu_bias;       // (E, 2I), x's dtype
  const uint8_t* dn_blocks;  // (E, H, I/32, 16)
  const uint8_t* dn_scales;  // (E, H, I/32)
  const void* dn_bias;       // (E, H)
  const LinearDesc* const* lin;  // GGUF experts: per expert its gate, up, down kernels (3E); null: the blocks above
  int64_t H, E, k, I, act_q8;
  float eps, alpha, limit;
};

namespace {

inline float rnd(float v, int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

thread_local std::vector<float> moe_buf;

#if defined(EMBER_X86) || defined(EMBER_AVX2)
// 8 lanes rounded to bf16 (nearest even) and back where bf is set (finite values: what rnd does to them).
inline __m256 rnd8(__m256 v, int bf) {
  if (!bf) return v;
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

inline __m256 load8(const void* p, int64_t i, int bf) {  // 8 values of x's dtype as fp32
  if (!bf) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store8(void* p, int64_t i, __m256 v, int bf) {  // v already of x's dtype (rnd8): bf16 by truncation
  if (!bf) return _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), w);
}

// e^x in 8 lanes within a few ulp of std::exp for x in [-87.3, 88.3] (clamped there): x = n ln2 + r, |r| <= ln2/2
// (ln2 in two parts so n ln2 is exact), e^r = 1 + r + r^2 P(r) with Cephes' expf coefficients, times 2^n.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sum_c q[c] k[off + c] over n values (k of x's dtype), in fp32.
inline float dot_q(const float* q, const void* k, int64_t off, int64_t n, int bf) {
  int64_t c = 0;
  float r = 0.f;
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  __m256 s = _mm256_setzero_ps();
  for (; c + 8 <= n; c += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k, off + c, bf), s);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  r = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; c < n; c++) r += q[c] * load_f(k, off + c, bf);
  return r;
}

// acc[c] += p v[off + c] over n values (v of x's dtype), in fp32.
inline void axpy_v(float* acc, float p, const void* v, int64_t off, int64_t n, int bf) {
  int64_t c = 0;
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  const __m256 vp = _mm256_set1_ps(p);
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(vp, load8(v, off + c, bf), _mm256_loadu_ps(acc + c)));
#endif
  for (; c < n; c++) acc[c] += p * load_f(v, off + c, bf);
}

// act (I,) = (u + 1) * g * sigmoid(alpha * g) from the clamped, biased gate g and up u (fp32 holding x's dtype's
// values), each op rounded to x's dtype as the module's.
void clamped_swiglu(const float* g, const float* u, void* act, int64_t I, float alpha, int is_bf16) {
  int64_t c = 0;
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  const __m256 va = _mm256_set1_ps(alpha), one = _mm256_set1_ps(1.f);
  for (; c + 8 <= I; c += 8) {
    const __m256 gv = _mm256_loadu_ps(g + c), uv = _mm256_loadu_ps(u + c);
    const __m256 t = rnd8(_mm256_mul_ps(gv, va), is_bf16);
    const __m256 en = exp8(_mm256_sub_ps(_mm256_setzero_ps(), t));
    const __m256 sg = rnd8(_mm256_div_ps(one, _mm256_add_ps(one, en)), is_bf16);
    store8(act, c, rnd8(_mm256_mul_ps(rnd8(_mm256_add_ps(uv, one), is_bf16), rnd8(_mm256_mul_ps(gv, sg), is_bf16)),
                        is_bf16), is_bf16);
  }
#endif
  for (; c < I; c++) {
    const float t = rnd(g[c] * alpha, is_bf16);
    const float s = rnd(1.f / (1.f + std::exp(-t)), is_bf16);
    store_y(act, c, rnd(rnd(u[c] + 1.f, is_bf16) * rnd(g[c] * s, is_bf16), is_bf16), is_bf16);
  }
}

// acc (H,) = rnd(acc + rnd(rnd(y + bias) * w)): one expert's weighted output added in x's dtype.
void add_expert(float* acc, const void* y, const void* bias, float w, int64_t H, int is_bf16) {
  int64_t c = 0;
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  const __m256 vw = _mm256_set1_ps(w);
  for (; c + 8 <= H; c += 8) {
    const __m256 v = rnd8(_mm256_add_ps(load8(y, c, is_bf16), load8(bias, c, is_bf16)), is_bf16);
    const __m256 wv = rnd8(_mm256_mul_ps(v, vw), is_bf16);
    _mm256_storeu_ps(acc + c, rnd8(_mm256_add_ps(_mm256_loadu_ps(acc + c), wv), is_bf16));
  }
#endif
  for (; c < H; c++) {
    const float v = rnd(load_f(y, c, is_bf16) + load_f(bias, c, is_bf16), is_bf16);
    acc[c] = rnd(acc[c] + rnd(v * w, is_bf16), is_bf16);
  }
}

}  // namespace

extern "C" {

// x (H,) += GptOssMLP(rms_norm(x)) with the roundings of the module path in x's dtype: each product, bias add and
// elementwise op rounded; the chosen experts' weighted outputs added to a zero sum in increasing expert id (the
// module's index_add_ order), then the residual add. Returns 0 (nothing done) where a product is refused.
int ember_gptoss_moe_block(const GptOssMoeDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, E = d->E, K = d->k, I = d->I, esz = is_bf16 ? 2 : 4;
  if (K > E || K > 64 || E > 1024 || H % 32 || I % 32) return 0;
  // fp32 (H acc, I gate, I up) then dtype-sized: h (H), logits (E), gate/up (2I), act (I), y (H)
  moe_buf.resize(static_cast<size_t>(H + 2 * I + (2 * H + E + 3 * I) * esz / 4 + 16));
  float* acc = moe_buf.data();
  float* gf = acc + H;
  float* uf = gf + I;
  char* base = reinterpret_cast<char*>(uf + I);
  void* h = base;
  void* lg = base + H * esz;
  void* gu = base + (H + E) * esz;
  void* act = base + (H + E + 2 * I) * esz;
  void* y = base + (H + E + 3 * I) * esz;
  ember_rms_norm(x, d->norm, h, 1, H, d->eps, is_bf16, 1);
  if (!ember_linear(d->router, h, lg, 1, is_bf16, nthreads)) return 0;
  int64_t ids[64];
  float w[64];
  bool taken[1024] = {};
  for (int64_t j = 0; j < K; j++) {  // the k largest logits, ties to the lower index
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (!taken[e] && (best < 0 || load_f(lg, e, is_bf16) > load_f(lg, best, is_bf16))) best = e;
    taken[best] = true;
    ids[j] = best;
  }
  float mx = -INFINITY, sum = 0.f;  // softmax over the k in fp32, rounded to the dtype (F.softmax's dtype=)
  for (int64_t j = 0; j < K; j++) mx = std::max(mx, load_f(lg, ids[j], is_bf16));
  for (int64_t j = 0; j < K; j++) sum += (w[j] = std::exp(load_f(lg, ids[j], is_bf16) - mx));
  for (int64_t j = 0; j < K; j++) w[j] = rnd(w[j] / sum, is_bf16);
  for (int64_t a = 1; a < K; a++)  // increasing expert id: the module's accumulation order
    for (int64_t b = a; b > 0 && ids[b] < ids[b - 1]; b--) std::swap(ids[b], ids[b - 1]), std::swap(w[b], w[b - 1]);
  std::fill(acc, acc + H, 0.f);
  const int64_t Gh = H / 32, Gi = I / 32;
  for (int64_t j = 0; j < K; j++) {
    const int64_t e = ids[j];
    if (d->lin) {  // gate into gu[0, I), up into gu[I, 2I)
      const LinearDesc* two[2] = {d->lin[3 * e], d->lin[3 * e + 1]};
      void* outs[2] = {gu, static_cast<char*>(gu) + I * esz};
      if (ember_linear_many(2, two, h, outs, 1, is_bf16, nthreads) != 2) return 0;
    } else if (!ember_mxfp4(d->gu_blocks + e * 2 * I * Gh * 16, d->gu_scales + e * 2 * I * Gh, h, is_bf16, gu,
                            is_bf16, 1, 2 * I, H, static_cast<int>(d->act_q8), nthreads)) {
      return 0;
    }
    for (int64_t c = 0; c < I; c++) {
      const int64_t gi = d->lin ? c : 2 * c, ui = d->lin ? I + c : 2 * c + 1;  // the bias: interleaved in both
      float g = rnd(load_f(gu, gi, is_bf16) + load_f(d->gu_bias, e * 2 * I + 2 * c, is_bf16), is_bf16);
      float u = rnd(load_f(gu, ui, is_bf16) + load_f(d->gu_bias, e * 2 * I + 2 * c + 1, is_bf16), is_bf16);
      gf[c] = std::min(g, d->limit);
      uf[c] = std::min(std::max(u, -d->limit), d->limit);
    }
    clamped_swiglu(gf, uf, act, I, d->alpha, is_bf16);
    if (d->lin ? !ember_linear(d->lin[3 * e + 2], act, y, 1, is_bf16, nthreads)
               : !ember_mxfp4(d->dn_blocks + e * H * Gi * 16, d->dn_scales + e * H * Gi, act, is_bf16, y, is_bf16, 1,
                              H, I, static_cast<int>(d->act_q8), nthreads))
      return 0;
    add_expert(acc, y, static_cast<const char*>(d->dn_bias) + e * H * esz, w[j], H, is_bf16);
  }
  for (int64_t c = 0; c < H; c++) store_y(x, c, load_f(x, c, is_bf16) + acc[c], is_bf16);
  return 1;
}

}  // extern "C"

// gpt-oss's attention (ember.models.gpt_oss.SinkAttention after its RMSNorm): grouped-query attention with q/k/v/o
// biases (bound in the projections' LinearDesc) and one learned logit per head (sinks) that joins each softmax as
// a key without a value. Sliding layers keep a ring of `window` slots (ember.cache.SlidingWindowKV: the token at
// position p in slot p % window); full layers the whole cache.
struct SinkAttnDesc {
  const LinearDesc* q;
  const LinearDesc* k;
  const LinearDesc* v;
  const LinearDesc* o;
  const void* norm;   // input RMSNorm weight (H,)
  const void* sinks;  // (nh,), x's dtype
  int64_t H, nh, nkv, hd, window;
  float eps;
};

extern "C" {
void ember_rope(void* X, const void* Cos, const void* Sin, int64_t n_rows, int64_t heads, int64_t hd, int is_bf16);

// x (H,) += o(sink_attention(rope(q/k/v(rms_norm(x))))) for the token at position pos, its k/v written into
// Kc/Vc (nkv, slots, hd): at slot pos of a full cache, or pos % window of a ring (slots == window). Scores and
// softmax in fp32 (the sink's logit included in the max and the sum), the output rounded once to the dtype.
// Returns 0 (nothing done) where a projection refuses x's dtype or pos is past a full cache.
int ember_sink_attn_block(const SinkAttnDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                          int64_t slots, int64_t pos, int is_bf16, int nthreads) {
  const int64_t H = d->H, nh = d->nh, nkv = d->nkv, hd = d->hd, esz = is_bf16 ? 2 : 4;
  const bool ring = d->window > 0 && slots == d->window;
  if (hd % 2 || hd > 512 || nh % nkv || (!ring && pos >= slots)) return 0;
  const int64_t slot = ring ? pos % slots : pos, S = ring ? std::min(pos + 1, slots) : pos + 1;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>((2 * H + 2 * nh * hd + 2 * nkv * hd) * esz / 4 + nh * (S + hd) + 16));
  float* scratch = buf.data();  // (nh, S) scores, then (nh, hd) sums
  char* base = reinterpret_cast<char*>(scratch + nh * (S + hd));
  void* h = base;
  void* q = base + H * esz;
  void* k = base + (H + nh * hd) * esz;
  void* v = base + (H + nh * hd + nkv * hd) * esz;
  void* a = base + (H + nh * hd + 2 * nkv * hd) * esz;
  void* o = base + (H + 2 * nh * hd + 2 * nkv * hd) * esz;
  ember_rms_norm(x, d->norm, h, 1, H, d->eps, is_bf16, 1);
  const LinearDesc* qkv[3] = {d->q, d->k, d->v};
  void* outs[3] = {q, k, v};
  if (ember_linear_many(3, qkv, h, outs, 1, is_bf16, nthreads) != 3) return 0;
  ember_rope(q, cos, sin, 1, nh, hd, is_bf16);
  ember_rope(k, cos, sin, 1, nkv, hd, is_bf16);
  for (int64_t g = 0; g < nkv; g++) {
    std::memcpy(static_cast<char*>(Kc) + (g * slots + slot) * hd * esz, static_cast<char*>(k) + g * hd * esz, hd * esz);
    std::memcpy(static_cast<char*>(Vc) + (g * slots + slot) * hd * esz, static_cast<char*>(v) + g * hd * esz, hd * esz);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t rep = nh / nkv;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nh * S * hd > 65536)
  for (int64_t n = 0; n < nh; n++) {
    const int64_t g = n / rep;
    float* sc = scratch + n * S;
    float* acc = scratch + nh * S + n * hd;
    float qf[512];
    for (int64_t c = 0; c < hd && c < 512; c++) qf[c] = load_f(q, n * hd + c, is_bf16);
    const float sink = load_f(d->sinks, n, is_bf16);
    float mx = sink;
    for (int64_t j = 0; j < S; j++) mx = std::max(mx, sc[j] = dot_q(qf, Kc, (g * slots + j) * hd, hd, is_bf16) * scale);
    float sum = std::exp(sink - mx);
    std::fill(acc, acc + hd, 0.f);
    for (int64_t j = 0; j < S; j++) {
      const float p = std::exp(sc[j] - mx);
      sum += p;
      axpy_v(acc, p, Vc, (g * slots + j) * hd, hd, is_bf16);
    }
    for (int64_t c = 0; c < hd; c++) store_y(a, n * hd + c, acc[c] / sum, is_bf16);
  }
  if (!ember_linear(d->o, a, o, 1, is_bf16, nthreads)) return 0;
  for (int64_t c = 0; c < H; c++) store_y(x, c, load_f(x, c, is_bf16) + load_f(o, c, is_bf16), is_bf16);
  return 1;
}

}  // extern "C"
