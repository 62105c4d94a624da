// Entry points of the int8 and 4-bit products and their dequantization.
// Cut from the one-file kernels by scripts/split_cpu.py.

#include "cpu_jobs.h"
#include "cpu_api.h"

// ============================================================================ entry points: int8 and 4-bit products, dequantization
// ember_int8 / ember_q4 pick the tier (VNNI int8 activations, AVX512 bf16/fp32, AVX2, portable) per call;
// ember_*_dequant fill a float tile of rows for PyTorch's GEMM above MAX_ROWS rows (prefill).

extern "C" {

// scales: (O,) fp32. act_q8: bf16 activations may be quantized to int8 for the VNNI kernel (see the header).
void ember_int8(const int8_t* W, const float* scales, const void* X, int x_bf16, void* Y, int64_t M, int64_t O,
                int64_t I, int y_bf16, int act_q8, int nthreads) {
#ifdef EMBER_VNNI
  if (act_q8 && x_bf16 && M == 1 && I % 128 == 0) {  // decode
    const I8RowJob job{W, O, Y, scales};
    int8_row_jobs(&job, 1, static_cast<const uint16_t*>(X), I, y_bf16, nthreads);
    return;
  }
  if (act_q8 && x_bf16 && M <= MB && I % 128 == 0) {
    const float* sxp;
    float corr[MB] = {};
    const int8_t* Xq = int8_activations(static_cast<const uint16_t*>(X), M, I, &sxp, corr);
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      switch (nm) {
        case 1: int8_vnni<1>(w, Xq, sxp, corr, I, out); break;
        case 2: int8_vnni<2>(w, Xq, sxp, corr, I, out); break;
        case 3: int8_vnni<3>(w, Xq, sxp, corr, I, out); break;
        default: int8_vnni<4>(w, Xq, sxp, corr, I, out); break;
      }
      store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
    });
    return;
  }
#elif defined(EMBER_AVX2)
  if (act_q8 && x_bf16 && M <= MB && I % 128 == 0) {
    const int64_t S = I / 128;
    scratch_q8.resize(static_cast<size_t>(M * I));
    scratch_q8f.assign(static_cast<size_t>(2 * M * S), 0.f);  // sx (M, S), qsum (M, S: unused, the products are signed)
    float* sx = scratch_q8f.data();
    quantize_x8_avx2(static_cast<const uint16_t*>(X), M, I, 0, 128, scratch_q8.data(), sx, sx + M * S, nullptr);
    const int8_t* Xq = scratch_q8.data();
    const float* sxp = sx;
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      in_pairs(nm, [&](auto n, int m) {
        int8_q8_avx2<decltype(n)::value>(w, Xq + (m0 + m) * I, sxp + (m0 + m) * S, I, out + m);
      });
      store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
    });
    return;
  }
#else
  (void)act_q8;
#endif
#ifdef EMBER_X86
  if (x_bf16 && M == 1 && I % 64 == 0) {
    // x per 64 values as [x_even, 16 x_even, x_odd, 16 x_odd] (see int8_bf16_rows); 16 x is exact in bf16.
    std::vector<uint16_t>& xp = scratch_h;
    xp.resize(static_cast<size_t>(2 * I));
    const uint16_t* xs = static_cast<const uint16_t*>(X);
    double total = 0.0;
    for (int64_t c = 0; c < I / 64; c++)
      for (int j = 0; j < 32; j++) {
        const float e = bf16_to_f32(xs[c * 64 + 2 * j]), o = bf16_to_f32(xs[c * 64 + 2 * j + 1]);
        xp[c * 128 + j] = xs[c * 64 + 2 * j];
        xp[c * 128 + 32 + j] = f32_to_bf16(16.f * e);
        xp[c * 128 + 64 + j] = xs[c * 64 + 2 * j + 1];
        xp[c * 128 + 96 + j] = f32_to_bf16(16.f * o);
        total += static_cast<double>(e) + o;
      }
    const float xsum = static_cast<float>(total);
    const uint16_t* Xp = xp.data();
    for_row_blocks(O, 1, nthreads, [&](int64_t o0, int64_t, int, float* out) {
      const int8_t* w[R];
      row_ptrs(W, o0, O, I, w);
      int8_bf16_rows(w, Xp, xsum, I, out);
      store_block(Y, O, o0, 0, 1, out, scales, y_bf16);
    });
    return;
  }
