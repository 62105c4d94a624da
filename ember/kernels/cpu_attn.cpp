// Single-query attention (ember_attn_decode).
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_base.h"
#include "cpu_norms.h"
#include "cpu_api.h"

// ============================================================================ single-query attention
namespace {
// Heads h0..h1-1 of batch row b, all in kv group g: scores against keys 0..S-1 (fp32 dot products of the
// bf16/fp32 values, scaled), softmax in fp32 (masked slots weigh 0), then the weighted sum of values.
// Each key/value row is read once for the group's heads. buf: (heads * S) scores + (heads * hd) sums.
#ifdef EMBER_X86
// e^x for x <= 0, 16 lanes: exp_nonpos's steps.
inline __m512 exp16_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Sixteen vectors -> one: lane j = the sum of a[j]'s lanes (a transpose-and-add tree, 45 shuffles/adds).
inline __m512 hsum16x16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// out[h] += sum_s p[h][s] v[s] over the S value rows (V + s * vs, bf16 or fp32, read in place: no fp32 copy to
// evict L1), NC x 16 of the hd sums of four heads at a time in registers (each value vector loaded once for four
// heads' FMAs).
template <int NC, typename T>
inline void pv_rows(const T* V, int64_t vs, int64_t S, int64_t d0, const float* sc, int64_t Sp, int nh, int64_t hd,
                    float* acc) {
  constexpr int NHP = 4;
  for (int h = 0; h < nh; h += NHP) {
    const int nhp = std::min(NHP, nh - h);  // heads past nh (the last pass) read head h's scores, are not stored
    __m512 a[NHP][NC];
    const float* p[NHP];
    for (int i = 0; i < NHP; i++) {
      p[i] = sc + (h + (i < nhp ? i : 0)) * Sp;
      for (int c = 0; c < NC; c++) a[i][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < S; j++) {
      __m512 w[NHP];
      for (int i = 0; i < NHP; i++) w[i] = _mm512_set1_ps(p[i][j]);
      for (int c = 0; c < NC; c++) {
        const __m512 v = load16f(V + j * vs + d0 + 16 * c);
        for (int i = 0; i < NHP; i++) a[i][c] = _mm512_fmadd_ps(w[i], v, a[i][c]);
      }
    }
    for (int i = 0; i < nhp; i++)
      for (int c = 0; c < NC; c++) _mm512_storeu_ps(acc + (h + i) * hd + d0 + 16 * c, a[i][c]);
  }
}

// A 16 x 16 block of 32-bit values (r[i] = row i) transposed in place: r[e] = element e of every row. Three rounds
// of interleaves (32-bit, 64-bit, then 128-bit lanes), 64 shuffles.
inline void transpose16x16(__m512i* r) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; i++) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // b[4 g + k], rows 4g..4g+3: in 128-bit lane L, element 4 L + k of each of the four rows
  for (int g = 0; g < 4; g++) {
    b[4 * g] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int k = 0; k < 4; k++) {
    const __m512i c01 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x44);
    const __m512i c23 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xEE);
    const __m512i d01 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x44);
    const __m512i d23 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(c01, d01, 0x88), r[4 + k] = _mm512_shuffle_i32x4(c01, d01, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(c23, d23, 0x88), r[12 + k] = _mm512_shuffle_i32x4(c23, d23, 0xDD);
  }
}

// Scores of NH query heads (qw: their bf16 values as (NH, hd / 2) 32-bit pairs) against n <= 16 bf16 keys (rows
// k0 + j * ks), scaled: out[h * Sp + j] for j < 16 (zero past n). The keys are transposed to pair-major (kt[p]: pair
// p of the 16 keys), so one vdpbf16ps per pair and head makes 16 scores with no horizontal sums: 2 per score at hd
// 64, against 4 FMAs and a share of a transpose-add tree on fp32 copies of the keys.
template <int NH>
inline void scores_bf16_16(const uint16_t* k0, int64_t ks, int64_t n, int64_t hd, const uint32_t* qw, float scale,
                           float* out, int64_t Sp) {
  const int64_t P = hd / 2;  // 32-bit pairs per row, a multiple of 16
  __m512 acc[NH];
  for (int h = 0; h < NH; h++) acc[h] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    __m512i kt[16];
    for (int j = 0; j < 16; j++)
      kt[j] = j < n ? _mm512_loadu_si512(k0 + j * ks + 2 * p0) : _mm512_setzero_si512();
    transpose16x16(kt);
    for (int i = 0; i < 16; i++)
      for (int h = 0; h < NH; h++)
        acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)kt[i],
                                  (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[h * P + p0 + i])));
  }
  for (int h = 0; h < NH; h++) _mm512_storeu_ps(out + h * Sp, _mm512_mul_ps(acc[h], _mm512_set1_ps(scale)));
}

