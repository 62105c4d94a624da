// Kernel build queries, dense products (AVX512, AVX2, AMX tiles), RMSNorm and RoPE entry points. The overview of
// the kernels is in cpu_base.h.
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_vnni.h"
#include "cpu_norms.h"
#include "cpu_api.h"

namespace {
#if defined(EMBER_AMX) && defined(EMBER_X86)
// ============================================================================ dense bf16 on AMX tiles
// Batched decode (5-32 activation rows) is compute-bound for vdpbf16ps on a small core count; AMX
// tiles multiply 16 weight rows x 32 inputs by 16 activation rows per instruction. Computed as
// Y^T = W X^T so that W, row-major, *is* the A-tile layout (16 rows of 32 bf16, stride I): only X is
// repacked, into the VNNI pair layout B needs ([I/2][MP][2]: row j holds (x[m][2j], x[m][2j+1]) for
// each m), once per call. Tiles: 0-1 C (16 W rows x 16 X rows fp32), 2 A, 3-4 B.
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_permitted() {
  // Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

template <int NB>
void dense_bf16_amx(const uint16_t* W, const uint16_t* xp, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                    int nthreads) {
  constexpr int MP = 16 * NB;
  const int64_t blocks = O / 16;
#pragma omp parallel num_threads(nthreads)
  {
    TileConfig cfg = {};
    cfg.palette_id = 1;
    for (int t = 0; t < 5; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    alignas(64) float c[NB][16][16];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const uint16_t* wb = W + b * 16 * I;
      _tile_zero(0);
      if (NB == 2) _tile_zero(1);
      for (int64_t k = 0; k < I; k += 32) {
        if (PF_DENSE) _mm_prefetch(reinterpret_cast<const char*>(wb + k) + 16 * I * 2, PF_HINT);
        _tile_loadd(2, wb + k, I * 2);
        _tile_loadd(3, xp + (k / 2) * MP * 2, MP * 4);
        _tile_dpbf16ps(0, 2, 3);
        if (NB == 2) {
          _tile_loadd(4, xp + (k / 2) * MP * 2 + 32, MP * 4);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, c[0], 64);
      if (NB == 2) _tile_stored(1, c[NB - 1], 64);
      for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < 16; r++) store_y(Y, m * O + b * 16 + r, c[m / 16][r][m % 16], y_bf16);
    }
    _tile_release();
  }
}
#endif
}  // namespace

// ============================================================================ entry points: dense products
// ember_dense_bf16 / _amx / _f32: each ISA tier's row kernels (AVX512, AVX2, portable) dealt over the threads in
// 4-row blocks (for_row_blocks); the AMX kernel from AMX_MIN_ROWS rows where the OS grants the tiles.

extern "C" {

// Whether this build has the AMX kernel and the OS lets this process use the tiles.
int ember_kernels_amx() {
#if defined(EMBER_AMX) && defined(EMBER_X86)
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Whether this build has the AVX512-VNNI int8-activation kernels.
int ember_kernels_vnni() { return kVnni; }

// Which code path this build compiled: 1 = AVX512-BF16 intrinsics, 2 = AVX2 + FMA, 0 = portable loops.
int ember_kernels_isa() { return kIsa; }

// The int8-activation kernels' NF4 code-book resolution: code c is multiplied as round(levels c) / levels
// (127 with VNNI, 63 with AVX2); 0 where this build has no int8-activation kernels.
int ember_kernels_act_q8_levels() { return kActQ8Levels; }

void ember_dense_bf16(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                      int nthreads) {
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const uint16_t* w[R];
    row_ptrs(W, o0, O, I, w);
    dense_bf16_rows(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

// Y = X W^T on AMX tiles for 1 <= M <= 32, I % 32 == 0; returns 0 (nothing written) where this build or
// the OS has no AMX. The last O % 16 rows go through the AVX512 kernel.
int ember_dense_bf16_amx(const uint16_t* W, const uint16_t* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                         int nthreads) {
#if defined(EMBER_AMX) && defined(EMBER_X86)
  if (M < 1 || M > 32 || I % 32 != 0 || !amx_permitted()) return 0;
  const int NB = M > 16 ? 2 : 1;
  const int64_t MP = 16 * NB;
  static thread_local std::vector<uint16_t> packed;
  packed.assign(static_cast<size_t>(I * MP), 0);
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < I; k++) packed[(k / 2) * MP * 2 + m * 2 + (k & 1)] = X[m * I + k];
  if (NB == 2)
    dense_bf16_amx<2>(W, packed.data(), Y, M, O, I, y_bf16, nthreads);
  else
    dense_bf16_amx<1>(W, packed.data(), Y, M, O, I, y_bf16, nthreads);
  float out[R * MB];
  for (int64_t o0 = O / 16 * 16; o0 < O; o0 += R)
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const uint16_t* w[R];
      row_ptrs(W, o0, O, I, w);
      int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
      dense_bf16_rows(w, X + m0 * I, I, nm, out);
      store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
    }
  return 1;
#else
  (void)W, (void)X, (void)Y, (void)M, (void)O, (void)I, (void)y_bf16, (void)nthreads;
  return 0;
#endif
}

void ember_dense_f32(const float* W, const float* X, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
                     int nthreads) {
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const float* w[R];
    row_ptrs(W, o0, O, I, w);
    dense_f32_rows(w, X + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

}  // extern "C"

namespace {
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t H, float eps);
template <typename T>
void rope_head(T* x, const T* cos, const T* sin, int64_t hd);
template <typename T>
void silu_mul(T* g, const T* u, int64_t n);
}

// ============================================================================ entry points: RMSNorm and RoPE

extern "C" {

// RMSNorm as HF computes it: h = x in fp32; h *= 1 / sqrt(mean(h^2) + eps); out = weight * h.to(dtype), where
// (bf16) the cast and the product are each rounded to bf16. x, weight, out: bf16 or fp32 (is_bf16), (rows, H).
// The sum of squares in double (each square is exact in it).
void ember_rms_norm(const void* X, const void* Wt, void* Out, int64_t rows, int64_t H, float eps, int is_bf16,
                    int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    if (is_bf16)
      rms_norm_row(static_cast<const uint16_t*>(X) + r * H, static_cast<const uint16_t*>(Wt),
                   static_cast<uint16_t*>(Out) + r * H, H, eps);
    else
      rms_norm_row(static_cast<const float*>(X) + r * H, static_cast<const float*>(Wt),
                   static_cast<float*>(Out) + r * H, H, eps);
  }
}

// Rotary embedding in place, HF's half-split layout: x (n_rows, heads, hd), hd even, with cos/sin (n_rows, hd)
// per row; out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); in bf16 each product and the
// sum are rounded as PyTorch's bf16 ops round them.
void ember_rope(void* X, const void* Cos, const void* Sin, int64_t n_rows, int64_t heads, int64_t hd, int is_bf16) {
  for (int64_t t = 0; t < n_rows; t++)
    for (int64_t h = 0; h < heads; h++) {
      const int64_t base = (t * heads + h) * hd;
      if (is_bf16)
        rope_head(static_cast<uint16_t*>(X) + base, static_cast<const uint16_t*>(Cos) + t * hd,
                  static_cast<const uint16_t*>(Sin) + t * hd, hd);
      else
        rope_head(static_cast<float*>(X) + base, static_cast<const float*>(Cos) + t * hd,
                  static_cast<const float*>(Sin) + t * hd, hd);
    }
}

// g (n,) = silu(g) * u in place, as the MLP blocks compute it (silu_mul in cpu_norms.h); for the tests.
void ember_silu_mul(void* g, const void* u, int64_t n, int is_bf16) {
  if (is_bf16) silu_mul(static_cast<uint16_t*>(g), static_cast<const uint16_t*>(u), n);
  else silu_mul(static_cast<float*>(g), static_cast<const float*>(u), n);
}

}  // extern "C"

