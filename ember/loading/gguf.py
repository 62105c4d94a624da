"""llama.cpp GGUF files: metadata -> ModelConfig, tensors -> weights, vocabulary -> tokenizer.

A GGUF file is one header (key/value metadata, then a table of tensor names, shapes, ggml types and
offsets) followed by aligned tensor data. We parse it with the ``gguf`` package's memory-mapped
``GGUFReader``, wrapped so that a truncated or corrupt file raises :class:`GGUFError` naming the file
(and tensor) instead of an IndexError deep in numpy, or a hang on a bogus array length.

What llama.cpp's converter (``convert_hf_to_gguf.py``) does to an HF checkpoint, and we undo:

- tensor names become ``token_embd.weight``, ``blk.N.attn_q.weight``, ... (:data:`LAYER_TENSORS`);
- shapes are stored innermost-first (ggml ``ne``); the reader hands them back in PyTorch order;
- for the ``llama`` architecture (which also carries Mistral and Mixtral) the rows of ``attn_q`` and
  ``attn_k`` (weights and biases) are permuted per head from HF's half-split RoPE layout to ggml's
  interleaved pairs: rows ``(h, 2, hd/2)`` are stored as ``(h, hd/2, 2)``. Qwen2/3 use the NeoX
  (half-split) RoPE in llama.cpp and are stored unpermuted;
- Llama 3.1 style RoPE scaling is not written as metadata but as a ``rope_freqs.weight`` tensor of
  per-frequency divisors; we recover the equivalent ``llama3`` ``rope_scaling`` from it (and check it);
- tied embeddings are written as no ``output.weight`` at all;
- experts (Mixtral as ``llama`` with ``expert_count``, ``qwen3moe``) are stacked per layer into
  ``ffn_{gate,up,down}_exps`` (E, out, in) plus the router ``ffn_gate_inp``; each expert's parameter
  becomes a view of the decoded stack.

Tensor types: F32, F16, BF16 are read in place (zero-copy when already in the compute dtype on CPU);
Q8_0, Q4_0, Q4_K, Q5_K and Q6_K are dequantized to the compute dtype by vectorised torch code (on the
target device, in bounded chunks), bit-exact with ``gguf.quants.dequantize`` in fp32. Any other
type raises :class:`UnsupportedGGUFTypeError` naming the tensor. A ggml type registered in
:data:`EXACT_QUANT_LINEARS` (Q4_0 -> ``Int4Linear``, group 32) is instead kept quantized, exactly.

The vocabulary (``tokenizer.ggml.*``) becomes a ``tokenizers`` pipeline written as tokenizer.json
would be (:func:`tokenizer_spec`): ``llama`` = SentencePiece-style BPE (merges recovered from token
scores, byte fallback, a space prefix as llama.cpp adds it), ``gpt2`` = byte-level BPE with the file's
merges and the pre-tokenizer regex named by ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ember.config import ModelConfig
from ember.errors import GGUFError, TokenizerError, UnsupportedGGUFTypeError, UnsupportedModelError

try:  # the gguf package is a runtime dependency, but keep `import ember` working without it
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # pragma: no cover - exercised only on a broken install
    gguf = None  # type: ignore[assignment]
    QT = None  # type: ignore[assignment]

GGUF_MAGIC = b"GGUF"

# general.architecture -> (Ember/HF model_type, whether llama.cpp permuted q/k rows for its RoPE).
# llama.cpp's "llama" also carries Mistral (same model) and Mixtral (with {arch}.expert_count > 0).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "qwen3moe": ("qwen3_moe", False),
}
MOE_MODEL_TYPES = {"llama": "mixtral", "qwen3moe": "qwen3_moe"}  # architecture with experts -> model_type

# Global tensors: GGUF name -> Ember/HF name.
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-layer tensors: blk.N.<key>.(weight|bias) -> model.layers.N.<value>.(weight|bias).
LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # MoE router
}
# Stacked experts: blk.N.<key>.weight of shape (E, out, in) -> model.layers.N.mlp.experts.<e>.<value>.weight.
EXPERT_TENSORS: dict[str, str] = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Older Mixtral files store one tensor per expert: blk.N.ffn_gate.E.weight.
_EXPERT_NAME = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
# Tensors that configure the model rather than hold weights.
CONFIG_TENSORS = ("rope_freqs.weight",)
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")

# Elements dequantized per chunk: a few MB of fp32 temporaries, which the allocator reuses from chunk to
# chunk (fresh large buffers cost page faults: 2-3x slower at 16M elements per chunk, measured on CPU).
_DEQUANT_CHUNK = 1 << 20


# ==================================================================== file


class _CheckedReader(gguf.GGUFReader if gguf is not None else object):  # type: ignore[misc]
    """``GGUFReader`` that refuses to read past the end of the file and checks tensor types.

    The stock reader slices its memory map without bounds checks, so a truncated file yields short
    arrays (IndexError later, or a loop over a huge bogus count); here every read is checked.
    """

    def _get(self, offset, dtype, count=1, override_order=None):  # noqa: ANN001 - GGUFReader's signature
        # GGUFReader._get, bounds-checked, and slicing a plain ndarray view of the map: np.memmap's
        # Python-level __getitem__ made parsing a 150k-token vocabulary take seconds.
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self._flat = self.data.view(np.ndarray)
        count = int(count)
        dt = np.dtype(dtype)
        end = int(offset) + dt.itemsize * count
        if count < 0 or end > flat.shape[0]:
            raise GGUFError(f"truncated or corrupt header: a field at byte {int(offset)} runs to byte {end} "
                            f"but the file has {flat.shape[0]}")
        arr = flat[offset:end].view(dt)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs, fields):  # noqa: ANN001
        size = len(self.data)
        for f in fields:
            # parts: name length, name bytes, n_dims, dims, ggml type, data offset (GGUF tensor info layout)
            name = bytes(f.parts[1]).decode("utf-8", errors="replace")
            raw_type = int(f.parts[4][0])
            try:
                qtype = QT(raw_type)
            except ValueError:
                raise UnsupportedGGUFTypeError(
                    f"tensor {name!r} has ggml type id {raw_type}, which is not a known ggml type "
                    f"(corrupt file, or newer than the installed gguf package); {_supported_types_text()}"
                ) from None
            dims = [int(d) for d in f.parts[3]]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims and dims[0] % block:
                raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block {block}")
            if int(f.parts[5][0]) % self.alignment:
                raise GGUFError(f"tensor {name!r}: data offset {int(f.parts[5][0])} is not aligned to {self.alignment} bytes")
            n_bytes = math.prod(dims) // block * type_size
            end = int(start_offs) + int(f.parts[5][0]) + n_bytes
            if end > size:
                raise GGUFError(f"truncated: tensor {name!r} ends at byte {end} but the file has {size}")
        super()._build_tensors(start_offs, fields)


@dataclass
class GGUFFile:
    """One parsed ``.gguf`` file: metadata by key, tensor infos by name; data stays memory-mapped.

    Raises:
        GGUFError: the file is missing, not GGUF, truncated, or corrupt (the message says which).
    """

    path: Path
    reader: Any = field(repr=False)
    tensors: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        p = Path(path)
        if gguf is None:  # pragma: no cover
            raise GGUFError(f"{p}: reading GGUF files needs the 'gguf' package (pip install gguf)")
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise GGUFError(f"{p}: cannot read ({e.strerror or e})") from None
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{p}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
        if size < 24:
            raise GGUFError(f"{p}: truncated GGUF file ({size} bytes)")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if int.from_bytes(head[4:8], "big") in (2, 3) else ""
            raise GGUFError(f"{p}: GGUF version {version} is not supported (only 2 and 3){hint}")
        try:
            reader = _CheckedReader(p, "c")  # copy-on-write map: tensors are writable views, never written back
        except GGUFError as e:
            raise type(e)(f"{p}: {e}") from None
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise GGUFError(f"{p}: corrupt GGUF header: {e}") from None
        return cls(p, reader, {t.name: t for t in reader.tensors})

    # ---------------------------------------------------------------- metadata
    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` as a Python scalar, str or list; ``default`` if absent."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} is corrupt ({e})") from None

    def get_int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        v = self.get(key)
        if v is None:
            if required:
                raise GGUFError(f"{self.path}: metadata {key!r} is missing")
            return default
        if isinstance(v, list):  # per-layer arrays (e.g. head counts): fine when uniform
            if not v or any(x != v[0] for x in v):
                raise UnsupportedModelError(f"{self.path}: metadata {key!r} varies per layer ({v[:8]}...); not supported")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(f"{self.path}: metadata {key!r} must be an integer, got {v!r}")
        return v

    def get_float(self, key: str, default: float | None = None) -> float | None:
        v = self.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFError(f"{self.path}: metadata {key!r} must be a number, got {v!r}")
        return float(v)

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata 'general.architecture' is missing")
        return arch

    # ---------------------------------------------------------------- tensors
    def raw(self, name: str, unpermute_heads: int | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored: a CPU view over the map (quantized types: uint8 (rows, row_bytes))."""
        x = torch.from_numpy(self.tensors[name].data)
        return unpermute_rope_rows(x, unpermute_heads) if unpermute_heads else x

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu",
               unpermute_heads: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in PyTorch layout, decoded to ``dtype`` on ``device``.

        Args:
            unpermute_heads: undo llama.cpp's RoPE row permutation with this many heads (q/k of llama).
        Raises:
            UnsupportedGGUFTypeError: the tensor's ggml type is not one Ember decodes.
        """
        t = self.tensors[name]
        qtype = QT(t.tensor_type)
        if qtype not in DEQUANTIZERS and qtype not in _FLOAT_TYPES:
            raise UnsupportedGGUFTypeError(f"{self.path}: tensor {name!r} is {qtype.name}; {_supported_types_text()}")
        x = torch.from_numpy(t.data)  # zero-copy view over the map; quantized types are uint8 (rows, row_bytes)
        if qtype == QT.BF16:
            x = x.view(torch.bfloat16)
        if unpermute_heads:
            x = unpermute_rope_rows(x, unpermute_heads)  # rows of blocks permute like rows of floats
        device = torch.device(device)
        if qtype in _FLOAT_TYPES:
            return x.to(device=device, dtype=dtype)
        return dequantize(x.to(device), qtype, dtype)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in PyTorch order (outermost first), as HF stores the same tensor."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))


# ==================================================================== dequantization


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
DEQUANTIZERS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {} if QT is None else {
    QT.Q8_0: _dequant_q8_0,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
}
_FLOAT_TYPES = () if QT is None else (QT.F32, QT.F16, QT.BF16)


# ggml type -> builder of an Ember quantized Linear holding such a tensor *exactly* (no re-quantization):
# builder(raw uint8 (out, row_bytes) on the target device, bias or None, compute dtype) -> nn.Module.
# Q4_0 (blocks of 32, w = d * (q - 8), fp16 d) is Int4Linear with group size 32, scale d and zero 0, so a
# Q4_0 file stays 4-bit in memory (scales are held in the compute dtype: exact in fp32/fp16, bf16-rounded
# in bf16). Q8_0 (w = d * q per block of 32) is exact only for an int8 Linear with group-wise (32) scales,
# not a per-output-channel Int8Linear, so it is dequantized like every type without a builder.
def _q4_0_linear(raw: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Module:
    from ember.quant.int4 import Int4Linear, join_nibbles

    out_f = raw.shape[0]
    blocks = raw.reshape(out_f, -1, 18)                      # (out, in/32, 2 bytes d + 16 bytes of nibbles)
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0]  # (out, in/32)
    qs = blocks[..., 2:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out_f, -1)  # (out, in): element i<16 low nibble of i
    state = {"weight": join_nibbles(codes), "scales": d, "zeros": torch.zeros_like(d)}
    return Int4Linear.from_canonical(state, codes.shape[1], out_f, None if bias is None else bias.to(dtype), dtype,
                                     group_size=32)


EXACT_QUANT_LINEARS: dict[Any, Callable[[torch.Tensor, torch.Tensor | None, torch.dtype], torch.nn.Module]] = \
    {} if QT is None else {QT.Q4_0: _q4_0_linear}


def _supported_types_text() -> str:
    names = [t.name for t in (*_FLOAT_TYPES, *DEQUANTIZERS)]
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


# ==================================================================== config


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` a GGUF file describes (metadata plus tensor shapes).

    Raises:
        UnsupportedModelError: an architecture, RoPE scaling or layout Ember does not run.
        GGUFError: required metadata is missing or malformed.
    """
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    model_type, _ = ARCHITECTURES[arch]
    n_experts = gf.get_int(f"{arch}.expert_count", 0)
    if n_experts and arch not in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"{gf.path}: {arch!r} with experts is not supported; mixture-of-experts "
                                    f"architectures: {', '.join(sorted(MOE_MODEL_TYPES))}")
    if n_experts:
        model_type = MOE_MODEL_TYPES[arch]
    if "token_embd.weight" not in gf.tensors or len(gf.tensor_shape("token_embd.weight")) != 2:
        raise GGUFError(f"{gf.path}: tensor 'token_embd.weight' is missing or not a matrix")
    vocab, hidden = gf.tensor_shape("token_embd.weight")
    n_head = gf.get_int(f"{arch}.attention.head_count", required=True)
    head_dim = gf.get_int(f"{arch}.attention.key_length")
    if head_dim is None:  # no explicit head size: hidden / heads, as HF defaults it
        if n_head <= 0 or hidden % n_head:
            raise GGUFError(f"{gf.path}: attention.head_count {n_head} does not divide the hidden size {hidden}")
        head_dim = hidden // n_head
    if n_head <= 0:
        raise GGUFError(f"{gf.path}: attention.head_count must be positive, got {n_head}")
    value_dim = gf.get_int(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{gf.path}: key_length {head_dim} != value_length {value_dim}; not supported")
    rope_dim = gf.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{gf.path}: partial rotary embeddings (rope.dimension_count {rope_dim} "
                                    f"< head dim {head_dim}) are not supported")
    raw: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": gf.get_int(f"{arch}.embedding_length", hidden),
        "intermediate_size": gf.get_int(f"{arch}.feed_forward_length",
                                        gf.get_int(f"{arch}.expert_feed_forward_length"), required=True),
        "num_hidden_layers": gf.get_int(f"{arch}.block_count", required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": gf.get_int(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": gf.get_int(f"{arch}.context_length", 4096),
        "rms_norm_eps": gf.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": gf.get_float(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": gf.get_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gf.get_int("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.get_int("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _file_dtype_name(gf),
        "gguf_file_type": gf.get_int("general.file_type"),
        "name_or_path": gf.get("general.name"),
    }
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if raw[key] <= 0:
            raise GGUFError(f"{gf.path}: metadata for {key} must be positive, got {raw[key]}")
    if n_head % raw["num_key_value_heads"]:
        raise GGUFError(f"{gf.path}: head_count {n_head} is not a multiple of head_count_kv {raw['num_key_value_heads']}")
    if raw["hidden_size"] != hidden:
        raise GGUFError(f"{gf.path}: embedding_length {raw['hidden_size']} but token_embd.weight has {hidden} columns")
    if n_experts:
        n_layers = raw["num_hidden_layers"]
        raw["num_local_experts"] = n_experts
        raw["num_experts_per_tok"] = gf.get_int(f"{arch}.expert_used_count", required=True)
        raw["moe_intermediate_size"] = gf.get_int(f"{arch}.expert_feed_forward_length", raw["intermediate_size"])
        # llama.cpp renormalises the top-k router weights for qwen3moe unless the file says otherwise
        # (Mixtral always, by its family).
        raw["norm_topk_prob"] = bool(gf.get(f"{arch}.expert_weights_norm", True))
        # GGUF has no layer pattern: a layer is sparse exactly when it has a router.
        raw["mlp_only_layers"] = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in gf.tensors]
    if model_type != "qwen2":  # Qwen2's q/k/v-only bias is fixed by its family; the rest say it by their tensors
        q_bias, o_bias = "blk.0.attn_q.bias" in gf.tensors, "blk.0.attn_output.bias" in gf.tensors
        raw["attention_bias"] = q_bias or o_bias
        raw["qkv_bias_only"] = q_bias and not o_bias
        raw["mlp_bias"] = "blk.0.ffn_up.bias" in gf.tensors
    raw["rope_scaling"] = _rope_scaling(gf, arch, raw)
    return ModelConfig.from_dict(raw, source=str(gf.path))


def _file_dtype_name(gf: GGUFFile) -> str:
    """The dtype "auto" resolves from: that of the float tensors, bf16 for a quantized file."""
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        if len(t.shape) >= 2:  # matrices decide; norms are F32 in every file
            name = QT(t.tensor_type).name
            counts[name] = counts.get(name, 0) + 1
    top = max(counts, key=counts.get) if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(top, "bfloat16")


def _rope_scaling(gf: GGUFFile, arch: str, raw: dict[str, Any]) -> dict[str, Any] | None:
    kind = gf.get(f"{arch}.rope.scaling.type")
    factor = gf.get_float(f"{arch}.rope.scaling.factor") or gf.get_float(f"{arch}.rope.scale_linear")
    if "rope_freqs.weight" in gf.tensors:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{gf.path}: rope_freqs.weight together with rope scaling {kind!r} is not supported")
        factors = gf.tensor("rope_freqs.weight", torch.float64).reshape(-1)
        return _llama3_scaling_from_factors(factors, raw, str(gf.path))
    if kind in (None, "none") and (factor is None or factor == 1.0):
        return None
    if kind in (None, "linear") and factor:
        return {"rope_type": "linear", "factor": factor}
    raise UnsupportedModelError(f"{gf.path}: rope scaling {kind!r} is not supported; supported: none, linear, "
                                "llama3 (rope_freqs.weight)")


def _llama3_scaling_from_factors(factors: torch.Tensor, raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The ``llama3`` rope_scaling whose per-frequency divisors equal ``rope_freqs.weight``.

    llama.cpp stores f_i = inv_freq_i / scaled_inv_freq_i: 1 for short wavelengths, ``factor`` for
    long ones, and 1 / ((1-s)/factor + s) between, where s = old_ctx/((high-low)*wavelen) - low/(high-low)
    is linear in 1/wavelen. Only (factor, old_ctx/(high-low), low/(high-low)) are identifiable, so we
    fit those and pick low=B, high=B+1, old_ctx=A; the result is then checked against the file.
    """
    hd = raw["head_dim"]
    inv_freq = 1.0 / (raw["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if factors.numel() != inv_freq.numel() or not torch.isfinite(factors).all() or (factors <= 0).any():
        raise GGUFError(f"{source}: rope_freqs.weight has {factors.numel()} entries (expected {inv_freq.numel()}) "
                        "or non-positive values")
    big = float(factors.max())
    if abs(big - 1.0) < 1e-6 and float(factors.min()) > 1 - 1e-6:
        return None
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    tol = 1e-4 * big
    is_high = (factors - 1).abs() < 1e-4  # short wavelengths, unscaled
    is_low = (factors - big).abs() < tol  # long wavelengths, divided by factor
    mid = ~(is_high | is_low)
    s = (1 / factors - 1 / big) / (1 - 1 / big)  # target smooth value of each frequency
    x_low_max = float(x[is_low].max()) if is_low.any() else 0.0
    x_high_min = float(x[is_high].min()) if is_high.any() else math.inf
    if int(mid.sum()) >= 2:  # least squares on s = A*x - B
        design = torch.stack((x[mid], -torch.ones_like(x[mid])), dim=1)
        a, b = torch.linalg.lstsq(design, s[mid].unsqueeze(1)).solution.squeeze(1).tolist()
    elif int(mid.sum()) == 1:  # a line through the one point that keeps the groups on their sides
        xm, sm = float(x[mid][0]), float(s[mid][0])
        a = 2 * max(sm / (xm - x_low_max), (1 - sm) / (x_high_min - xm) if math.isfinite(x_high_min) else 0.0)
        b = a * xm - sm
    else:  # a clean step: put the whole ramp between the two groups
        hi = x_high_min if math.isfinite(x_high_min) else 2 * x_low_max
        a = 3 / (hi - x_low_max)
        b = a * x_low_max + 1
    scaling = {"rope_type": "llama3", "factor": big, "low_freq_factor": b, "high_freq_factor": b + 1,
               "original_max_position_embeddings": a}
    if not (a > 0 and b > 0):
        raise UnsupportedModelError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling; not supported")
    from ember.models import rope_inv_freq

    probe = ModelConfig(head_dim=hd, num_attention_heads=1, hidden_size=hd, rope_theta=raw["rope_theta"],
                        rope_scaling=scaling)
    got = inv_freq / rope_inv_freq(probe).double()
    worst = float(((got - factors) / factors).abs().max())
    if worst > 1e-4:
        raise UnsupportedModelError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling "
                                    f"(best fit is off by {worst:.2g}); not supported")
    return scaling


# ==================================================================== weights


def gguf_tensor_name_map(gf: GGUFFile, cfg: ModelConfig) -> dict[str, list[str]]:
    """GGUF tensor name -> the Ember/HF parameter name(s) it fills, for every weight tensor in the file.

    A stacked expert tensor (``blk.N.ffn_up_exps.weight``, (E, out, in)) fills one parameter per expert,
    listed in expert order; every other tensor fills exactly one.

    Raises:
        GGUFError: a tensor whose name Ember does not know (naming the first few).
    """
    mapping: dict[str, list[str]] = {}
    unknown: list[str] = []
    for name in gf.tensors:
        if name in CONFIG_TENSORS:
            continue
        if name in GLOBAL_TENSORS:
            mapping[name] = [GLOBAL_TENSORS[name]]
            continue
        m = _LAYER_NAME.fullmatch(name)
        e = _EXPERT_NAME.fullmatch(name)
        if m and int(m.group(1)) < cfg.num_hidden_layers and m.group(2) in LAYER_TENSORS:
            mapping[name] = [f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"]
        elif m and int(m.group(1)) < cfg.num_hidden_layers and m.group(2) in EXPERT_TENSORS and m.group(3) == "weight":
            mapping[name] = [f"model.layers.{m.group(1)}.mlp.experts.{i}.{EXPERT_TENSORS[m.group(2)]}.weight"
                             for i in range(cfg.num_local_experts)]
        elif e and int(e.group(1)) < cfg.num_hidden_layers:
            mapping[name] = [f"model.layers.{e.group(1)}.mlp.experts.{e.group(3)}.{e.group(2)}_proj.weight"]
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{gf.path}: {len(unknown)} tensor(s) Ember does not know for {gf.architecture!r}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return mapping


def load_gguf_model(path: str | os.PathLike | GGUFFile, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = "auto") -> "Transformer":  # noqa: F821
    """Build a :class:`~ember.models.Transformer` on the meta device and fill it from a GGUF file.

    Float tensors already in ``dtype`` stay zero-copy views over the memory map (CPU); quantized ones
    are dequantized on ``device`` to ``dtype``. Stacked expert tensors are decoded once and each
    expert's parameter is a view into the result.

    Args:
        path: a ``.gguf`` file (or an open :class:`GGUFFile`).
        device: where the weights go ("cpu", "cuda", "cuda:1").
        dtype: "auto" (F32 file -> fp32, F16 -> fp16, BF16 and quantized -> bf16, each subject to what the
            device runs natively, as for safetensors), "bf16", "fp16", "fp32" or a torch dtype.
    Raises:
        GGUFError / UnsupportedGGUFTypeError / UnsupportedModelError, naming the file and tensor.
    """
    from ember.loading import DTYPE_NAMES, resolve_dtype
    from ember.models import Transformer

    gf = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    cfg = config_from_gguf(gf)
    device = torch.device(device)
    dt = resolve_dtype(dtype, DTYPE_NAMES.get(cfg.torch_dtype, torch.bfloat16), device)
    _, permuted = ARCHITECTURES[gf.architecture]
    names = gguf_tensor_name_map(gf, cfg)

    with torch.device("meta"):
        model = Transformer(cfg)
    ignore = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in ignore}
    source_of = {target: g for g, targets in names.items() for target in targets}
    missing, unexpected = sorted(set(expected) - set(source_of)), sorted(set(source_of) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            shown = list(dict.fromkeys(source_of[u] for u in unexpected))
            parts.append(f"unexpected {len(shown)}: {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}")
        raise GGUFError(f"{gf.path}: tensors do not match the model its metadata describes: {'; '.join(parts)}")

    state: dict[str, torch.Tensor] = {}
    kept_quantized: dict[str, tuple[Any, torch.Tensor]] = {}  # Linear path -> (ggml type, raw rows)
    for gname, targets in names.items():
        m = _LAYER_NAME.fullmatch(gname)
        kind = m.group(2) if m else None
        stacked = kind in EXPERT_TENSORS
        want = tuple(expected[targets[0]].shape)
        want = (len(targets), *want) if stacked else want
        shape = gf.tensor_shape(gname)
        if shape != want:
            raise GGUFError(f"{gf.path}: tensor {gname!r} ({targets[0]}{', ...' if stacked else ''}) "
                            f"has shape {list(shape)}, the metadata implies {list(want)}")
        heads = None
        if permuted and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
        qtype = QT(gf.tensors[gname].tensor_type)
        owner = targets[0].rsplit(".", 1)[0]
        if (qtype in EXACT_QUANT_LINEARS and not stacked and targets[0].endswith(".weight")
                and isinstance(model.get_submodule(owner), torch.nn.Linear)):
            kept_quantized[owner] = (qtype, gf.raw(gname, heads).to(device))
            continue
        w = gf.tensor(gname, dt, device, unpermute_heads=heads)
        if stacked:
            state.update((target, w[i]) for i, target in enumerate(targets))  # views of one decoded stack
        else:
            state[targets[0]] = w
    for owner, (qtype, raw) in kept_quantized.items():
        model.set_submodule(owner, EXACT_QUANT_LINEARS[qtype](raw, state.pop(f"{owner}.bias", None), dt))
    swapped = tuple(f"{owner}." for owner in kept_quantized)
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result
    assert all(k in ignore or k.startswith(swapped) for k in result.missing_keys), result
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    model.eval().requires_grad_(False)
    return model


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = "auto"):
    """Model and tokenizer from one GGUF file, parsing its header once.

    Returns:
        ``(Transformer, Tokenizer)``.
    """
    from ember.tokenizer import Tokenizer

    gf = GGUFFile.open(path)
    tokenizer = Tokenizer.from_gguf(gf)
    return load_gguf_model(gf, device, dtype), tokenizer


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file named ``*.gguf`` or starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ==================================================================== tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's pre-tokenizer table).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "gpt-2": None,  # None: GPT-2's own regex (ByteLevel use_regex)
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp looks a whole pre-tokenized word up in the vocabulary before merging for these.
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral", "llama4"}
# Control tokens llama.cpp treats as end of generation by their text (besides eos/eot/eom ids).
_END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<|return|>", "<end_of_utterance>")


@dataclass
class GGUFTokenizerSpec:
    """Everything :class:`ember.tokenizer.Tokenizer` needs, read from ``tokenizer.*`` metadata."""

    json: dict[str, Any]  # a tokenizer.json document
    special_tokens: dict[str, str]  # bos_token/eos_token/unk_token/pad_token -> text
    eos_token_ids: list[int]
    chat_templates: dict[str, str]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the rest to U+0100+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spm_merges(tokens: list[str], scores: list[float], usable: list[bool]) -> list[list[str]]:
    """BPE merges that reproduce SentencePiece's score-greedy merging.

    SentencePiece BPE repeatedly joins the adjacent pair whose union has the highest score. As a
    ranked merge list: every split (left, right) of a usable token into two usable tokens, best union
    score first; ties ordered by longer left piece, then longer right piece, then token order, then
    the pieces' ids (the order HF's converter emits, so both build the same tokenizer).
    """
    ids = {tok: i for i, tok in enumerate(tokens) if usable[i]}
    found: list[tuple[float, int, int, int, str, str]] = []
    for tok, i in ids.items():
        local = []
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                local.append((ids[left], ids[right], left, right))
        local.sort()
        found.extend((scores[i], len(left), len(right), n, left, right)
                     for n, (_, _, left, right) in enumerate(local))
    # Python's sort is stable and reverse=True keeps equal items in order: sort on the key only.
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [[left, right] for *_, left, right in found]


def tokenizer_spec(gf: GGUFFile) -> GGUFTokenizerSpec:
    """Build the tokenizer a GGUF file describes.

    Raises:
        TokenizerError: no vocabulary, an unsupported ``tokenizer.ggml.model``, or inconsistent arrays.
    """
    src = gf.path
    kind = gf.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{src}: no tokenizer in this GGUF file (metadata 'tokenizer.ggml.model' is missing)")
    tokens = gf.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{src}: metadata 'tokenizer.ggml.tokens' is missing or empty")
    n = len(tokens)
    types = gf.get("tokenizer.ggml.token_type") or [NORMAL] * n
    if len(types) != n:
        raise TokenizerError(f"{src}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def token_id(key: str) -> int | None:
        i = gf.get_int(f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= i < n:
            raise TokenizerError(f"{src}: tokenizer.ggml.{key} = {i} is outside the vocabulary (0..{n - 1})")
        return i

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    if unk is None and kind == "llama":
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    pre = gf.get("tokenizer.ggml.pre", "default")

    if kind == "llama":
        add_bos_default = True
        scores = gf.get("tokenizer.ggml.scores") or [-float(i) for i in range(n)]
        if len(scores) != n:
            raise TokenizerError(f"{src}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        space_prefix = bool(gf.get("tokenizer.ggml.add_space_prefix", True))
        vocab = {tok: i for i, tok in enumerate(tokens)}  # a repeated spelling maps to its last id, as in llama.cpp
        model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                 "merges": _spm_merges(tokens, scores, [t == NORMAL for t in types])}
        # llama.cpp escapes spaces as U+2581 and, with add_space_prefix, puts one before the text and
        # after every special token: the legacy HF Llama normalizer, applied per added-token split.
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
                      if space_prefix else replace)
        pre_tokenizer = None
        decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]
        if space_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder = {"type": "Sequence", "decoders": decoders}
    elif kind == "gpt2":
        add_bos_default = pre in _IGNORE_MERGES_PRE  # Llama 3 style vocabularies start with BOS
        raw_merges = gf.get("tokenizer.ggml.merges", [])  # absent = none (a writer drops empty arrays)
        if not isinstance(raw_merges, list):
            raise TokenizerError(f"{src}: tokenizer.ggml.merges must be an array of strings")
        merges = []
        for k, m in enumerate(raw_merges):
            pair = m.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{src}: tokenizer.ggml.merges[{k}] = {m!r} is not 'left right'")
            merges.append(pair)
        alphabet = _byte_level_alphabet()
        letters = set(alphabet.values())
        vocab = {}
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ == NORMAL and not set(tok) <= letters:  # a plain token written as raw text: respell it
                tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
            vocab[tok] = i
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": pre in _IGNORE_MERGES_PRE, "vocab": vocab, "merges": merges}
        normalizer = None
        if pre not in PRE_TOKENIZER_SPLITS:
            warnings.warn(f"{src}: unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's regex", stacklevel=2)
        split = PRE_TOKENIZER_SPLITS.get(pre)
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": split is None}
        pre_tokenizer = byte_level if split is None else {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}, byte_level]}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    else:
        raise TokenizerError(f"{src}: tokenizer model {kind!r} is not supported; supported: llama (SentencePiece BPE), "
                             "gpt2 (byte-level BPE)")

    # Control/unknown tokens (and the named specials) are matched whole and are "special"; user-defined
    # ones are matched whole but decode as text.
    named = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    special_ids = {i for i in named.values() if i is not None}
    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (CONTROL, UNKNOWN, USER_DEFINED) or i in special_ids:
            if vocab.get(tok) != i:  # a repeated spelling: the last id keeps the text
                continue
            special = typ != USER_DEFINED or i in special_ids
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special})

    add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(gf.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    post = None
    if add_bos or add_eos:
        # Written as JSON, not TemplateProcessing("<s> $A"), which cannot spell tokens holding ':' or spaces.
        head = [(tokens[bos], bos)] if add_bos else []
        tail = [(tokens[eos], eos)] if add_eos else []

        def template(seq: str) -> list[dict]:
            return [*({"SpecialToken": {"id": t, "type_id": 0}} for t, _ in head),
                    {"Sequence": {"id": seq, "type_id": 0}},
                    *({"SpecialToken": {"id": t, "type_id": 0}} for t, _ in tail)]

        post = {"type": "TemplateProcessing", "single": template("A"), "pair": template("A") + template("B"),
                "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in head + tail}}

    spec_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
                 "decoder": decoder, "model": model}

    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    eos_ids += [i for i, (t, typ) in enumerate(zip(tokens, types)) if typ == CONTROL and t in _END_OF_GENERATION]
    templates: dict[str, str] = {}
    if isinstance(tmpl := gf.get("tokenizer.chat_template"), str):
        templates["default"] = tmpl
    for name in gf.get("tokenizer.chat_templates") or []:
        if isinstance(t := gf.get(f"tokenizer.chat_template.{name}"), str):
            templates[name] = t
    return GGUFTokenizerSpec(
        json=spec_json,
        special_tokens={k: tokens[i] for k, i in named.items() if i is not None},
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        chat_templates=templates,
    )
