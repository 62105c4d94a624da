"""Writing ggml K-quant blocks (Q4_K, Q5_K, Q6_K): llama.cpp's reference quantizers, vectorised in numpy.

``gguf.quants`` (the format's own Python package) quantizes Q8_0, Q4_0, Q5_0, MXFP4 ... but only decodes
the K-quants. These follow ``quantize_row_q{4,5,6}_K_ref`` in ggml-quants.c step for step, in fp32:

- every sum over a sub-block is accumulated in element order (the arrays are laid out (elements,
  sub-blocks) so a reduction over axis 0 adds row after row, as the C loop does), and every product
  keeps the C expression's association, so each rounding happens where ggml's happens;
- ``nearest_int`` is round-half-to-even (ggml adds 1.5 * 2**23), as ``np.rint`` is;
- fp16 scales are rounded to nearest-even, as ``GGML_FP32_TO_FP16`` does.

So the blocks are those llama.cpp's ``llama-quantize`` writes without an importance matrix (checked
byte for byte in tests/test_gguf_write.py where llama-cpp-python is installed).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256  # elements per super-block
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: an all-zero group
# Super-blocks quantized per step: a few MB of fp32 temporaries (the search loops make ~40 of them).
_CHUNK = 4096

f32 = np.float32


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _fp16_round(x: np.ndarray) -> np.ndarray:
    """(fp16 bits as uint16, the fp16 value back in fp32)."""
    h = x.astype(np.float16)
    return h.view(np.uint16), h.astype(f32)


def _seq_sum(x: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in element order, in fp32 (numpy reduces a leading axis row by row)."""
    acc = x[0].copy()
    for row in x[1:]:
        acc += row
    return acc


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for many sub-blocks at once (use_mad false).

    Args:
        x, w: (n, S) fp32 values and weights; column s is one sub-block of n elements.
    Returns:
        (levels uint8 (n, S), scale (S,), the_min (S,) = -min >= 0).
    """
    mn = np.minimum(x.min(axis=0), f32(0))
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn
    iscale = f32(nmax) / np.where(flat, f32(1), mx - mn)
    scale = f32(1) / iscale
    levels = np.clip(_rint(iscale * (x - mn)), 0, nmax)
    diff = (scale * levels.astype(f32) + mn) - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        # ggml reuses ``min`` as updated by the best step so far, in the range and in the offset
        rng = mx - mn
        iscale = ((f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax)) / np.where(rng == 0, f32(1), rng)
        la = np.clip(_rint(iscale * (x - mn)), 0, nmax)
        lf = la.astype(f32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        d = sum_w * sum_l2 - sum_l * sum_l
        ok = d > 0
        dd = np.where(ok, d, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 == 0, f32(1), sum_l2), this_scale)
        this_min = np.where(pos, f32(0), this_min)
        diff = (this_scale * lf + this_min) - x
        cur = _seq_sum(w * (diff * diff))
        better = ok & (cur < best)
        levels = np.where(better, la, levels)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    levels = np.where(flat, 0, levels)
    scale = np.where(flat, f32(0), scale)
    return levels.astype(np.uint8), scale.astype(f32), (-mn).astype(f32)


def _qkx_super_blocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of Q4_K and Q5_K for (nb, 256) fp32 rows of super-blocks.

    Returns:
        (levels (nb, 256) uint8 in [0, nmax], d bits (nb,) uint16, dmin bits (nb,) uint16, packed scales (nb, 12)).
    """
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32).T.copy()  # (32, nb*8): column = one sub-block of 32
    sum_x2 = _seq_sum(xs * xs)
    av_x = np.sqrt(sum_x2 / f32(32)).astype(f32)
    w = av_x + np.abs(xs)
    levels, scales, mins = _make_qkx2(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(_rint(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)  # C: uint8_t, then MIN(63, .)
    lm = np.minimum(_rint(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d_bits, d = _fp16_round(max_scale / f32(63))
    m_bits, dmin = _fp16_round(max_min / f32(63))
    # Second pass: levels against the stored (rounded) scales; a zero scale keeps the first pass's levels.
    dsub = d[:, None] * ls.astype(f32)  # (nb, 8)
    dmsub = dmin[:, None] * lm.astype(f32)
    xr = x.reshape(nb, 8, 32)
    safe = np.where(dsub == 0, f32(1), dsub)
    again = np.clip(_rint((xr + dmsub[..., None]) / safe[..., None]), 0, nmax).astype(np.uint8)
    first = levels.T.reshape(nb, 8, 32)
    final = np.where((dsub != 0)[..., None], again, first)
    return final.reshape(nb, QK_K), d_bits, m_bits, packed


def _q4_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    levels, d, dmin, scales = _qkx_super_blocks(x, 15, -1.0, 0.1, 20)
    lv = levels.reshape(nb, 4, 2, 32)  # per 64 elements: low nibbles = first 32, high = next 32
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate((d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs), axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    levels, d, dmin, scales = _qkx_super_blocks(x, 31, -0.5, 0.1, 15)
    lv = levels.reshape(nb, 8, 32)  # sub-block j: bit 4 goes to bit j of qh[i]
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        qh |= ((lv[:, j] >> 4) & 1) << j
    low = (lv & 0x0F).reshape(nb, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate((d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qh, qs), axis=1)


def _make_qx_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for columns of ``x`` (n, S).

    Returns:
        (levels int32 (n, S) in [0, 2*nmax), scale (S,)).
    """
    idx = np.abs(x).argmax(axis=0)  # first of equal maxima, as the C loop's strict '>'
    amax_signed = np.take_along_axis(x, idx[None], axis=0)[0]
    zero = np.abs(amax_signed) < _EPS
    mx = np.where(zero, f32(1), amax_signed)
    w = x * x

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        lf = lv.astype(f32)
        return lv, _seq_sum((w * x) * lf), _seq_sum((w * lf) * lf)

    iscale = f32(-nmax) / mx
    lv, sumlx, suml2 = attempt(iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 == 0, f32(1), suml2), f32(0))
    best = scale * sumlx
    levels = lv
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / mx
        lv, sumlx, suml2 = attempt(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 == 0, f32(1), suml2)
        levels = np.where(better, lv, levels)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    levels = np.where(zero, -nmax, levels)  # all-zero group: L = 0 (stored as level - nmax)
    scale = np.where(zero, f32(0), scale)
    return levels + nmax, scale.astype(f32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16).T.copy()  # (16, nb*16): column = one sub-block of 16
    levels, scales = _make_qx_rmse1(xs, 32)
    scales = scales.reshape(nb, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < _EPS
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d_bits, d = _fp16_round(f32(1) / iscale)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)  # (nb, 16)
    dsub = d[:, None] * sc.astype(f32)
    xr = x.reshape(nb, 16, 16)
    safe = np.where(dsub == 0, f32(1), dsub)
    again = np.clip(_rint(xr / safe[..., None]), -32, 31) + 32
    first = levels.T.reshape(nb, 16, 16)
    lv = np.where((dsub != 0)[..., None], again, first).astype(np.uint8).reshape(nb, 2, 4, 32)  # per 128: 4 x 32
    ql = np.stack((lv[:, :, 0] & 0xF | ((lv[:, :, 2] & 0xF) << 4),
                   lv[:, :, 1] & 0xF | ((lv[:, :, 3] & 0xF) << 4)), axis=2).reshape(nb, 128)
    qh = (lv[:, :, 0] >> 4) | ((lv[:, :, 1] >> 4) << 2) | ((lv[:, :, 2] >> 4) << 4) | ((lv[:, :, 3] >> 4) << 6)
    out = np.concatenate((ql, qh.reshape(nb, 64), sc.view(np.uint8), d_bits.view(np.uint8).reshape(nb, 2)), axis=1)
    out[empty] = 0  # ggml: memset the block, d = 0
    return out


_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # bytes per 256-element super-block


def quantize_k(x: np.ndarray, kind: str) -> np.ndarray:
    """Quantize rows of floats to a K-quant type, as llama.cpp's reference quantizer does.

    Args:
        x: (..., n) floats, n a multiple of 256.
        kind: "Q4_K", "Q5_K" or "Q6_K".
    Returns:
        uint8 (..., n / 256 * type size): the blocks as a GGUF file stores them.
    """
    encode = _ENCODERS[kind]
    lead, n = x.shape[:-1], x.shape[-1]
    if n % QK_K:
        raise ValueError(f"{kind}: row length {n} is not a multiple of {QK_K}")
    blocks = np.ascontiguousarray(x, dtype=f32).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], TYPE_SIZES[kind]), dtype=np.uint8)
    for s in range(0, blocks.shape[0], _CHUNK):
        out[s:s + _CHUNK] = encode(blocks[s:s + _CHUNK])
    return out.reshape(*lead, n // QK_K * TYPE_SIZES[kind])
