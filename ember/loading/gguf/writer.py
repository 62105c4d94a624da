"""Writing a model as a GGUF file that llama.cpp and Ollama load: metadata, vocabulary, ggml tensors.

What llama.cpp's converter (``convert_hf_to_gguf.py``) and ``llama-quantize`` do, from an Ember model:

- ``general.architecture`` and ``{arch}.*`` hyper-parameters; Mistral and Mixtral are llama.cpp's
  ``llama`` (Mixtral with ``expert_count``), Qwen2/3 ``qwen2``/``qwen3``, Qwen3-MoE ``qwen3moe``;
  Llama 3.1 RoPE scaling becomes a ``rope_freqs.weight`` tensor of per-frequency divisors, linear
  scaling ``rope.scaling.*`` keys; a tied LM head is simply not written;
- ``tokenizer.ggml.*`` from the tokenizer (:mod:`~ember.loading.gguf.vocab_metadata`);
- tensor names ``token_embd``, ``blk.N.attn_q``, ... (the reader's tables in :mod:`.config`, inverted);
  experts stacked per layer as ``ffn_{gate,up,down}_exps`` (E, out, in); for ``llama`` the rows of
  ``attn_q``/``attn_k`` (and their biases) permuted per head from HF's half-split RoPE layout to
  ggml's interleaved pairs, (h, 2, hd/2) -> (h, hd/2, 2), the inverse of what the reader undoes;
- tensor types by :func:`tensor_type`, llama.cpp's rules (see :data:`GGUF_TYPES`): 1-D tensors and MoE
  routers stay F32; ``q4_k_m``/``q5_k_m`` are llama.cpp's mixes (Q6_K for ``output``, and for
  ``attn_v`` and ``ffn_down`` in the first and last eighth of the layers and every third between;
  with 8 experts ``attn_v``/``attn_k`` Q8_0 under every type); a row length the block does not divide falls back as
  llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).

Q8_0/Q4_0/Q5_0/Q5_1 blocks come from ``gguf.quants``; the K-quants from :mod:`.kquants`. The file is
streamed tensor by tensor into a temp file beside the target, fsynced and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from ember.checkpoint_io import fsync_dir
from ember.config import ModelConfig
from ember.errors import OutputExistsError, UnsupportedModelError
from ember.loading.gguf.config import EXPERT_TENSORS, GLOBAL_TENSORS, LAYER_TENSORS
from ember.loading.gguf.family_writer import (
    WRITE_FAMILIES, add_family_hparams, expert_sources, family_architecture, family_tensors,
)
from ember.loading.gguf.kquants import quantize_k
from ember.loading.gguf.vocab_metadata import vocab_metadata
from ember.models import Transformer, rope_inv_freq
from ember.quant.base import QuantizedLinear
from ember.tokenizer import Tokenizer

# --to name -> (base ggml type, general.file_type). The K-mixes' per-tensor exceptions are in tensor_type.
GGUF_TYPES: dict[str, tuple[QT, FT]] = {
    "f32": (QT.F32, FT.ALL_F32),
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, FT.MOSTLY_Q4_0),
    "q4_k_m": (QT.Q4_K, FT.MOSTLY_Q4_K_M),
    "q5_k_m": (QT.Q5_K, FT.MOSTLY_Q5_K_M),
    "q6_k": (QT.Q6_K, FT.MOSTLY_Q6_K),
}
# Ember/HF model_type -> llama.cpp architecture (what the reader maps back).
WRITE_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                       "qwen3_moe": "qwen3moe"}
PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp's llama arch runs q/k with interleaved RoPE pairs
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
_HF_TO_GGUF_LAYER = {v: k for k, v in LAYER_TENSORS.items()}
_HF_TO_GGUF_GLOBAL = {v: k for k, v in GLOBAL_TENSORS.items()}
_EXPERT_PROJ = {v: k for k, v in EXPERT_TENSORS.items()}  # gate_proj -> ffn_gate_exps
_ELEMENTS_PER_STEP = 1 << 22  # quantized at once: a few tens of MB of fp32 temporaries, whatever the row length


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # PyTorch order
    qtype: QT
    produce: Callable[[], torch.Tensor]  # fp32 (or the source float dtype), already permuted


@dataclass
class GGUFWriteInfo:
    """What :func:`write_gguf` wrote."""

    path: Path
    architecture: str
    file_type: str
    tensors: int
    bytes: int  # tensor data bytes
    types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v/ffn_down get more bits in the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], to: str, cfg: ModelConfig) -> QT:
    """The ggml type llama.cpp's quantizer gives tensor ``name`` (GGUF name, PyTorch shape) under ``to``."""
    base, _ = GGUF_TYPES[to]
    if len(shape) < 2 or ".ffn_gate_inp." in name or name == "rope_freqs.weight" or name.endswith(".bias"):
        return QT.F32
    if base in (QT.F32, QT.F16, QT.BF16):
        return base
    qtype = base
    kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    n_layers, n_experts = cfg.num_hidden_layers, cfg.num_local_experts or 0
    is_output = name == "output.weight" or (name == "token_embd.weight" and cfg.tie_word_embeddings)
    mix = to in ("q4_k_m", "q5_k_m")
    if is_output:
        qtype = QT.Q8_0 if base == QT.Q8_0 or shape[-1] % 256 else QT.Q6_K
    elif kind in ("attn_v", "attn_k") and n_experts == 8:  # every type: "bumping this to Q8_0 trades just ~128MB"
        qtype = QT.Q8_0
    elif mix and kind == "attn_v":
        qtype = QT.Q6_K if use_more_bits(layer, n_layers) else base
    elif mix and kind in ("ffn_down", "ffn_down_exps") and use_more_bits(layer, n_layers):
        qtype = QT.Q6_K
    elif to == "q4_k_m" and kind == "attn_output" and n_experts == 8:
        qtype = QT.Q5_K
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        qtype = _FALLBACK.get(qtype, QT.F16)
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
    return qtype