// sc (nh, Sp) = scale * q k for the group's nh heads and S keys (K + s * ks), from bf16 keys as they are
// (scores_bf16_16, eight heads at a time); hd % 32 == 0.
inline void attn_scores_bf16(const uint16_t* q, const uint16_t* K, int64_t ks, int64_t S, int64_t hd, int nh,
                             float scale, float* sc, int64_t Sp) {
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(q);
  for (int64_t s0 = 0; s0 < S; s0 += 16)
    for (int h0 = 0; h0 < nh; h0 += 8) {
      const uint16_t* k0 = K + s0 * ks;
      const int64_t n = std::min<int64_t>(16, S - s0);
      const uint32_t* qh = qw + h0 * hd / 2;
      float* o = sc + h0 * Sp + s0;
      switch (std::min(8, nh - h0)) {
        case 1: scores_bf16_16<1>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 2: scores_bf16_16<2>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 3: scores_bf16_16<3>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 4: scores_bf16_16<4>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 5: scores_bf16_16<5>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 6: scores_bf16_16<6>(k0, ks, n, hd, qh, scale, o, Sp); break;
        case 7: scores_bf16_16<7>(k0, ks, n, hd, qh, scale, o, Sp); break;
        default: scores_bf16_16<8>(k0, ks, n, hd, qh, scale, o, Sp); break;
      }
    }
}

// The same for any hd % 16 == 0 (fp32 keys, or bf16 with hd % 32 != 0): kBlock keys at a time converted to fp32
// (blk) for all heads, one FMA per 16 values and a transpose-add tree per 16 scores. qf: (nh, hd) scratch.
template <typename T>
void attn_scores_f32(const T* q, const T* K, int64_t ks, int64_t S, int64_t hd, int nh, float scale, float* sc,
                     int64_t Sp, float* qf, float* blk, int64_t kBlock) {
  const int64_t C = hd / 16;
  for (int h = 0; h < nh; h++)
    for (int64_t c = 0; c < C; c++)
      _mm512_storeu_ps(qf + h * hd + 16 * c, _mm512_mul_ps(load16f(q + h * hd + 16 * c), _mm512_set1_ps(scale)));
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t n = std::min(kBlock, S - s0);
    for (int64_t j = 0; j < (n + 15) / 16 * 16; j++)  // zero rows pad the last 16-key step
      for (int64_t c = 0; c < C; c++)
        _mm512_storeu_ps(blk + j * hd + 16 * c, j < n ? load16f(K + (s0 + j) * ks + 16 * c) : _mm512_setzero_ps());
    for (int h = 0; h < nh; h++) {
      const float* qh = qf + h * hd;
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 a[16];
        for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c++) {
          const __m512 qv = _mm512_loadu_ps(qh + 16 * c);
          for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(blk + (j0 + j) * hd + 16 * c), a[j]);
        }
        _mm512_storeu_ps(sc + h * Sp + s0 + j0, hsum16x16(a));
      }
    }
  }
}

// The AVX512 form of attn_group below, for hd % 16 == 0: the group's scores (attn_scores_bf16 / _f32), softmax in
// place, then the values weighted by them, read in place (pv_rows): no fp32 copies of the keys and values.
template <typename T>
void attn_group_avx512(const T* q, const T* K, const T* V, T* out, int64_t hd, int64_t S, int64_t ks, int64_t vs,
                       const uint8_t* mask, int64_t mss, int nh, float scale, std::vector<float>& buf) {
  constexpr int64_t kBlock = 128;
  const int64_t Sp = (S + 15) / 16 * 16;  // score rows padded to whole 16-key steps
  buf.resize(static_cast<size_t>(nh * Sp + 2 * nh * hd + kBlock * hd));
  float* sc = buf.data();      // (nh, Sp)
  float* qf = sc + nh * Sp;    // (nh, hd)
  float* acc = qf + nh * hd;   // (nh, hd)
  float* blk = acc + nh * hd;  // (kBlock, hd)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (hd % 32 == 0) attn_scores_bf16(q, K, ks, S, hd, nh, scale, sc, Sp);
    else attn_scores_f32(q, K, ks, S, hd, nh, scale, sc, Sp, qf, blk, kBlock);
  } else {
    attn_scores_f32(q, K, ks, S, hd, nh, scale, sc, Sp, qf, blk, kBlock);
  }
  // Softmax per head over the S real keys; masked and padding slots weigh 0.
  for (int h = 0; h < nh; h++) {
    float* row = sc + h * Sp;
    float mx = -INFINITY;
    if (!mask) {
      __m512 vm = _mm512_set1_ps(-INFINITY);
      for (int64_t s = 0; s < S; s += 16) vm = _mm512_mask_max_ps(vm, lanes16(S - s), vm, _mm512_loadu_ps(row + s));
      mx = _mm512_reduce_max_ps(vm);
    } else {
      for (int64_t s = 0; s < S; s++)
        if (mask[s * mss]) mx = row[s] > mx ? row[s] : mx;
    }
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (int64_t s = 0; s < Sp; s += 16) {
      __mmask16 keep = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      if (mask)
        for (int j = 0; j < 16 && s + j < S; j++)
          if (!mask[(s + j) * mss]) keep &= static_cast<__mmask16>(~(1u << j));
      const __m512 e = _mm512_maskz_mov_ps(keep, exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(row + s), vmx)));
      _mm512_storeu_ps(row + s, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);  // no visible key (never while decoding)
    for (int64_t s = 0; s < Sp; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv));
  }
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    switch (std::min<int64_t>(4, (hd - d0) / 16)) {
      case 1: pv_rows<1>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      case 2: pv_rows<2>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      case 3: pv_rows<3>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
      default: pv_rows<4>(V, vs, S, d0, sc, Sp, nh, hd, acc); break;
    }
  }
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) {
      if constexpr (std::is_same_v<T, float>) out[h * hd + d] = acc[h * hd + d];
      else out[h * hd + d] = f32_to_bf16(acc[h * hd + d]);
    }
}
#endif