#endif
  std::vector<float>& xf = scratch_f;
  xf.resize(static_cast<size_t>(M * I));
  to_f32(X, x_bf16, M * I, xf.data());
  const float* Xf = xf.data();
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const int8_t* w[R];
    row_ptrs(W, o0, O, I, w);
    int8_rows(w, Xf + m0 * I, I, nm, out);
    store_block(Y, O, o0, m0, nm, out, scales, y_bf16);
  });
}

// mode 0 int4 (scales/zeros (O, I/group) in bf16 or fp32), 1 nf4 (absmax fp32, or am_code/am_dyn/am_scale2/am_offset).
// table: the 16 code values in fp32 (q - 8, or the NF4 code book).
void ember_q4(const uint8_t* W, const void* X, int x_bf16, void* Y, int64_t M, int64_t O, int64_t I, int y_bf16,
              int mode, int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
              const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
              const float* table, int act_q8, int nthreads) {
  Q4Params p{mode, group, scales, zeros, stats_bf16, absmax, am_code, am_dyn, am_scale2, am_offset, {}};
  std::memcpy(p.table, table, sizeof(p.table));
  const int64_t G = I / group;
  const int64_t half = I / 2;
#ifdef EMBER_VNNI
  if (act_q8 && x_bf16 && M == 1 && q4_row_fits(I, group)) {  // decode
    Q4RowJob job{W, O, Y, p};
    q4_row_jobs(&job, 1, static_cast<const uint16_t*>(X), I, y_bf16, nthreads);
    return;
  }
#endif
#if defined(EMBER_VNNI) || defined(EMBER_AVX2)
  if (act_q8 && x_bf16 && I % 128 == 0 && 128 % group == 0 && M <= 8) {
    const Q4Act act = q4_activations(static_cast<const uint16_t*>(X), M, I, mode, group, table);
#ifdef EMBER_VNNI
    const __m512i tq = _mm512_loadu_si512(act.tb);
#define Q4K(RR_, N_, MD_) q4_vnni<RR_, N_, MD_>(w, st, Xq, sxp, ztp, I, group, tq, out)
#else
    const __m256i tq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.tb));
#define Q4K(RR_, N_, MD_) q4_q8_avx2<RR_, N_, MD_>(w, st, Xq, sxp, ztp, I, group, tq, out)
#endif
    const int8_t* Xq = act.Xq;
    const float* sx = act.sx;
    const float* zt = act.zt;
    const float* sxp = sx;
    const float* ztp = zt;
    const int64_t rr = M == 1 ? 4 : 1;  // decode: 4 weight rows per pass; batches: one row, up to 8 activations
    const int64_t blocks = (O + rr - 1) / rr;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t o0 = b * rr;
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w, rows);
      float* st = block_scratch(G);
      block_stats(p, rows, G, st);
      float out[R * MB * 2];
      if (rr == 4) {
#ifndef EMBER_VNNI
        if (mode == 0 && group == 32 && I % 256 == 0) q4_q8_avx2_g32(w, st, Xq, sxp, ztp, I, out);
        else
#endif
        if (mode == 0) Q4K(4, 1, 0);
        else Q4K(4, 1, 1);
        store_block(Y, O, o0, 0, 1, out, nullptr, y_bf16);
      } else {
        switch (M) {
#define Q4V(N) case N: if (mode == 0) Q4K(1, N, 0); else Q4K(1, N, 1); break;
          Q4V(1) Q4V(2) Q4V(3) Q4V(4) Q4V(5) Q4V(6) Q4V(7) Q4V(8)
#undef Q4V
        }
        for (int64_t m = 0; m < M; m++) store_y(Y, m * O + o0, out[m], y_bf16);
      }
    }
#undef Q4K
    return;
  }
#else
  (void)act_q8;
#endif
  // Per-group sums of x for the int4 zero term, (M, G) fp32.
  thread_local std::vector<float> xsum;
  xsum.assign(static_cast<size_t>(M * G), 0.f);
  if (mode == 0)
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < G; g++) {
        float t = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; k++) t += load_f(X, m * I + k, x_bf16);
        xsum[m * G + g] = t;
      }
  const float* xsums = xsum.data();  // thread_local: the parallel regions below must not name it
