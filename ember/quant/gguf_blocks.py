"""ggml block types decoded to floats by torch code, on any device, bit-exact with ``gguf.quants.dequantize``.

A GGUF tensor of a quantized type is rows of fixed-size blocks (``gguf.GGML_QUANT_SIZES[type]`` gives the
elements and bytes of one block; blocks never cross rows). Every decoder here takes uint8 (n_blocks,
type_size) and returns fp32 (n_blocks, block_size) with the reference's own order of fp32 operations (a
scale times a small integer is exact; where the reference computes ``d * q + m`` or ``dl * q - ml`` so do
we), so ``dequantize`` is the oracle the native kernels (ember/kernels/gguf.cpp) are tested against.
"""

from __future__ import annotations

from typing import Any, Callable

import gguf
import torch
from gguf import GGMLQuantizationType as QT

# Elements dequantized per chunk: a few MB of fp32 temporaries, which the allocator reuses from chunk to
# chunk (fresh large buffers cost page faults).
DEQUANT_CHUNK = 1 << 20

# IQ4_NL / IQ4_XS code book, and MXFP4's e2m1 values doubled (ggml's kvalues_mxfp4; the scale is halved).
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """(n, 1) fp32 from the fp16 stored at byte ``start`` of each block."""
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k, m) bytes -> (n, 2k, m): for each m-byte chunk, its low nibbles then its high nibbles."""
    n, k, m = qs.shape
    return torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 2 * k, m)


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) nibbles: element i < 16 the low nibble of byte i, i >= 16 the high one of i-16."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes holding a little-endian uint32 -> (n, 32) its bits, bit i for element i."""
    return ((qh.unsqueeze(-1) >> _shifts(tuple(range(8)), qh.device, (1, 1, 8))) & 1).reshape(-1, 32)


def _lut(values: tuple[int, ...], codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=codes.device)[codes.long()]


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 32 x int8 q; w = q * d
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 16 bytes of nibbles; w = d * (q - 8)
    return _low_high(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))  # small integers: exact in fp32


def _dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m
    return _low_high(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dequant_q5_0(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 4 bytes of 5th bits, 16 bytes of nibbles; w = d * (q - 16)
    q = _low_high(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(b, 0))


def _dequant_q5_1(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, fp16 m, 4 bytes of 5th bits, 16 bytes of nibbles; w = d * q + m
    q = _low_high(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (the Q4_K/Q5_K packing), each (n, 8) uint8."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale, mins


def _dequant_q2_k(b: torch.Tensor) -> torch.Tensor:
    # super-block 256 = 16 sub-blocks of 16: 16 bytes scales (low nibble scale, high nibble min), 64 bytes of
    # 2-bit codes (element 128h + 32j + l is bits 2j of byte 32h + l), fp16 d, fp16 dmin; w = dl * q - ml
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).unsqueeze(-1)  # (n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 3
    return q.reshape(n, 16, 16).float().mul_(dl).sub_(ml).reshape(n, 256)


def _dequant_q3_k(b: torch.Tensor) -> torch.Tensor:
    # super-block 256 = 16 sub-blocks of 16: 32 bytes high-bit mask, 64 bytes of 2-bit codes, 12 bytes of 6-bit
    # scales (offset 32), fp16 d; w = d * (scale - 32) * (q - 4 * (1 - hbit))
    n = b.shape[0]
    ls, hs = b[:, 96:104], b[:, 104:108]
    low = torch.cat((ls & 0x0F, ls >> 4), dim=1)  # (n, 16)
    high = ((hs.unsqueeze(1) >> _shifts((0, 2, 4, 6), b.device, (1, 4, 1))) & 3).reshape(n, 16)
    scale = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (_f16(b, 108) * scale).unsqueeze(-1)  # (n, 16, 1)
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 3
    hbit = (b[:, :32].reshape(n, 1, 32) >> _shifts(tuple(range(8)), b.device, (1, 8, 1))) & 1
    q = ql.reshape(n, 8, 32).to(torch.int16) - ((hbit ^ 1) << 2).to(torch.int16)
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, 256)


def _dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    # super-block 256 = 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes scales/mins, 128 bytes nibbles;
    # w = d*scale[j] * q - dmin*min[j]
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).unsqueeze(-1)  # (n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).float()  # (n, 8, 32)
    return q.mul_(d).sub_(dm).reshape(n, 256)  # in place, same rounding as d * q - dm


def _dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    # as Q4_K plus a 5th bit: 32 bytes qh, bit j of qh[i] belongs to element i of sub-block j
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).unsqueeze(-1)
    dm = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    qh = (b[:, 16:48].unsqueeze(1) >> _shifts(tuple(range(8)), b.device, (1, 8, 1))) & 1  # (n, 8, 32)
    q = (_nibbles(b[:, 48:176].reshape(n, 4, 32)) | (qh << 4)).float()
    return q.mul_(d).sub_(dm).reshape(n, 256)