template <typename T>
void attn_group(const T* q, const T* K, const T* V, T* out, int64_t hd, int64_t S, int64_t ks, int64_t vs,
                const uint8_t* mask, int64_t mss, int nh, float scale, std::vector<float>& buf) {
#ifdef EMBER_X86
  if (hd % 16 == 0) return attn_group_avx512(q, K, V, out, hd, S, ks, vs, mask, mss, nh, scale, buf);
#endif
  buf.resize(static_cast<size_t>(nh * (S + 2 * hd)));
  float* sc = buf.data();         // (nh, S)
  float* qf = sc + nh * S;        // (nh, hd)
  float* acc = qf + nh * hd;      // (nh, hd)
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) qf[h * hd + d] = to_float(q[h * hd + d]);
  float kf[512];
  for (int64_t s = 0; s < S; s++) {
    const T* kr = K + s * ks;
#pragma omp simd
    for (int64_t d = 0; d < hd; d++) kf[d] = to_float(kr[d]);
    for (int h = 0; h < nh; h++) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; d++) dot += qf[h * hd + d] * kf[d];
      sc[h * S + s] = dot * scale;
    }
  }
  for (int h = 0; h < nh; h++) {
    float* row = sc + h * S;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++)
      if (!mask || mask[s * mss]) mx = row[s] > mx ? row[s] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < S; s++) {
      const float e = (!mask || mask[s * mss]) ? exp_nonpos(row[s] - mx) : 0.f;
      row[s] = e;
      sum += e;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key (never for a decoding row): zeros
    for (int64_t s = 0; s < S; s++) row[s] *= inv;
    for (int64_t d = 0; d < hd; d++) acc[h * hd + d] = 0.f;
  }
  for (int64_t s = 0; s < S; s++) {
    const T* vr = V + s * vs;
#pragma omp simd
    for (int64_t d = 0; d < hd; d++) kf[d] = to_float(vr[d]);
    for (int h = 0; h < nh; h++) {
      const float p = sc[h * S + s];
      if (p == 0.f) continue;
#pragma omp simd
      for (int64_t d = 0; d < hd; d++) acc[h * hd + d] += p * kf[d];
    }
  }
  for (int h = 0; h < nh; h++)
    for (int64_t d = 0; d < hd; d++) {
      if constexpr (std::is_same_v<T, float>) out[h * hd + d] = acc[h * hd + d];
      else out[h * hd + d] = f32_to_bf16(acc[h * hd + d]);
    }
}

}  // namespace

