// Decode steps of several rows (speculative verification passes).
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_linear.h"
#include "cpu_norms.h"

// ============================================================================ decode steps of several rows
// A speculative verification pass of one sequence: rows r = 0..T-1 are tokens at slots pos + r, row r attending
// to slots 0..pos + r. Each row gets the bits ember_decode_layers gives that token alone (ember_linear_rows,
// per-row norms, RoPE and attention), while each weight streams from memory once for all rows.
namespace {

thread_local std::vector<float> rows_buf;

template <typename T>
void add_all_rows(void* x, const void* y, int64_t n) {
  add_rows(static_cast<T*>(x), static_cast<const T*>(y), n);
}

// x (T, H) += o_proj(attention(...)) for each row, as ember_attn_block for that row alone.
// Gemma's variants as the one-row block: norm_offset, post_norm, v_norm, the scale, soft-capped logits; RoPE from
// tables of cs values a row (cs = 2 * table width where the step passes two: a layer with local_rope reads the
// second, at d->hd, as the one-row block does).
int attn_block_rows(const AttnBlockDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                    int64_t max_len, int64_t pos, int64_t T, int is_bf16, int nthreads, int64_t cs) {
  if (d->hd % 2) return 0;
  const int64_t H = d->H, nq = d->nh * d->hd, nk = d->nkv * d->hd, hd = d->hd, esz = is_bf16 ? 2 : 4;
  rows_buf.resize(static_cast<size_t>(T * (H + 2 * nq + 2 * nk + H) * esz / 4 + 8));
  char* base = reinterpret_cast<char*>(rows_buf.data());
  char* h = base;
  char* q = h + T * H * esz;
  char* k = q + T * nq * esz;
  char* v = k + T * nk * esz;
  char* a = v + T * nk * esz;
  char* o = a + T * nq * esz;
  norm_rows(x, d->norm, h, T, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* qkv[3] = {d->q, d->k, d->v};
  void* qkv_out[3] = {q, k, v};
  if (!ember_linear_rows(3, qkv, h, qkv_out, T, is_bf16, nthreads)) return 0;
  if (d->q_norm) {  // per head, or over each row's whole projection (qk_full)
    norm_rows(q, d->q_norm, q, d->qk_full ? T : T * d->nh, d->qk_full ? nq : hd, d->qk_eps, d->norm_offset, is_bf16);
    norm_rows(k, d->k_norm, k, d->qk_full ? T : T * d->nkv, d->qk_full ? nk : hd, d->qk_eps, d->norm_offset, is_bf16);
  }
  if (d->v_norm) {
    if (is_bf16) rms_unweighted_rows(reinterpret_cast<uint16_t*>(v), T * d->nkv, hd, d->qk_eps);
    else rms_unweighted_rows(reinterpret_cast<float*>(v), T * d->nkv, hd, d->qk_eps);
  }
  if (d->rot > 0 && d->rot < hd) {  // partial RoPE: the first rot channels of each head, tables (T, rot)
    for (int64_t r = 0; r < T; r++)
      for (int64_t n = 0; n < d->nh + d->nkv; n++)
        ember_rope(n < d->nh ? q + (r * nq + n * hd) * esz : k + (r * nk + (n - d->nh) * hd) * esz,
                   static_cast<const char*>(cos) + r * d->rot * esz, static_cast<const char*>(sin) + r * d->rot * esz,
                   1, 1, d->rot, is_bf16);
  } else if (cs == hd && !d->local_rope) {
    ember_rope(q, cos, sin, T, d->nh, hd, is_bf16);
    ember_rope(k, cos, sin, T, d->nkv, hd, is_bf16);
  } else {
    const int64_t off = d->local_rope ? hd : 0;
    for (int64_t r = 0; r < T; r++) {
      const char* c = static_cast<const char*>(cos) + (r * cs + off) * esz;
      const char* sn = static_cast<const char*>(sin) + (r * cs + off) * esz;
      ember_rope(q + r * nq * esz, c, sn, 1, d->nh, hd, is_bf16);
      ember_rope(k + r * nk * esz, c, sn, 1, d->nkv, hd, is_bf16);
    }
  }
  for (int64_t r = 0; r < T; r++)
    for (int64_t g = 0; g < d->nkv; g++) {
      const int64_t slot = (g * max_len + pos + r) * hd * esz, src = (r * nk + g * hd) * esz;
      std::memcpy(static_cast<char*>(Kc) + slot, k + src, hd * esz);
      std::memcpy(static_cast<char*>(Vc) + slot, v + src, hd * esz);
    }
  const int64_t hs = max_len * hd;
  const float scale = d->scale > 0.f ? d->scale : 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t r = 0; r < T; r++) {
    if (d->softcap > 0.f)
      ember_softcap_attn(q + r * nq * esz, Kc, Vc, a + r * nq * esz, d->nh, d->nkv, hd, hs, pos + r + 1, scale,
                         d->softcap, is_bf16, nthreads);
    else if (!ember_attn_decode(q + r * nq * esz, Kc, Vc, a + r * nq * esz, 1, d->nh, d->nkv, hd, pos + r + 1,
                                d->nkv * hs, hs, hd, d->nkv * hs, hs, hd, nullptr, 0, 0, scale, is_bf16, nthreads))
      return 0;
  }
  const LinearDesc* od[1] = {d->o};
  void* oo[1] = {o};
  if (!ember_linear_rows(1, od, a, oo, T, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(o, d->post_norm, o, T, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_all_rows<uint16_t>(x, o, T * H);
  else add_all_rows<float>(x, o, T * H);
  return 1;
}

// x (T, H) += down(silu(gate(h)) * up(h)) for each row, as ember_mlp_block for that row alone (Gemma's GeGLU,
// norm_offset, post_norm and layer scalar too).
int mlp_block_rows(const MlpBlockDesc* d, void* x, int64_t T, int is_bf16, int nthreads) {
  const int64_t H = d->H, F = d->F, esz = is_bf16 ? 2 : 4;
  rows_buf.resize(static_cast<size_t>(T * (2 * H + 2 * F) * esz / 4 + 8));
  char* h = reinterpret_cast<char*>(rows_buf.data());
  char* g = h + T * H * esz;
  char* u = g + T * F * esz;
  char* y = u + T * F * esz;
  if (d->act == 2) return 0;  // Nemotron-H's relu^2: one row at a time
  norm_rows(x, d->norm, h, T, H, d->eps, d->norm_offset, is_bf16);
  const LinearDesc* gu[2] = {d->gate, d->up};
  void* outs[2] = {g, u};
  if (!ember_linear_rows(2, gu, h, outs, T, is_bf16, nthreads)) return 0;
  if (d->act == 1 && is_bf16) gelu_tanh_mul(reinterpret_cast<uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), T * F);
  else if (d->act == 1) gelu_tanh_mul(reinterpret_cast<float*>(g), reinterpret_cast<const float*>(u), T * F);
  else if (is_bf16) silu_mul(reinterpret_cast<uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), T * F);
  else silu_mul(reinterpret_cast<float*>(g), reinterpret_cast<const float*>(u), T * F);
  const LinearDesc* dd[1] = {d->down};
  void* yy[1] = {y};
  if (!ember_linear_rows(1, dd, g, yy, T, is_bf16, nthreads)) return 0;
  if (d->post_norm) norm_rows(y, d->post_norm, y, T, H, d->eps, d->norm_offset, is_bf16);
  if (is_bf16) add_all_rows<uint16_t>(x, y, T * H);
  else add_all_rows<float>(x, y, T * H);
  if (d->out_scale) {  // x * layer_scalar, rounded to the dtype
    const float sc = load_f(d->out_scale, 0, is_bf16);
    for (int64_t i = 0; i < T * H; i++) store_y(x, i, load_f(x, i, is_bf16) * sc, is_bf16);
  }
  return 1;
}

}  // namespace

extern "C" {

// ember_decode_layers for T rows of one sequence (a verification pass): x (T, H) at slots pos..pos+T-1, cos/sin
// (T, cs) (cs 0: each layer's hd; else the width of a row's tables, two where the step passes two), logits (T, V),
// the head's norm offset and final-logit cap as ember_decode_layers_gemma's. Every row's result has the bits ember_decode_layers gives it alone. A mixture of
// experts runs ember_moe_block row by row (each row routes its own way). Returns 2 * n + 1 when the logits were
// written, else 0: the caller then runs the pass as its modules (the cache slots written are rewritten there).
int ember_decode_rows_v(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        int64_t T, int64_t cs, const void* norm, float eps, int64_t norm_offset, float cap,
                        const LinearDesc* head, void* logits, int is_bf16, int nthreads) {
  if (!head || T < 1) return 0;
  const int64_t esz = is_bf16 ? 2 : 4;
  for (int i = 0; i < n; i++) {
    const LayerStepDesc& s = layers[i];
    if (s.mla) return 0;  // latent attention: one row at a time only
    const int64_t H = s.attn->H;
    if (pos + T > s.max_len ||
        !attn_block_rows(s.attn, x, cos, sin, s.Kc, s.Vc, s.max_len, pos, T, is_bf16, nthreads, cs ? cs : s.attn->hd))
      return 0;
    if (s.moe) {
      for (int64_t r = 0; r < T; r++)
        if (!ember_moe_block(static_cast<const MoeBlockDesc*>(s.mlp), static_cast<char*>(x) + r * H * esz, is_bf16,
                             nthreads))
          return 0;
    } else if (!mlp_block_rows(static_cast<const MlpBlockDesc*>(s.mlp), x, T, is_bf16, nthreads)) {
      return 0;
    }
  }
  thread_local std::vector<float> h;
  h.resize(static_cast<size_t>(T * head->I));
  norm_rows(x, norm, h.data(), T, head->I, eps, norm_offset, is_bf16);
  const LinearDesc* hd[1] = {head};
  void* out[1] = {logits};
  if (!ember_linear_rows(1, hd, h.data(), out, T, is_bf16, nthreads)) return 0;
  if (cap > 0.f) {
    if (is_bf16) softcap_values(static_cast<uint16_t*>(logits), T * head->O, cap);
    else softcap_values(static_cast<float*>(logits), T * head->O, cap);
  }
  return 2 * n + 1;
}

// ember_decode_rows_v with (T, hd) tables and Llama's head.
int ember_decode_rows(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                      int64_t T, const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                      int nthreads) {
  return ember_decode_rows_v(layers, n, x, cos, sin, pos, T, 0, norm, eps, 0, 0.f, head, logits, is_bf16, nthreads);
}

}  // extern "C"
