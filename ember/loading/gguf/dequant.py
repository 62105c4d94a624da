"""ggml block types: decoding GGUF tensors to floats, and keeping some exactly quantized.

Q8_0, Q4_0, Q4_K, Q5_K and Q6_K are decoded by vectorised torch code (on the tensor's device, in
bounded chunks), bit-exact with ``gguf.quants.dequantize`` in fp32. A type registered in
:data:`EXACT_QUANT_LINEARS` (Q4_0 -> ``Int4Linear``, group 32) can instead stay quantized, exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import gguf
import torch
from gguf import GGMLQuantizationType as QT

from ember.quant.int4 import Int4Linear, join_nibbles

# Elements dequantized per chunk: a few MB of fp32 temporaries, which the allocator reuses from chunk to
# chunk (fresh large buffers cost page faults: 2-3x slower at 16M elements per chunk, measured on CPU).
_DEQUANT_CHUNK = 1 << 20


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """(n, 1) fp32 from the fp16 stored at byte ``start`` of each block."""
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k, 32) bytes -> (n, 2k, 32): for each 32-byte chunk, its low nibbles then its high nibbles."""
    n, k, _ = qs.shape
    return torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 2 * k, 32)


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 32 x int8 q; w = q * d
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    # block 32: fp16 d, 16 bytes; element i < 16 is the low nibble of byte i, i >= 16 the high nibble of i-16
    qs = b[:, 2:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).float().sub_(8)  # small integers: exact in fp32
    return q.mul_(_f16(b, 0))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (the K-quant packing), each (n, 8) uint8."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale, mins


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


# ggml type -> block decoder: uint8 (n_blocks, type_size) -> fp32 (n_blocks, block_size)
DEQUANTIZERS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q8_0: _dequant_q8_0,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


# ggml type -> builder of an Ember quantized Linear holding such a tensor *exactly* (no re-quantization):
# builder(raw uint8 (out, row_bytes) on the target device, bias or None, compute dtype) -> nn.Module.
# Q4_0 (blocks of 32, w = d * (q - 8), fp16 d) is Int4Linear with group size 32, scale d and zero 0, so a
# Q4_0 file stays 4-bit in memory (scales are held in the compute dtype: exact in fp32/fp16, bf16-rounded
# in bf16). Q8_0 (w = d * q per block of 32) is exact only for an int8 Linear with group-wise (32) scales,
# not a per-output-channel Int8Linear, so it is dequantized like every type without a builder.
def _q4_0_linear(raw: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Module:
    out_f = raw.shape[0]
    blocks = raw.reshape(out_f, -1, 18)                      # (out, in/32, 2 bytes d + 16 bytes of nibbles)
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0]  # (out, in/32)
    qs = blocks[..., 2:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out_f, -1)  # (out, in): element i<16 low nibble of i
    state = {"weight": join_nibbles(codes), "scales": d, "zeros": torch.zeros_like(d)}
    return Int4Linear.from_canonical(state, codes.shape[1], out_f, None if bias is None else bias.to(dtype), dtype,
                                     group_size=32)


EXACT_QUANT_LINEARS: dict[Any, Callable[[torch.Tensor, torch.Tensor | None, torch.dtype], torch.nn.Module]] = \
    {QT.Q4_0: _q4_0_linear}


def supported_types_text() -> str:
    names = [t.name for t in (*FLOAT_TYPES, *DEQUANTIZERS)]
    return f"Ember reads {', '.join(names)} (re-quantize the file to one of these, e.g. with llama-quantize)"


def dequantize(raw: torch.Tensor, qtype: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ggml blocks to floats on ``raw``'s device.

    Args:
        raw: uint8 (..., row_bytes), rows of whole blocks as stored in the file.
        qtype: a ``gguf.GGMLQuantizationType`` with a decoder in :data:`DEQUANTIZERS`.
        dtype: output dtype; decoding is in fp32, in chunks of ``_DEQUANT_CHUNK`` elements.
    Returns:
        (..., row_elements) tensor of ``dtype``.
    """
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    decode = DEQUANTIZERS[qtype]
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    blocks = raw.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
    step = max(1, _DEQUANT_CHUNK // block)
    for s in range(0, blocks.shape[0], step):
        out[s:s + step] = decode(blocks[s:s + step])
    return out.reshape(*lead, row_bytes // type_size * block)


def unpermute_rope_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows stored (h, hd/2, 2) go back to HF's (h, 2, hd/2).

    Works on float rows and on rows of quantized blocks alike (blocks never cross rows).
    """
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