extern "C" {

// Attention of one query token per batch row (decode) over S cached keys, grouped-query: q (B, nh, hd) and out
// (B, nh, hd) contiguous; K/V element strides (b, head, slot), the last axis contiguous; mask: 1 where a key is
// visible, element strides (b, slot), or null for all visible. Work items are (b, kv group, a slice of the
// group's query heads), enough of them to keep every thread busy. Returns 0 (nothing written) for hd > 512.
int ember_attn_decode(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t nh, int64_t nkv,
                      int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                      int64_t vss, const uint8_t* mask, int64_t msb, int64_t mss, float scale, int is_bf16,
                      int nthreads) {
  if (hd > 512 || nh % nkv) return 0;
  const int64_t rep = nh / nkv;
  int64_t split = 1;  // query-head slices per group
  while (split < rep && B * nkv * split < 2 * nthreads && rep % (split * 2) == 0) split *= 2;
  const int64_t per = rep / split, items = B * nkv * split;
#pragma omp parallel num_threads(nthreads) if (items > 1)
  {
    static thread_local std::vector<float> buf;  // kept between calls: no allocation per decode step
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
      const int64_t b = it / (nkv * split), g = (it / split) % nkv, h0 = g * rep + (it % split) * per;
      const uint8_t* mk = mask ? mask + b * msb : nullptr;
      if (is_bf16) {
        const auto* q = static_cast<const uint16_t*>(Q) + (b * nh + h0) * hd;
        attn_group(q, static_cast<const uint16_t*>(K) + b * ksb + g * ksh, static_cast<const uint16_t*>(V) + b * vsb + g * vsh,
                   static_cast<uint16_t*>(Out) + (b * nh + h0) * hd, hd, S, kss, vss, mk, mss, static_cast<int>(per),
                   scale, buf);
      } else {
        const auto* q = static_cast<const float*>(Q) + (b * nh + h0) * hd;
        attn_group(q, static_cast<const float*>(K) + b * ksb + g * ksh, static_cast<const float*>(V) + b * vsb + g * vsh,
                   static_cast<float*>(Out) + (b * nh + h0) * hd, hd, S, kss, vss, mk, mss, static_cast<int>(per),
                   scale, buf);
      }
    }
  }
  return 1;
}

// Attention of T query rows per batch row, each over the run of keys its mask row shows, computed exactly as
// ember_attn_decode computes one query over just those keys (no mask, the run's first key at slot 0): a row's
// result does not depend on how far the batch left-pads it nor on how many rows ride beside it, so a served
// step, plain or verifying proposals, rounds as generate's one-token step. Q and Out (B, T, nh, hd)
// contiguous; K/V as ember_attn_decode; mask (b, t, slot) element strides, 1 where visible. A row with no
// visible key gets zeros. Returns 0 (nothing written) where some row's visible keys are not one run, or hd > 512.
int ember_attn_runs(const void* Q, const void* K, const void* V, void* Out, int64_t B, int64_t T, int64_t nh,
                    int64_t nkv, int64_t hd, int64_t S, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                    int64_t vss, const uint8_t* mask, int64_t msb, int64_t mst, int64_t mss, float scale, int is_bf16,
                    int nthreads) {
  if (hd > 512 || nh % nkv) return 0;
  std::vector<int64_t> run(static_cast<size_t>(2 * B * T));  // per row: first visible slot, visible count
  for (int64_t r = 0; r < B * T; r++) {
    const uint8_t* m = mask + (r / T) * msb + (r % T) * mst;
    int64_t lo = 0, hi = 0, n = 0;
    for (int64_t s = 0; s < S; s++)
      if (m[s * mss]) {
        if (n++ == 0) lo = s;
        hi = s + 1;
      }
    if (n != hi - lo) return 0;
    run[2 * r] = lo;
    run[2 * r + 1] = n;
  }
  const int64_t rep = nh / nkv, R = B * T;
  int64_t split = 1;  // query-head slices per group
  while (split < rep && R * nkv * split < 2 * nthreads && rep % (split * 2) == 0) split *= 2;
  const int64_t per = rep / split, items = R * nkv * split;
  const size_t esz = is_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads) if (items > 1)
  {
    static thread_local std::vector<float> buf;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
      const int64_t r = it / (nkv * split), b = r / T, g = (it / split) % nkv, h0 = g * rep + (it % split) * per;
      const int64_t lo = run[2 * r], n = run[2 * r + 1];
      char* o = static_cast<char*>(Out) + (r * nh + h0) * hd * esz;
      if (n == 0) {
        std::memset(o, 0, static_cast<size_t>(per * hd) * esz);
        continue;
      }
      const int64_t ko = (b * ksb + g * ksh + lo * kss) * esz, vo = (b * vsb + g * vsh + lo * vss) * esz;
      const char* q = static_cast<const char*>(Q) + (r * nh + h0) * hd * esz;
      if (is_bf16)
        attn_group(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(static_cast<const char*>(K) + ko),
                   reinterpret_cast<const uint16_t*>(static_cast<const char*>(V) + vo), reinterpret_cast<uint16_t*>(o),
                   hd, n, kss, vss, nullptr, 0, static_cast<int>(per), scale, buf);
      else
        attn_group(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(static_cast<const char*>(K) + ko),
                   reinterpret_cast<const float*>(static_cast<const char*>(V) + vo), reinterpret_cast<float*>(o),
                   hd, n, kss, vss, nullptr, 0, static_cast<int>(per), scale, buf);
    }
  }
  return 1;
}

}  // extern "C"

