// Decoder blocks for one token: attention, MLP and mixture-of-experts blocks, every layer of a step in one call.
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_linear.h"
#include "cpu_norms.h"

// ============================================================================ decoder blocks for one token

namespace {

thread_local std::vector<float> block_buf;

}  // namespace
extern "C" {

// x (H,) += o_proj(attention(rope(q/k/v(rms_norm(x))))) for the token at slot pos, its k/v written into the
// caches Kc/Vc (nkv, max_len, hd) at pos (a sliding layer's ring of window slots: at pos % window); cos/sin (hd,)
// of its position ((2, hd): global then local, for a block with local_rope). With the AttnBlockDesc's Gemma
// fields: (1 + w) norms, post_norm on the output, the window's keys only, its own scale. Returns 0 (nothing done) where a projection has no kernel for x's dtype.
int ember_attn_block(const AttnBlockDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                     int64_t max_len, int64_t pos, int is_bf16, int nthreads) {
  // a sliding layer's ring (ember.cache.SlidingWindowKV): max_len == window slots, the token at p in slot p % window
  const bool ring = d->window > 0 && max_len == d->window;
  if (d->hd % 2 || (!ring && pos >= max_len)) return 0;  // rope's halves; a full cache's end
  const int64_t slot = ring ? pos % max_len : pos;
  const int64_t H = d->H, nq = d->nh * d->hd, nk = d->nkv * d->hd, esz = is_bf16 ? 2 : 4;
  block_buf.resize(static_cast<size_t>((H + 2 * nq + 2 * nk + H) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(block_buf.data());
  void* h = base;
  void* q = base + H * esz;
  void* k = base + (H + nq) * esz;
  void* v = base + (H + nq + nk) * esz;
  void* a = base + (H + nq + 2 * nk) * esz;
  void* o = base + (H + 2 * nq + 2 * nk) * esz;
  norm_rows(x, d->norm, h, 1, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* qkv[3] = {d->q, d->k, d->v};
  void* qkv_out[3] = {q, k, v};
  if (ember_linear_many(3, qkv, h, qkv_out, 1, is_bf16, nthreads) != 3) return 0;
  if (d->q_norm) {  // row by row: in place is safe
    norm_rows(q, d->q_norm, q, d->qk_full ? 1 : d->nh, d->qk_full ? nq : d->hd, d->qk_eps, d->norm_offset, is_bf16);
    norm_rows(k, d->k_norm, k, d->qk_full ? 1 : d->nkv, d->qk_full ? nk : d->hd, d->qk_eps, d->norm_offset, is_bf16);
  }
  if (d->v_norm) {
    if (is_bf16) rms_unweighted_rows(static_cast<uint16_t*>(v), d->nkv, d->hd, d->qk_eps);
    else rms_unweighted_rows(static_cast<float*>(v), d->nkv, d->hd, d->qk_eps);
  }
  if (d->local_rope) {  // the second row of the (2, hd) tables
    cos = static_cast<const char*>(cos) + d->hd * esz;
    sin = static_cast<const char*>(sin) + d->hd * esz;
  }
  if (d->rot > 0 && d->rot < d->hd) {  // the first rot channels of each head turn, the rest pass
    for (int64_t n = 0; n < d->nh + d->nkv; n++)
      ember_rope(n < d->nh ? static_cast<char*>(q) + n * d->hd * esz : static_cast<char*>(k) + (n - d->nh) * d->hd * esz,
                 cos, sin, 1, 1, d->rot, is_bf16);
  } else {
    ember_rope(q, cos, sin, 1, d->nh, d->hd, is_bf16);
    ember_rope(k, cos, sin, 1, d->nkv, d->hd, is_bf16);
  }
  for (int64_t g = 0; g < d->nkv; g++) {
    std::memcpy(static_cast<char*>(Kc) + (g * max_len + slot) * d->hd * esz, static_cast<char*>(k) + g * d->hd * esz,
                d->hd * esz);
    std::memcpy(static_cast<char*>(Vc) + (g * max_len + slot) * d->hd * esz, static_cast<char*>(v) + g * d->hd * esz,
                d->hd * esz);
  }
  const int64_t hs = max_len * d->hd;
  // a sliding window sees positions pos - window + 1 .. pos (HF's mask: query - key < window): in a full cache
  // those slots, in a ring its first min(pos + 1, window) slots (in ring order; the softmax does not mind)
  const int64_t s0 = !ring && d->window > 0 ? std::max<int64_t>(0, pos - d->window + 1) : 0;
  const int64_t n_keys = ring ? std::min(pos + 1, max_len) : pos + 1 - s0;
  const float scale = d->scale > 0.f ? d->scale : 1.f / std::sqrt(static_cast<float>(d->hd));
  if (d->softcap > 0.f)
    ember_softcap_attn(q, static_cast<const char*>(Kc) + s0 * d->hd * esz,
                       static_cast<const char*>(Vc) + s0 * d->hd * esz, a, d->nh, d->nkv, d->hd, hs, n_keys,
                       scale, d->softcap, is_bf16, nthreads);
  else if (!ember_attn_decode(q, static_cast<const char*>(Kc) + s0 * d->hd * esz, static_cast<const char*>(Vc) + s0 * d->hd * esz,
                         a, 1, d->nh, d->nkv, d->hd, n_keys, d->nkv * hs, hs, d->hd, d->nkv * hs, hs, d->hd,
                         nullptr, 0, 0, scale, is_bf16, nthreads))
    return 0;
  if (!ember_linear(d->o, a, o, 1, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(o, d->post_norm, o, 1, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_rows(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(o), H);
  else add_rows(static_cast<float*>(x), static_cast<const float*>(o), H);
  return 1;
}

// x (H,) += down(silu(gate(h)) * up(h)), h = rms_norm(x); silu and the product each rounded to the dtype.
// Gemma (act 1, norm_offset, post_norm): x += post_norm(down(gelu_tanh(gate(h)) * up(h))), (1 + w) norms.
int ember_mlp_block(const MlpBlockDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, esz = is_bf16 ? 2 : 4;
  block_buf.resize(static_cast<size_t>((2 * H + 2 * F) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(block_buf.data());
  void* h = base;
  void* g = base + H * esz;
  void* u = base + (H + F) * esz;
  void* y = base + (H + 2 * F) * esz;
  norm_rows(x, d->norm, h, 1, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* gu[2] = {d->gate, d->up};
  void* outs[2] = {g, u};
  if (d->act == 2) {  // g = relu(up(h))^2: the relu exact, the square rounded
    if (!ember_linear(d->up, h, g, 1, is_bf16, nthreads)) return 0;
    for (int64_t i = 0; i < F; i++) {
      const float v = std::max(load_f(g, i, is_bf16), 0.f);
      store_y(g, i, v * v, is_bf16);
    }
  } else {
    if (ember_linear_many(2, gu, h, outs, 1, is_bf16, nthreads) != 2) return 0;
    if (d->act == 1 && is_bf16) gelu_tanh_mul(static_cast<uint16_t*>(g), static_cast<const uint16_t*>(u), F);
    else if (d->act == 1) gelu_tanh_mul(static_cast<float*>(g), static_cast<const float*>(u), F);
    else if (is_bf16) silu_mul(static_cast<uint16_t*>(g), static_cast<const uint16_t*>(u), F);
    else silu_mul(static_cast<float*>(g), static_cast<const float*>(u), F);
  }
  if (!ember_linear(d->down, g, y, 1, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(y, d->post_norm, y, 1, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_rows(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(y), H);
  else add_rows(static_cast<float*>(x), static_cast<const float*>(y), H);
  if (d->out_scale) {  // x * layer_scalar, rounded to the dtype
    const float sc = load_f(d->out_scale, 0, is_bf16);
    for (int64_t i = 0; i < H; i++) store_y(x, i, load_f(x, i, is_bf16) * sc, is_bf16);
  }
  return 1;
}

}  // extern "C"

namespace {

// The experts and weights of the sigmoid group-limited router (MoeBlockDesc's comment) for h (H,) of the dtype.
bool route_sigmoid_groups(const MoeBlockDesc* d, const void* h, int is_bf16, int nthreads, int64_t* ids, float* w) {
  const int64_t H = d->H, E = d->E, K = d->k, G = d->n_group, per = G > 0 ? E / G : 0;
  if (G < 1 || E % G || per < 2 || d->topk_group > G || K > d->topk_group * per || E > 512) return false;
  thread_local std::vector<float> f;
  f.resize(static_cast<size_t>(H + 2 * E));
  float* s = f.data() + H;
  if (d->sigmoid_router == 2) {  // MiniMax-M2: a router of x's dtype, its logits rounded to it
    if (!ember_linear(d->router, h, s + E, 1, is_bf16, nthreads)) return false;
    for (int64_t e = 0; e < E; e++) s[e] = load_f(s + E, e, is_bf16);
  } else {
    for (int64_t i = 0; i < H; i++) f[i] = load_f(h, i, is_bf16);
    if (!ember_linear(d->router, f.data(), s, 1, 0, nthreads)) return false;
  }
  float choice[512], gscore[512];
  for (int64_t e = 0; e < E; e++) {
    s[e] = 1.f / (1.f + std::exp(-s[e]));
    choice[e] = s[e] + d->correction[e];
  }
  for (int64_t g = 0; g < G; g++) {  // the sum of the group's two best
    float a = -INFINITY, b = -INFINITY;
    for (int64_t e = g * per; e < (g + 1) * per; e++) {
      if (choice[e] > a) b = a, a = choice[e];
      else if (choice[e] > b) b = choice[e];
    }
    gscore[g] = a + b;
  }
  bool keep[512] = {}, taken[512] = {};
  for (int64_t t = 0; t < d->topk_group; t++) {
    int64_t best = -1;
    for (int64_t g = 0; g < G; g++)
      if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
    keep[best] = true;
  }
  float wsum = 0.f;
  for (int64_t j = 0; j < K; j++) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (keep[e / per] && !taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
    taken[best] = true;
    ids[j] = best;
    wsum += (w[j] = s[best]);
  }
  for (int64_t j = 0; j < K; j++) w[j] = (d->norm_topk ? w[j] / (wsum + 1e-20f) : w[j]) * d->scaling;
  return true;
}

// Y[i] (O_i,) = X[i] (I,) @ W_i^T for n weights, each with its own activation row (the down projections of a
// token's experts): one parallel region where all are dense of X's dtype or GGUF blocks of one type (the bits of
// ember_linear at one row), else one ember_linear each. Returns 0 where a weight has no kernel for X's dtype.
int linear_each(int n, const LinearDesc* const* d, const void* const* X, void* const* Y, int x_bf16,
                int nthreads) {
  if (n > 1 && n <= kMaxJobs && dense_row_group(n, d, x_bf16)) {
    auto run = [&](auto t) {
      using T = decltype(t);
      DenseRowJob<T> jobs[kMaxJobs];
      for (int i = 0; i < n; i++)
        jobs[i] = {static_cast<const T*>(d[i]->W), d[i]->O, Y[i], static_cast<const T*>(X[i])};
      dense_row_jobs(jobs, n, static_cast<const T*>(X[0]), d[0]->I, x_bf16, nthreads);
    };
    if (x_bf16) run(uint16_t{});
    else run(float{});
    for (int i = 0; i < n; i++) add_bias(d[i], Y[i], 1, x_bf16);
    return 1;
  }
  if (gguf_row_jobs(n, d, X, Y, x_bf16, nthreads)) return 1;
  for (int i = 0; i < n; i++)
    if (!ember_linear(d[i], X[i], Y[i], 1, x_bf16, nthreads)) return 0;
  return 1;
}

}  // namespace

extern "C" {

// x (H,) += the mixture of experts' output for h = rms_norm(x), routed as SparseMoE.route: softmax of the
// router's logits (rounded to the dtype) in fp32, the top k (ties to the lower index), renormalised when
// norm_topk; each chosen expert's SwiGLU output (as ember_mlp_block, without the add) weighted in fp32, the sum
// rounded once, then the residual add. Returns 0 (nothing done) where a kernel refuses x's dtype.
int ember_moe_block(const MoeBlockDesc* d, void* x, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, E = d->E, K = d->k, esz = is_bf16 ? 2 : 4;
  if (K > E || K > 64) return 0;
  block_buf.resize(static_cast<size_t>(((K + 1) * H + 2 * K * F + E) * esz / 4 + H + 16));
  float* acc = block_buf.data();  // (H,) fp32
  char* base = reinterpret_cast<char*>(acc + H);
  void* h = base;
  char* gu = base + H * esz;  // (K, 2, F): each chosen expert's gate and up outputs
  char* y = base + (H + 2 * K * F) * esz;  // (K, H): each chosen expert's down output
  void* lg = base + ((K + 1) * H + 2 * K * F) * esz;
  ember_rms_norm(x, d->norm, h, 1, H, d->eps, is_bf16, 1);
  int64_t ids[64];
  float w[64], wsum = 0.f;
  if (d->sigmoid_router) {
    if (!route_sigmoid_groups(d, h, is_bf16, nthreads, ids, w)) return 0;
  } else {
    if (!ember_linear(d->router, h, lg, 1, is_bf16, nthreads)) return 0;
    float p[512];
    if (E > 512) return 0;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; e++) mx = std::max(mx, p[e] = load_f(lg, e, is_bf16));
    for (int64_t e = 0; e < E; e++) sum += (p[e] = std::exp(p[e] - mx));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    bool taken[512] = {};
    for (int64_t j = 0; j < K; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = true;
      ids[j] = best;
      wsum += (w[j] = p[best]);
    }
    if (d->norm_topk)
      for (int64_t j = 0; j < K; j++) w[j] /= wsum;
  }
  // The chosen experts' gate and up weights and the shared expert's all read h: one ember_linear_many call (one
  // parallel region where the formats allow); then every expert's down projection, the shared one's too, in one
  // linear_each call. GGUF blocks go at most kMaxGgufJobs to a call, in whole experts.
  const int64_t Fs = d->shared[0] ? d->shared_F : 0, ns = d->shared[0] ? 1 : 0, n_exp = K + ns;
  thread_local std::vector<float> sb;  // the shared expert's gate, up (Fs each) and down (H) outputs
  sb.resize(static_cast<size_t>((2 * Fs + H) * esz / 4 + 8));
  char* sg = reinterpret_cast<char*>(sb.data());
  char* sy = sg + 2 * Fs * esz;
  const LinearDesc* ex[65][3];  // expert e's (gate, up, down); the shared expert last
  void* ex_out[65][2];          // its gate and up outputs; down reads the gate's (silu(gate) * up, in place)
  for (int64_t j = 0; j < n_exp; j++) {
    const bool sh = j == K;
    for (int t = 0; t < 3; t++) ex[j][t] = sh ? d->shared[t] : d->experts[3 * ids[j] + t];
    ex_out[j][0] = sh ? sg : gu + 2 * j * F * esz;
    ex_out[j][1] = sh ? sg + Fs * esz : gu + (2 * j + 1) * F * esz;
  }
  const int per = (ex[0][0]->kind == 4 ? kMaxGgufJobs : kMaxJobs) / 2;  // experts per call
  for (int64_t j0 = 0; j0 < n_exp; j0 += per) {
    const int nj = static_cast<int>(std::min<int64_t>(per, n_exp - j0));
    const LinearDesc* gu_desc[kMaxJobs];
    void* gu_out[kMaxJobs];
    for (int j = 0; j < nj; j++)
      for (int t = 0; t < 2; t++) gu_desc[2 * j + t] = ex[j0 + j][t], gu_out[2 * j + t] = ex_out[j0 + j][t];
    if (ember_linear_many(2 * nj, gu_desc, h, gu_out, 1, is_bf16, nthreads) != 2 * nj) return 0;
  }
  const void* dn_in[65];
  void* dn_out[65];
  const LinearDesc* dn_desc[65];
  for (int64_t j = 0; j < n_exp; j++) {
    const int64_t Fj = j == K ? Fs : F;
    if (is_bf16) silu_mul(static_cast<uint16_t*>(ex_out[j][0]), static_cast<const uint16_t*>(ex_out[j][1]), Fj);
    else silu_mul(static_cast<float*>(ex_out[j][0]), static_cast<const float*>(ex_out[j][1]), Fj);
    dn_desc[j] = ex[j][2], dn_in[j] = ex_out[j][0], dn_out[j] = j == K ? sy : y + j * H * esz;
  }
  const int64_t n_dn = Fs == F ? n_exp : K;  // a wider shared expert (n_shared_experts > 1) runs its down alone
  for (int64_t j0 = 0; j0 < n_dn; j0 += 2 * per) {
    const int nj = static_cast<int>(std::min<int64_t>(2 * per, n_dn - j0));
    if (!linear_each(nj, dn_desc + j0, dn_in + j0, dn_out + j0, is_bf16, nthreads)) return 0;
  }
  if (n_dn < n_exp && !ember_linear(dn_desc[K], dn_in[K], sy, 1, is_bf16, nthreads)) return 0;
  // the routed outputs summed in the routing order (fp32), rounded; plus the shared one's, rounded
  std::fill(acc, acc + H, 0.f);
  for (int64_t j = 0; j < K; j++)
    for (int64_t i = 0; i < H; i++) acc[i] += load_f(y + j * H * esz, i, is_bf16) * w[j];
  for (int64_t i = 0; i < H; i++) acc[i] = round_to_dtype(acc[i], is_bf16);
  if (ns)
    for (int64_t i = 0; i < H; i++) acc[i] = round_to_dtype(acc[i] + load_f(sy, i, is_bf16), is_bf16);
  for (int64_t i = 0; i < H; i++) store_y(x, i, load_f(x, i, is_bf16) + acc[i], is_bf16);
  return 1;
}

}  // extern "C"

extern "C" {

// Every layer of one decode step in one call: x (H,) through layers[0..n) in order, as ember_attn_block then
// ember_mlp_block / ember_moe_block each, then (head not null) logits (V,) = head(rms_norm(x, norm)): no Python
// between the blocks (argument conversion, cache lookups) while the other threads wait. Returns how many blocks were applied
// (two a layer), plus one when the logits were written: the caller runs the rest itself, from the first block not
// done (slot pos past a cache's end, a kernel that refused the dtype).
int ember_decode_layers(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                        int nthreads) {
  for (int i = 0; i < n; i++) {
    const LayerStepDesc& s = layers[i];
    // past a full cache the blocks return 0 (a sliding layer's ring never ends)
    const int attn = s.mla ? pos < s.max_len && ember_mla_block(reinterpret_cast<const MlaDesc*>(s.attn), x, cos, sin,
                                                                 s.Kc, s.Vc, s.max_len, pos, is_bf16, nthreads)
                           : ember_attn_block(s.attn, x, cos, sin, s.Kc, s.Vc, s.max_len, pos, is_bf16, nthreads);
    if (!attn) return 2 * i;
    const int done = s.moe ? ember_moe_block(static_cast<const MoeBlockDesc*>(s.mlp), x, is_bf16, nthreads)
                           : ember_mlp_block(static_cast<const MlpBlockDesc*>(s.mlp), x, is_bf16, nthreads);
    if (!done) return 2 * i + 1;
  }
  if (head) {
    thread_local std::vector<float> h;
    h.resize(static_cast<size_t>(head->I));  // room for H values of either dtype
    ember_rms_norm(x, norm, h.data(), 1, head->I, eps, is_bf16, 1);
    if (ember_linear(head, h.data(), logits, 1, is_bf16, nthreads)) return 2 * n + 1;
  }
  return 2 * n;
}

// ember_decode_layers with Gemma's head: the final norm with (1 + w) (norm_offset 1, as norm_rows) and, cap > 0,
// the logits soft-capped in place, cap * tanh(logits / cap), each step rounded to the dtype as HF's Gemma 2 head.
int ember_decode_layers_gemma(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin,
                              int64_t pos, const void* norm, float eps, int64_t norm_offset, float cap,
                              const LinearDesc* head, void* logits, int is_bf16, int nthreads) {
  const int done = ember_decode_layers(layers, n, x, cos, sin, pos, nullptr, eps, nullptr, nullptr, is_bf16, nthreads);
  if (done < 2 * n || !head) return done;
  thread_local std::vector<float> h;
  h.resize(static_cast<size_t>(head->I));
  norm_rows(x, norm, h.data(), 1, head->I, eps, norm_offset, is_bf16);
  if (!ember_linear(head, h.data(), logits, 1, is_bf16, nthreads)) return 2 * n;
  if (cap > 0.f) {
    if (is_bf16)
      softcap_values(static_cast<uint16_t*>(logits), head->O, cap);
    else
      softcap_values(static_cast<float*>(logits), head->O, cap);
  }
  return 2 * n + 1;
}

}  // extern "C"

