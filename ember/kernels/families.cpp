// Decode blocks of the families whose pieces differ from Llama's (one token of one sequence, the residual add
// included), built from the same kernels as cpu.cpp's blocks and rounded where the modules round.
//
// gpt-oss's mixture of experts (ember.models.gpt_oss.GptOssMLP over ember.quant.mxfp4.Mxfp4Experts): the
// router (a Linear with bias) picks the k largest logits, a softmax over those k weighs them; each chosen expert
// multiplies its MXFP4 blocks as stored (ember_mxfp4), adds its bias and applies the clamped SwiGLU of its
// interleaved gate/up columns: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
#include "common.h"

using namespace ember_common;

struct LinearDesc;  // cpu.cpp

extern "C" {
int ember_linear(const LinearDesc* d, const void* X, void* Y, int64_t M, int x_bf16, int nthreads);
void ember_rms_norm(const void* X, const void* Wt, void* Out, int64_t rows, int64_t H, float eps, int is_bf16,
                    int nthreads);
int ember_mxfp4(const uint8_t* blocks, const uint8_t* scales, const void* X, int x_bf16, void* Y, int y_bf16,
                int64_t M, int64_t O, int64_t I, int act_q8, int nthreads);
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
  int64_t H, E, k, I, act_q8;
  float eps, alpha, limit;
};

namespace {

inline float rnd(float v, int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

thread_local std::vector<float> moe_buf;

}  // namespace

extern "C" {

// x (H,) += GptOssMLP(rms_norm(x)) with the roundings of the module path in x's dtype: each product, bias add and
// elementwise op rounded; the chosen experts' weighted outputs added to a zero sum in increasing expert id (the
// module's index_add_ order), then the residual add. Returns 0 (nothing done) where a product is refused.
int ember_gptoss_moe_block(const GptOssMoeDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, E = d->E, K = d->k, I = d->I, esz = is_bf16 ? 2 : 4;
  if (K > E || K > 64 || E > 1024 || H % 32 || I % 32) return 0;
  // fp32 (H acc) then dtype-sized: h (H), logits (E), gate/up (2I), act (I), y (H)
  moe_buf.resize(static_cast<size_t>(H + (2 * H + E + 3 * I) * esz / 4 + 16));
  float* acc = moe_buf.data();
  char* base = reinterpret_cast<char*>(acc + H);
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
    if (!ember_mxfp4(d->gu_blocks + e * 2 * I * Gh * 16, d->gu_scales + e * 2 * I * Gh, h, is_bf16, gu, is_bf16, 1,
                     2 * I, H, static_cast<int>(d->act_q8), nthreads))
      return 0;
    for (int64_t c = 0; c < I; c++) {
      float g = rnd(load_f(gu, 2 * c, is_bf16) + load_f(d->gu_bias, e * 2 * I + 2 * c, is_bf16), is_bf16);
      float u = rnd(load_f(gu, 2 * c + 1, is_bf16) + load_f(d->gu_bias, e * 2 * I + 2 * c + 1, is_bf16), is_bf16);
      g = std::min(g, d->limit);
      u = std::min(std::max(u, -d->limit), d->limit);
      const float t = rnd(g * d->alpha, is_bf16);
      const float s = rnd(1.f / (1.f + std::exp(-t)), is_bf16);
      store_y(act, c, rnd(rnd(u + 1.f, is_bf16) * rnd(g * s, is_bf16), is_bf16), is_bf16);
    }
    if (!ember_mxfp4(d->dn_blocks + e * H * Gi * 16, d->dn_scales + e * H * Gi, act, is_bf16, y, is_bf16, 1, H, I,
                     static_cast<int>(d->act_q8), nthreads))
      return 0;
    for (int64_t c = 0; c < H; c++) {
      const float v = rnd(load_f(y, c, is_bf16) + load_f(d->dn_bias, e * H + c, is_bf16), is_bf16);
      acc[c] = rnd(acc[c] + rnd(v * w[j], is_bf16), is_bf16);
    }
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
int ember_linear_many(int n, const LinearDesc* const* d, const void* X, void* const* Y, int64_t M, int x_bf16,
                      int nthreads);
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
    for (int64_t j = 0; j < S; j++) {
      const int64_t off = (g * slots + j) * hd;
      float dot = 0.f;
      for (int64_t c = 0; c < hd; c++) dot += qf[c] * load_f(Kc, off + c, is_bf16);
      mx = std::max(mx, sc[j] = dot * scale);
    }
    float sum = std::exp(sink - mx);
    std::fill(acc, acc + hd, 0.f);
    for (int64_t j = 0; j < S; j++) {
      const float p = std::exp(sc[j] - mx);
      sum += p;
      const int64_t off = (g * slots + j) * hd;
      for (int64_t c = 0; c < hd; c++) acc[c] += p * load_f(Vc, off + c, is_bf16);
    }
    for (int64_t c = 0; c < hd; c++) store_y(a, n * hd + c, acc[c] / sum, is_bf16);
  }
  if (!ember_linear(d->o, a, o, 1, is_bf16, nthreads)) return 0;
  for (int64_t c = 0; c < H; c++) store_y(x, c, load_f(x, c, is_bf16) + load_f(o, c, is_bf16), is_bf16);
  return 1;
}

}  // extern "C"