def _dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    # super-block 256 = 16 sub-blocks of 16: 128 bytes low nibbles, 64 bytes high 2-bit pairs,
    # 16 int8 scales, fp16 d; w = d*scale[j] * (q - 32)
    n = b.shape[0]
    ql = (b[:, :128].reshape(n, 2, 1, 64) >> _shifts((0, 4), b.device, (1, 1, 2, 1))) & 0x0F
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 0x03
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).float().sub_(32)
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # (n, 16, 1)
    return q.reshape(n, 16, 16).mul_(d).reshape(n, 256)


def _dequant_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 16 bytes of nibbles indexing IQ4_VALUES; w = d * value
    return _lut(IQ4_VALUES, _low_high(b[:, 2:])).mul_(_f16(b, 0))


def _dequant_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # super-block 256 = 8 sub-blocks of 32: fp16 d, uint16 of 2-bit scale highs, 4 bytes of 4-bit scale lows,
    # 128 bytes of nibbles (sub-block k: 16 bytes, low nibbles then high); w = d * (scale - 32) * value
    n = b.shape[0]
    sl = b[:, 4:8]
    low = torch.stack((sl & 0x0F, sl >> 4), dim=2).reshape(n, 8)
    sh = b[:, 2:4].to(torch.int32)
    sh = sh[:, :1] | (sh[:, 1:] << 8)  # (n, 1) the little-endian uint16
    high = (sh >> torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)) & 3  # (n, 8)
    scale = ((low.to(torch.int32) | (high << 4)) - 32).float()
    dl = (_f16(b, 0) * scale).unsqueeze(-1)  # (n, 8, 1)
    q = _lut(IQ4_VALUES, _nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32))
    return (dl * q).reshape(n, 256)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """MXFP4's shared exponent byte -> fp32 2**(e - 128) (half the e8m0 scale; ggml_e8m0_to_fp32_half)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _dequant_mxfp4(b: torch.Tensor) -> torch.Tensor:
    # block 32: e8m0 exponent byte, 16 bytes of e2m1 nibbles (low nibbles then high); w = 2**(e-128) * 2v
    return _lut(MXFP4_VALUES, _low_high(b[:, 1:])).mul_(e8m0_half(b[:, :1]))


# ggml type -> block decoder: uint8 (n_blocks, type_size) -> fp32 (n_blocks, block_size)
DEQUANTIZERS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q8_0: _dequant_q8_0,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_1: _dequant_q4_1,
    QT.Q5_0: _dequant_q5_0,
    QT.Q5_1: _dequant_q5_1,
    QT.Q2_K: _dequant_q2_k,
    QT.Q3_K: _dequant_q3_k,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
    QT.IQ4_NL: _dequant_iq4_nl,
    QT.IQ4_XS: _dequant_iq4_xs,
    QT.MXFP4: _dequant_mxfp4,
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def block_shape(qtype: Any) -> tuple[int, int]:
    """(elements, bytes) of one block of ``qtype``."""
    return gguf.GGML_QUANT_SIZES[qtype]


def dequantize(raw: torch.Tensor, qtype: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ggml blocks to floats on ``raw``'s device.

    Args:
        raw: uint8 (..., row_bytes), rows of whole blocks as stored in the file.
        qtype: a ``gguf.GGMLQuantizationType`` with a decoder in :data:`DEQUANTIZERS`.
        dtype: output dtype; decoding is in fp32, in chunks of ``DEQUANT_CHUNK`` elements.
    Returns:
        (..., row_elements) tensor of ``dtype``.
    """
    block, type_size = block_shape(qtype)
    decode = DEQUANTIZERS[qtype]
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    blocks = raw.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
    step = max(1, DEQUANT_CHUNK // block)
    for s in range(0, blocks.shape[0], step):
        out[s:s + step] = decode(blocks[s:s + step])
    return out.reshape(*lead, row_bytes // type_size * block)
