// Attention pieces of ember_attn_block's variants that ember_attn_decode does not compute.
//
// Gemma 2's soft-capped logits (ember.models.gemma.softcapped_attention for one query): per head the scores
// q . k (rounded to the dtype), times the scale, / cap, tanh, * cap (each rounded), softmax in fp32 rounded to
// the dtype, then the probability-weighted sum of the values (fp32, rounded once).
#include "common.h"
#include "vec.h"

using namespace ember_common;
using namespace ember_vec;

namespace {

template <typename T>
void softcap_heads(const T* q, const T* K, const T* V, T* out, int64_t nh, int64_t nkv, int64_t hd, int64_t hs,
                   int64_t S, float scale, float cap, int nthreads) {
  thread_local std::vector<float> buf;  // per head: scores (S), the query (hd), the output sums (hd)
  buf.resize(static_cast<size_t>(nh * (S + 2 * hd)));
  const T tag{};
  const int64_t rep = nh / nkv;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nh * S * hd > 65536)
  for (int64_t n = 0; n < nh; n++) {
    float* sc = buf.data() + n * (S + 2 * hd);
    float* qf = sc + S;
    float* acc = qf + hd;
    const T* k = K + (n / rep) * hs;
    const T* v = V + (n / rep) * hs;
    for (int64_t c = 0; c < hd; c++) qf[c] = to_f(q[n * hd + c]);
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
      float s = round_as(round_as(dot(qf, k + j * hd, hd), tag) * scale, tag);
      s = round_as(round_as(std::tanh(round_as(s / cap, tag)), tag) * cap, tag);
      mx = std::max(mx, sc[j] = s);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < S; j++) sum += (sc[j] = std::exp(sc[j] - mx));
    std::fill(acc, acc + hd, 0.f);
    for (int64_t j = 0; j < S; j++) axpy(acc, round_as(sc[j] / sum, tag), v + j * hd, hd);
    for (int64_t c = 0; c < hd; c++) put(out + n * hd + c, acc[c]);
  }
}

}  // namespace

extern "C" {

// out (nh * hd) = soft-capped attention of q (nh * hd) over S slots of K/V: head g's slots at K + g * hs (as
// stored, hd apart), query head n reading kv head n / (nh / nkv).
void ember_softcap_attn(const void* q, const void* K, const void* V, void* out, int64_t nh, int64_t nkv, int64_t hd,
                        int64_t hs, int64_t S, float scale, float cap, int is_bf16, int nthreads) {
  if (is_bf16)
    softcap_heads(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(K), static_cast<const uint16_t*>(V),
                  static_cast<uint16_t*>(out), nh, nkv, hd, hs, S, scale, cap, nthreads);
  else
    softcap_heads(static_cast<const float*>(q), static_cast<const float*>(K), static_cast<const float*>(V),
                  static_cast<float*>(out), nh, nkv, hd, hs, S, scale, cap, nthreads);
}

}  // extern "C"