#ifdef EMBER_X86
  if (x_bf16 && I % 128 == 0) {
    std::vector<uint16_t>& x4 = scratch_h;
    x4.resize(static_cast<size_t>(M * I));
    const uint16_t* xs = static_cast<const uint16_t*>(X);
    static const auto orders = [] {  // the 128-value step permutation of each mode, made once
      std::vector<int> o(256);
      for (int md = 0; md < 2; md++)
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 32; j++) o[md * 128 + 32 * i + j] = x_order(md, i, j);
      return o;
    }();
    const int* order = orders.data() + (mode == 0 ? 0 : 128);
    for (int64_t m = 0; m < M; m++)
      for (int64_t c = 0; c < I / 128; c++) {
        const uint16_t* src = xs + m * I + c * 128;
        uint16_t* dst = x4.data() + m * I + c * 128;
        for (int v = 0; v < 128; v++) dst[v] = src[order[v]];
      }
    uint8_t tb[64] = {};
    for (int i = 0; i < 16; i++) {
      const uint16_t h = f32_to_bf16(table[i]);
      tb[i] = static_cast<uint8_t>(h & 0xFF), tb[16 + i] = static_cast<uint8_t>(h >> 8);
    }
    const __m512i tv = _mm512_loadu_si512(tb);
    const uint16_t* X4 = x4.data();
    const int int4 = mode == 0;
    // int4 codes count as 128 + q: fold the -(128 + 8) * scale into the zero of each group.
    Q4Params pz = p;
    const int64_t rr = M == 1 ? 4 : 1;  // decode: 4 weight rows per pass; batches: one row, 8 activations
    const int64_t blocks = (O + rr - 1) / rr;
    const int64_t mstep = M == 1 ? 1 : 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t o0 = b * rr;
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w);
      for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
      float* st = block_scratch(G);
      block_stats(pz, rows, G, st, int4 ? 136.f : 0.f);
      float out[R * MB * 2];
      for (int64_t m0 = 0; m0 < M; m0 += mstep) {
        const int nm = static_cast<int>(std::min<int64_t>(mstep, M - m0));
        const uint16_t* x = X4 + m0 * I;
        const float* xs_ = xsums + m0 * G;
        float o8[8 * MB];
        if (rr == 4) {
          if (int4) q4_bf16x128<4, 1, 0>(w, st, x, xs_, I, group, tv, out);
          else q4_bf16x128<4, 1, 1>(w, st, x, xs_, I, group, tv, out);
          store_block(Y, O, o0, m0, 1, out, nullptr, y_bf16);
        } else {
          // one row, up to 8 activation rows: out index m (MB stride unused with RR = 1)
          switch (nm) {
#define Q4CASE(N) case N: if (int4) q4_bf16x128<1, N, 0>(w, st, x, xs_, I, group, tv, o8); \
                          else q4_bf16x128<1, N, 1>(w, st, x, xs_, I, group, tv, o8); break;
            Q4CASE(1) Q4CASE(2) Q4CASE(3) Q4CASE(4) Q4CASE(5) Q4CASE(6) Q4CASE(7) Q4CASE(8)
#undef Q4CASE
          }
          for (int m = 0; m < nm; m++) store_y(Y, (m0 + m) * O + o0, o8[m], y_bf16);
        }
      }
    }
    return;
  }
#endif
  std::vector<float>& xf = scratch_f;
  xf.resize(static_cast<size_t>(M * I));
  to_f32(X, x_bf16, M * I, xf.data());
