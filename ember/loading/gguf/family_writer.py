"""Writing gpt-oss and Gemma 3 as llama.cpp's ``gpt-oss`` / ``gemma3`` GGUF (what :mod:`.families` reads back).

The same facts as the reader, inverted: names from :data:`~ember.loading.gguf.families.FAMILY_TENSORS`;
Gemma's norms stored as ``1 + w``; gpt-oss's fused experts (gate/up interleaved, x @ W) split into
``ffn_{gate,up,down}_exps`` (E, out, in) with their biases; the metadata keys ``convert_hf_to_gguf.py``
writes. What llama.cpp fixes per architecture (gpt-oss's SwiGLU clamp, Gemma 3's query scale) must hold for
the model, or it is refused; a layer pattern other than llama.cpp's default is written as
``attention.sliding_window_pattern`` (per-layer bools, which llama.cpp reads).
"""

from __future__ import annotations

from typing import Callable, Iterator

import gguf
import torch
from gguf import GGMLQuantizationType as QT

from ember.config import ModelConfig
from ember.errors import UnsupportedModelError
from ember.loading.gguf.families import FAMILY_TENSORS, NORM_PLUS_ONE, PARAMS
from ember.models.gpt_oss import GptOssExperts

WRITE_FAMILIES = {"gpt_oss": "gpt-oss", "gemma3_text": "gemma3"}
Thunk = Callable[[], torch.Tensor]


def family_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's name for ``cfg``'s family, after checking what the architecture fixes.

    Raises:
        UnsupportedModelError: a setting llama.cpp's architecture cannot express.
    """
    arch = WRITE_FAMILIES[cfg.model_type]
    if arch == "gpt-oss" and (cfg.swiglu_limit != 7.0 or abs(cfg.swiglu_alpha - 1.702) > 1e-9):
        raise UnsupportedModelError(f"gpt-oss with swiglu_limit {cfg.swiglu_limit} / alpha {cfg.swiglu_alpha} cannot "
                                    "be written as llama.cpp's 'gpt-oss', which fixes them at 7.0 / 1.702")
    if arch == "gemma3":
        want = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 62 else cfg.head_dim
        if cfg.query_pre_attn_scalar != want or cfg.attn_logit_softcapping:
            raise UnsupportedModelError(f"Gemma 3 with query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp "
                                        f"uses {want}) or attention soft-capping cannot be written as 'gemma3'")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    allowed = ("yarn",) if arch == "gpt-oss" else ("linear",)
    if kind not in (None, "default", *allowed):
        raise UnsupportedModelError(f"rope scaling {kind!r} cannot be written as llama.cpp's {arch!r}")
    if kind == "yarn" and cfg.rope_scaling.get("truncate", True):
        raise UnsupportedModelError("gpt-oss's GGUF implies untruncated YaRN (truncate: false), as released")
    return arch


def hub_to_ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The hub's MXFP4 (blocks (..., n, 16): element 2j in byte j's low nibble; scales (..., n)) as ggml MXFP4
    rows (..., n * 17): per block the same E8M0 byte, then element j in byte j's low nibble, j + 16 in its high."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # (..., n, 32) in element order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), qs), dim=-1).flatten(-2)


def _mxfp4_experts(mod: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """llama.cpp's ``ffn_{gate,up,down}_exps`` MXFP4 rows (E, out, row_bytes) of experts held in MXFP4 (the hub's
    layout or a GGUF file's), for writing them as stored, as the converter does; None for other experts."""
    if hasattr(mod, "gate_up_proj_blocks"):  # Mxfp4Experts: gate/up rows interleaved
        gate_up = hub_to_ggml_mxfp4(mod.gate_up_proj_blocks, mod.gate_up_proj_scales)
        return {"gate_exps_mxfp4": gate_up[:, ::2], "up_exps_mxfp4": gate_up[:, 1::2],
                "down_exps_mxfp4": hub_to_ggml_mxfp4(mod.down_proj_blocks, mod.down_proj_scales)}
    if hasattr(mod, "ffn_gate_exps") and mod.ffn_gate_exps[0].qtype == gguf.GGMLQuantizationType.MXFP4:
        return {f"{k}_exps_mxfp4": torch.stack([lin.qweight for lin in getattr(mod, f"ffn_{k}_exps")])
                for k in ("gate", "up", "down")}
    return None


