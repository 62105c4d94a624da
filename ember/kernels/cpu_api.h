// The C-level surface the units share: the prepared-weight and block descriptors (ctypes mirrors them) and the
// extern "C" functions.
// Cut from the one-file kernels by scripts/split_cpu.py.

#pragma once

#include "common.h"

// Everything about one weight but its activations, filled in once by the Python side (ctypes mirrors this
// struct: keep the two in step), so a decode-time call passes 6 arguments instead of up to 21.
struct LinearDesc {
  int64_t kind;  // 1 dense (w_bf16: bf16 weight with bf16 x, else fp32 with fp32 x), 2 int8, 3 int4/NF4,
                 // 4 GGUF blocks (gguf.cpp: mode = ggml type, group = bytes per row)
  int64_t O, I;
  int64_t w_bf16;
  int64_t amx_min_rows;  // dense bf16: AMX tiles from this many rows (0: never)
  int64_t act_q8;        // int8/4-bit: int8 activations where the build has them
  const void* W;
  const void* bias;  // (O,) or null, added after the product's rounding (y + bias, as PyTorch's add)
  int64_t bias_bf16;
  const float* scales;  // int8: (O,) fp32
  int64_t mode, group;  // 4-bit: as ember_q4
  const void* q_scales;
  const void* q_zeros;
  int64_t stats_bf16;
  const float* absmax;
  const uint8_t* am_code;
  const float* am_dyn;
  const float* am_scale2;
  const float* table;
  float am_offset;
};
// A decode step of one sequence spends more time between its kernels (Python, PyTorch's small ops) than a
// 4-bit model spends streaming weights through some of them. These run a whole pre-norm block in one call,
// from the same kernels and with the same roundings as the modules' own forward: each product, norm and add
// rounded to the model dtype where PyTorch rounds it.
struct AttnBlockDesc {
  const LinearDesc* q;
  const LinearDesc* k;
  const LinearDesc* v;
  const LinearDesc* o;
  const void* norm;    // input RMSNorm weight (H,)
  const void* q_norm;  // (hd,) q/k RMSNorm (Qwen3) or null
  const void* k_norm;
  int64_t H, nh, nkv, hd;
  float eps, qk_eps;
  // Gemma-style variants (all zero for Llama's block): the norms scale by (1 + w) in fp32 with one rounding
  // (norm_offset); the attention output is normed by post_norm before the residual add (sandwich norms);
  // keys older than window slots are hidden (0: none); the rotation uses the second (hd,) row of cos/sin
  // (local_rope: the sliding layers' own RoPE base); scale 0 means 1/sqrt(hd).
  const void* post_norm;
  int64_t norm_offset, window, local_rope;
  float scale;
  // GLM-4.5 / MiniMax-M2 / Gemma 2 (zero: off): RoPE on the first rot channels of each head only (cos/sin (rot,));
  // q_norm/k_norm over all heads' channels at once (qk_full, weights (nh * hd,) and (nkv * hd,)); the logits
  // soft-capped, cap * tanh(logit / cap) (softcap, variants.cpp).
  int64_t rot, qk_full;
  float softcap;
  // Gemma 4 (zero: off): the values normed per head with no weight (x / rms, fp32, one rounding; eps qk_eps).
  int64_t v_norm;
};
struct MlpBlockDesc {
  const LinearDesc* gate;
  const LinearDesc* up;
  const LinearDesc* down;
  const void* norm;  // post-attention RMSNorm weight (H,)
  int64_t H, F;
  float eps;
  // Gemma-style variants (zero for Llama's block): act 1 = tanh-GELU gate (GeGLU) instead of SiLU, act 2 = no
  // gate, relu(up)^2 (Nemotron-H); norm_offset as norm_rows; the MLP output normed by post_norm before the add.
  const void* post_norm;
  int64_t norm_offset, act;
  const void* out_scale;  // Gemma 4's layer_scalar (one value of the dtype) times x after the add, or null
};
struct MoeBlockDesc {
  const LinearDesc* router;          // (E, H)
  const LinearDesc* const* experts;  // E x (gate, up, down)
  const void* norm;                  // post-attention RMSNorm weight (H,)
  int64_t H, E, k, F, norm_topk;
  float eps;
  // GLM-4.5 / DeepSeek-V3 routing (sigmoid_router, else the softmax above): router (E, H) fp32 applied to h in
  // fp32, sigmoid, + correction (E,) fp32 for the choice, the topk_group best of n_group groups (a group scores
  // its two best), top k inside them; weights the uncorrected sigmoids, renormalised (norm_topk), times scaling.
  // shared (gate, up, down) or null: a SwiGLU every token runs, added to the routed sum. sigmoid_router 2
  // (MiniMax-M2): the router of x's dtype applied to h as it is, logits rounded, one group.
  int64_t sigmoid_router;
  const float* correction;
  int64_t n_group, topk_group;
  float scaling;
  const LinearDesc* shared[3];
  int64_t shared_F;
};
// One decoder layer of a decode step (ember_decode_layers): its attention block, its MLP or mixture-of-experts
// block (moe != 0) and its layer's key and value caches (nkv, max_len, hd); with mla != 0 the attention is
// latent.cpp's MlaDesc and Kc/Vc its latent cache (max_len, r) and rotated keys (max_len, dr).
struct LayerStepDesc {
  const AttnBlockDesc* attn;
  const void* mlp;
  int64_t moe;
  void* Kc;
  void* Vc;
  int64_t max_len;
  int64_t mla;
};
struct MlaDesc;  // latent.cpp