#if defined(EMBER_X86) || defined(EMBER_AVX2)
  if (I % 32 == 0 && group % 32 == 0) {
    std::vector<float> xd(static_cast<size_t>(M * I));
    for (int64_t m = 0; m < M; m++)
      for (int64_t c = 0; c < I / 32; c++)
        for (int j = 0; j < 16; j++) {
          xd[m * I + c * 32 + j] = xf[m * I + c * 32 + 2 * j];
          xd[m * I + c * 32 + 16 + j] = xf[m * I + c * 32 + 2 * j + 1];
        }
    const float* Xd = xd.data();
    for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
      const uint8_t* w[R];
      int64_t rows[R];
      row_ptrs(W, o0, O, half, w);
      for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
      float* st = block_scratch(G);
      if (m0 == 0) block_stats(p, rows, G, st);
      const float* x = Xd + m0 * I;
      const float* xs_ = xsums + m0 * G;
#ifdef EMBER_X86
      switch (nm) {
        case 1: q4_f32_block<1>(w, st, x, xs_, I, p, out); break;
        case 2: q4_f32_block<2>(w, st, x, xs_, I, p, out); break;
        case 3: q4_f32_block<3>(w, st, x, xs_, I, p, out); break;
        default: q4_f32_block<4>(w, st, x, xs_, I, p, out); break;
      }
#else
      for (int m = 0; m < nm; m++) q4_f32_avx2(w, st, x + m * I, xs_ + m * G, I, p, out + m);  // block from L1
#endif
      store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
    });
    return;
  }
#endif
  const float* Xf = xf.data();
  for_row_blocks(O, M, nthreads, [&](int64_t o0, int64_t m0, int nm, float* out) {
    const uint8_t* w[R];
    int64_t rows[R];
    row_ptrs(W, o0, O, half, w);
    for (int r = 0; r < R; r++) rows[r] = std::min(o0 + r, O - 1);
    float* st = block_scratch(G);
    if (m0 == 0) block_stats(p, rows, G, st);
    q4_rows_portable(w, st, Xf + m0 * I, I, nm, p, out);
    store_block(Y, O, o0, m0, nm, out, nullptr, y_bf16);
  });
}

// Rows [a, b) of the dequantized weight into ``out`` ((b - a, I), bf16 or fp32): the large-M path
// dequantizes a cache-sized tile of rows with this, then multiplies it with a PyTorch GEMM.
void ember_int8_dequant(const int8_t* W, const float* scales, int64_t I, int64_t a, int64_t b, void* out,
                        int out_bf16, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = a; o < b; o++) {
    const int8_t* row = W + o * I;
    const float sc = scales[o];
    int64_t k = 0;
#ifdef EMBER_X86
    const __m512 s = _mm512_set1_ps(sc);
    for (; k + 16 <= I; k += 16) {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), s);
      store16(out, (o - a) * I + k, v, out_bf16);
    }
#endif
    for (; k < I; k++) store_y(out, (o - a) * I + k, static_cast<float>(row[k]) * sc, out_bf16);
  }
}

void ember_q4_dequant(const uint8_t* W, int64_t I, int64_t a, int64_t b, void* out, int out_bf16, int mode,
                      int64_t group, const void* scales, const void* zeros, int stats_bf16, const float* absmax,
                      const uint8_t* am_code, const float* am_dyn, const float* am_scale2, float am_offset,
                      const float* table, int nthreads) {
  Q4Params p{mode, group, scales, zeros, stats_bf16, absmax, am_code, am_dyn, am_scale2, am_offset, {}};
  std::memcpy(p.table, table, sizeof(p.table));
  const int64_t G = I / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = a; o < b; o++) {
    const uint8_t* row = W + o * (I / 2);
    for (int64_t g = 0; g < G; g++) {
      const float sc = group_scale(p, o, g, G), z = group_zero(p, o, g, G);
      int64_t k = g * group;
#ifdef EMBER_X86
      // 16 bytes -> 32 values: high nibbles are the even elements, low nibbles the odd ones.
      const __m512 table = _mm512_loadu_ps(p.table), s = _mm512_set1_ps(sc), zv = _mm512_set1_ps(z);
      const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (; k + 32 <= (g + 1) * group; k += 32) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        __m512 even = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), s, zv);
        __m512 odd = _mm512_fmadd_ps(_mm512_permutexvar_ps(bytes, table), s, zv);
        store16(out, (o - a) * I + k, _mm512_permutex2var_ps(even, lo_idx, odd), out_bf16);
        store16(out, (o - a) * I + k + 16, _mm512_permutex2var_ps(even, hi_idx, odd), out_bf16);
      }
#endif
      for (; k < (g + 1) * group; k += 2) {
        const uint8_t v = row[k / 2];
        store_y(out, (o - a) * I + k, p.table[v >> 4] * sc + z, out_bf16);
        store_y(out, (o - a) * I + k + 1, p.table[v & 0x0F] * sc + z, out_bf16);
      }
    }
  }
}

}  // extern "C"