def encode(x: torch.Tensor, qtype: QT) -> np.ndarray:
    """A float tensor as the array GGUF stores for ``qtype`` (quantized: uint8 (..., row bytes)); uint8 data is
    taken as blocks of ``qtype`` already (gpt-oss's MXFP4 experts, passed through)."""
    if x.dtype == torch.uint8:
        return x.numpy()
    if qtype == QT.F32:
        return x.float().numpy()
    if qtype == QT.F16:
        return x.to(torch.float16).numpy()
    if qtype == QT.BF16:
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], n // block * type_size), dtype=np.uint8)
    step = max(1, _ELEMENTS_PER_STEP // n)
    for s in range(0, rows.shape[0], step):
        chunk = rows[s:s + step].float().numpy()
        out[s:s + step] = (quantize_k(chunk, qtype.name) if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K)
                                     else gguf.quants.quantize(chunk, qtype))
    return out.reshape(*lead, out.shape[-1])


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its ``llama`` arch: per head, rows (2, hd/2) -> (hd/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for an Ember model, or a clear refusal.

    Raises:
        UnsupportedModelError: a family (or a feature of it) GGUF's architectures here cannot express.
    """
    if cfg.model_type in WRITE_FAMILIES:  # gpt-oss, Gemma 3: ember.loading.gguf.family_writer
        return family_architecture(cfg)
    arch = WRITE_ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise UnsupportedModelError(f"writing GGUF for model_type {cfg.model_type!r} is not supported; supported: "
                                    f"{', '.join(sorted([*WRITE_ARCHITECTURES, *WRITE_FAMILIES]))}")
    if any(cfg.layer_window(i) for i in range(cfg.num_hidden_layers)):
        raise UnsupportedModelError(f"{cfg.model_type} with a sliding window cannot be written as llama.cpp's "
                                    f"{arch!r}, which attends to the whole context")
    if cfg.rotary_dim != cfg.head_dim:
        raise UnsupportedModelError("partial rotary embeddings cannot be written to GGUF here")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "linear", "llama3"):
        raise UnsupportedModelError(f"rope scaling {kind!r} cannot be written to GGUF here; supported: linear, llama3")
    return arch


def _float_sources(model: Transformer) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """Every weight as (HF name, shape, thunk giving a float tensor); quantized Linears are dequantized, and
    gpt-oss experts in any layout give HF's fused float tensors."""
    done: tuple[str, ...] = ()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if done and prefix.startswith(done):
            continue
        if (fused := expert_sources(mod)) is not None:
            done += (prefix,)
            for k, t in fused.items():
                yield f"{prefix}{k}", tuple(t.shape), (lambda t=t: t)
            continue
        if isinstance(mod, QuantizedLinear):
            yield f"{prefix}weight", (mod.out_features, mod.in_features), (lambda m=mod: m.dequantize(torch.float32))
            if getattr(mod, "bias", None) is not None:
                yield f"{prefix}bias", (mod.out_features,), (lambda m=mod: m.bias.detach())
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            yield f"{prefix}{p_name}", tuple(p.shape), (lambda t=p: t.detach())


def _layer_key(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _plan(model: Transformer, arch: str, to: str) -> list[_Planned]:
    """Every tensor to write, in file order, with its GGUF name, shape, type and a thunk for its data."""
    cfg = model.config
    permute = arch in PERMUTED_ARCHITECTURES
    planned: list[_Planned] = []
    stacked: dict[tuple[int, str], list[tuple[int, tuple[int, ...], Callable[[], torch.Tensor]]]] = {}

    def add(gname: str, shape: tuple[int, ...], produce: Callable[[], torch.Tensor], qtype: QT | None = None) -> None:
        planned.append(_Planned(gname, shape, qtype or tensor_type(gname, shape, to, cfg), produce))

    for name, shape, thunk in _float_sources(model):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp ties the head to token_embd when output.weight is absent
        if name in _HF_TO_GGUF_GLOBAL and not (arch in WRITE_FAMILIES.values() and name == "model.norm.weight"):
            add(_HF_TO_GGUF_GLOBAL[name], shape, thunk)
            continue
        if arch in WRITE_FAMILIES.values():
            for gname, gshape, gthunk, gtype in family_tensors(arch, name, shape, thunk):
                add(gname, gshape, gthunk, gtype)
            continue
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            raise UnsupportedModelError(f"tensor {name!r} has no GGUF name; the model cannot be written to GGUF")
        layer = int(parts[2])
        if parts[3:5] == ["mlp", "experts"] and len(parts) == 8 and parts[6] in _EXPERT_PROJ:
            # model.layers.N.mlp.experts.E.<proj>.weight -> one (E, out, in) stack per layer and projection
            stacked.setdefault((layer, _EXPERT_PROJ[parts[6]]), []).append((int(parts[5]), shape, thunk))
            continue
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module not in _HF_TO_GGUF_LAYER:
            raise UnsupportedModelError(f"tensor {name!r} has no GGUF name; the model cannot be written to GGUF")
        kind = _HF_TO_GGUF_LAYER[module]
        if permute and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
            thunk = (lambda t=thunk, h=heads: permute_rope_rows(t(), h))
        add(f"blk.{layer}.{kind}.{leaf}", shape, thunk)
    for (layer, kind), experts in stacked.items():
        experts.sort(key=lambda e: e[0])
        add(f"blk.{layer}.{kind}.weight", (len(experts), *experts[0][1]),
            lambda ex=experts: torch.stack([t() for _, _, t in ex]))
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        # llama.cpp divides each inverse frequency by rope_freqs[i] (the reader fits the scaling back)
        dim = cfg.head_dim
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        factors = (base / rope_inv_freq(cfg)).float()
        add("rope_freqs.weight", tuple(factors.shape), lambda f=factors: f)
    first = {"token_embd.weight": 0, "rope_freqs.weight": 1}
    planned.sort(key=lambda p: (first.get(p.name, 3 if p.name.startswith("output") else 2), _layer_key(p.name)))
    return planned


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.moe_intermediate_size if arch == "gpt-oss" else cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    if cfg.num_local_experts:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if arch in WRITE_FAMILIES.values():
        add_family_hparams(w, cfg, arch)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike, to: str = "f16",
               name: str | None = None, overwrite: bool = False,
               progress: Callable[[str, QT], None] | None = None) -> GGUFWriteInfo:
    """Write ``model`` and its tokenizer as one GGUF file that llama.cpp, Ollama and Ember load.

    Args:
        model: a loaded :class:`~ember.models.Transformer` (float or Ember-quantized Linears; quantized ones
            are dequantized and re-quantized).
        tokenizer: its tokenizer (BPE: byte-level or SentencePiece-style).
        path: the ``.gguf`` file to write (atomically: temp file beside it, fsync, rename).
        to: a key of :data:`GGUF_TYPES` ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k", ...).
        name: ``general.name`` (default: the model's ``name_or_path``).
        overwrite: replace an existing file.
        progress: called with (GGUF tensor name, ggml type) before each tensor is encoded.
    Returns:
        :class:`GGUFWriteInfo`.
    Raises:
        UnsupportedModelError / TokenizerError: something GGUF cannot express; OutputExistsError.
    """
    if to not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {to!r}; one of {', '.join(GGUF_TYPES)}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = model.config
    arch = gguf_architecture(cfg)
    vocab = vocab_metadata(tokenizer, cfg.vocab_size)
    planned = _plan(model, arch, to)
    _, file_type = GGUF_TYPES[to]

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name or str(cfg.extra.get("name_or_path") or cfg.model_type))
    w.add_file_type(int(file_type))
    if any(p.qtype not in (QT.F32, QT.F16, QT.BF16) for p in planned):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(w, cfg, arch)
    vocab.add_to(w)
    total = 0
    for p in planned:
        block, type_size = gguf.GGML_QUANT_SIZES[p.qtype]
        nbytes = int(np.prod(p.shape[:-1], dtype=np.int64)) * (p.shape[-1] // block) * type_size
        total += nbytes
        if p.qtype in (QT.F32, QT.F16):
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.qtype == QT.F32 else np.float16), nbytes)
        else:  # BF16 as uint16 elements, quantized as uint8 rows of blocks: the shape given is the element shape
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        w.open_output_file(Path(tmp))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in planned:
            if progress is not None:
                progress(p.name, p.qtype)
            with torch.no_grad():
                w.write_tensor_data(encode(p.produce().cpu(), p.qtype))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    types: dict[str, int] = {}
    for p in planned:
        types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    return GGUFWriteInfo(target, arch, to, len(planned), total, types)