extern "C" {

// defined in the cpu_* units (their signatures, generated)
int ember_kernels_amx();
int ember_kernels_vnni();
int ember_kernels_isa();
int ember_kernels_act_q8_levels();
void ember_dense_bf16(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                      int nthreads);
int ember_dense_bf16_amx(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                         int nthreads);
void ember_dense_f32(const float* W, const float* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                     int nthreads);
void ember_int8(const int8_t* W, const float* scales, const void* X, int x_bf16, void* Y, int64_t M, int64_t O,
                int64_t I, int y_bf16, int act_q8, int nthreads);
void ember_q4(const uint8_t* W, const void* X, int x_bf16, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
              int mode, int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
              const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
              const float* table, int act_q8, int nthreads);
void ember_int8_dequant(const int8_t* W, const float* scales, int64_t I, int64_t a, int64_t b, void* out,
                        int out_bf16, int nthreads);
void ember_q4_dequant(const uint8_t* W, int64_t I, int64_t a, int64_t b, void* out, int out_bf16, int mode,
                      int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
                      const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
                      const float* table, int nthreads);
void ember_rms_norm(const void* X, const void* Wt, void* Out, int64_t rows, int64_t H, float eps, int is_bf16,
                    int nthreads);
void ember_rope(void* X, const void* Cos, const void* Sin, int64_t n_rows, int64_t heads, int64_t hd, int is_bf16);
int ember_attn_decode(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t nh, int64_t nkv,
                      int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                      int64_t vss, const uint8_t* mask, int64_t msb, int64_t mss, float scale, int is_bf16,
                      int nthreads);
int ember_attn_runs(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t T, int64_t nh,
                    int64_t nkv, int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                    int64_t vss, const uint8_t* mask, int64_t msb, int64_t mst, int64_t mss, float scale, int is_bf16,
                    int nthreads);
int ember_linear(const LinearDesc* d, const void* X, void* Y, int64_t M, int x_bf16, int nthreads);
int ember_linear_many(int n, const LinearDesc* const* d, const void* X, void* const* Y, int64_t M, int x_bf16,
                      int nthreads);
int ember_linear_rows(int n, const LinearDesc* const* d, const void* X, void* const* Y, int64_t M, int x_bf16,
                      int nthreads);
int ember_attn_block(const AttnBlockDesc* d, void* x, const void* cos, const void* sin, void* Kc, void* Vc,
                     int64_t max_len, int64_t pos, int is_bf16, int nthreads);
int ember_mlp_block(const MlpBlockDesc* d, void* x, int is_bf16, int nthreads);
int ember_moe_block(const MoeBlockDesc* d, void* x, int is_bf16, int nthreads);
int ember_decode_layers(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                        int nthreads);
int ember_decode_layers_gemma(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin,
                              int64_t pos, const void* norm, float eps, int64_t norm_offset, float cap,
                              const LinearDesc* head, void* logits, int is_bf16, int nthreads);
int ember_decode_rows_v(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                        int64_t T, int64_t cs, const void* norm, float eps, int64_t norm_offset, float cap,
                        const LinearDesc* head, void* logits, int is_bf16, int nthreads);
int ember_decode_rows(const LayerStepDesc* layers, int n, void* x, const void* cos, const void* sin, int64_t pos,
                      int64_t T, const void* norm, float eps, const LinearDesc* head, void* logits, int is_bf16,
                      int nthreads);

// defined in the other units
int ember_gguf_linear_jobs(int n, const uint8_t* const* W, const int64_t* O, int64_t row_bytes, int t,
                           const void* const* X, void* const* Y, int64_t I, int nthreads);  // gguf.cpp
int ember_gguf_linear(const uint8_t* W, int64_t row_bytes, int t, const void* X, int x_bf16, void* Y, int64_t M,
                      int64_t O, int64_t I, int act_q8, int nthreads);  // gguf.cpp
void ember_softcap_attn(const void* q, const void* K, const void* V, void* out, int64_t nh, int64_t nkv, int64_t hd,
                        int64_t hs, int64_t S, float scale, float cap, int is_bf16, int nthreads);
int ember_mla_block(const MlaDesc* d, void* x, const void* cos, const void* sin, void* Lc, void* Rc, int64_t max_len,
                    int64_t pos, int is_bf16, int nthreads);

}  // extern "C"