def expert_sources(mod: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """HF's fused float tensors of any gpt-oss experts module (float or GGUF blocks), or its MXFP4 rows as
    stored (:func:`_mxfp4_experts`), with the biases; None for any other module."""
    if not isinstance(mod, GptOssExperts):
        return None
    if (rows := _mxfp4_experts(mod)) is not None:
        out = rows
    elif hasattr(mod, "dequantized"):  # Mxfp4Experts: the hub's blocks
        out = mod.dequantized(torch.float32)
    elif hasattr(mod, "ffn_gate_exps"):  # GGUFGptOssExperts: llama.cpp's blocks
        stack = lambda key: torch.stack([lin.dequantize(torch.float32) for lin in getattr(mod, key)])  # noqa: E731
        gate, up = stack("ffn_gate_exps"), stack("ffn_up_exps")
        out = {"gate_up_proj": torch.stack((gate, up), dim=2).flatten(1, 2).transpose(1, 2),
               "down_proj": stack("ffn_down_exps").transpose(1, 2)}
    else:
        out = {"gate_up_proj": mod.gate_up_proj.detach(), "down_proj": mod.down_proj.detach()}
    return {**out, "gate_up_proj_bias": mod.gate_up_proj_bias.detach(), "down_proj_bias": mod.down_proj_bias.detach()}


def family_tensors(arch: str, name: str, shape: tuple[int, ...], thunk: Thunk,
                   ) -> Iterator[tuple[str, tuple[int, ...], Thunk, QT | None]]:
    """The GGUF tensor(s) of Ember parameter ``name``: (GGUF name, PyTorch shape, thunk, forced ggml type)."""
    for gname, gshape, gthunk in _family_tensors(arch, name, shape, thunk):
        yield gname, gshape, gthunk, None
    if name.endswith("_exps_mxfp4"):  # (E, out, row_bytes) of MXFP4 blocks, written as they are
        layer, kind = name.split(".")[2], name.split(".")[-1].split("_")[0]
        elements = (shape[0], shape[1], shape[2] // 17 * 32)
        yield f"blk.{layer}.ffn_{kind}_exps.weight", elements, thunk, QT.MXFP4


def _family_tensors(arch: str, name: str, shape: tuple[int, ...], thunk: Thunk,
                    ) -> Iterator[tuple[str, tuple[int, ...], Thunk]]:
    if name == "model.norm.weight":
        shift = arch in NORM_PLUS_ONE
        yield "output_norm.weight", shape, (lambda: thunk().float() + 1) if shift else thunk
        return
    parts = name.split(".")
    layer, rest = int(parts[2]), ".".join(parts[3:])
    if rest.startswith("mlp.experts.") and arch == "gpt-oss":
        E, kind = shape[0], parts[-1]
        if kind.endswith("_exps_mxfp4"):
            return  # family_tensors passes these through
        if kind == "gate_up_proj":  # (E, H, 2I): columns 2j gate j, 2j+1 up j
            half = (E, shape[2] // 2, shape[1])
            yield f"blk.{layer}.ffn_gate_exps.weight", half, (lambda: thunk()[:, :, ::2].transpose(1, 2))
            yield f"blk.{layer}.ffn_up_exps.weight", half, (lambda: thunk()[:, :, 1::2].transpose(1, 2))
        elif kind == "gate_up_proj_bias":
            yield f"blk.{layer}.ffn_gate_exps.bias", (E, shape[1] // 2), (lambda: thunk()[:, ::2])
            yield f"blk.{layer}.ffn_up_exps.bias", (E, shape[1] // 2), (lambda: thunk()[:, 1::2])
        elif kind == "down_proj":  # (E, I, H) -> (E, H, I)
            yield f"blk.{layer}.ffn_down_exps.weight", (E, shape[2], shape[1]), (lambda: thunk().transpose(1, 2))
        else:
            yield f"blk.{layer}.ffn_down_exps.bias", shape, thunk
        return
    whole = {v: k for k, v in PARAMS.get(arch, {}).items()}
    if rest in whole:
        yield f"blk.{layer}.{whole[rest]}", shape, thunk
        return
    module, leaf = rest.rsplit(".", 1)
    keys = {v: k for k, v in FAMILY_TENSORS[arch].items()}
    if module not in keys:
        raise UnsupportedModelError(f"tensor {name!r} has no GGUF name for {arch!r}; the model cannot be written")
    if arch in NORM_PLUS_ONE and rest.endswith("norm.weight"):
        yield f"blk.{layer}.{keys[module]}.{leaf}", shape, (lambda: thunk().float() + 1)
    else:
        yield f"blk.{layer}.{keys[module]}.{leaf}", shape, thunk


def add_family_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    """The ``{arch}.*`` keys the converter writes for gpt-oss / Gemma 3 (the common ones are written already)."""
    n = cfg.num_hidden_layers
    swa = [cfg.layer_types[i] == "sliding_attention" for i in range(n)] if cfg.layer_types else [False] * n
    period = 2 if arch == "gpt-oss" else 6
    if any(swa) and swa != [i % period < period - 1 for i in range(n)]:
        w.add_sliding_window_pattern(swa)
    if any(swa):
        w.add_sliding_window(cfg.sliding_window)
    scaling = cfg.rope_scaling or {}
    if arch == "gpt-oss":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if scaling.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(scaling["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast", 32.0)))
            w.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow", 1.0)))
    else:
        w.add_rope_freq_base_swa(float(cfg.rope_local_base_freq or 10000.0))
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
