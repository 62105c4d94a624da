"""gpt-oss MXFP4 checkpoints as the hub publishes them: reading them as stored, and writing them from float ones.

A published gpt-oss folder says ``"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert":
[...]}`` in config.json and stores each layer's experts as ``mlp.experts.{gate_up_proj,down_proj}_{blocks,scales}``
(uint8) plus float ``*_bias``; attention, router, embeddings and head stay float (see :mod:`ember.quant.mxfp4`
for the format). Loading swaps each layer's :class:`~ember.models.gpt_oss.GptOssExperts` for an
:class:`~ember.quant.mxfp4.Mxfp4Experts` and reads the uint8 tensors as they are (on CPU: views of the mapped
files), so the experts are never expanded to floats in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.checkpoint_io import save_hf_checkpoint, side_files
from ember.config import ModelConfig
from ember.errors import CheckpointError, QuantizationError
from ember.loading.dtypes import resolve_dtype
from ember.loading.moe import expert_layout_view
from ember.loading.safetensors import Checkpoint, load_weights
from ember.models import Transformer
from ember.models.gpt_oss import GptOssExperts
from ember.quant.mxfp4 import Mxfp4Experts, expected_expert_shapes

HF_SECTION = "quantization_config"
# what the published checkpoints keep in float (HF's names)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def experts_only(cfg) -> bool:
    """Whether MXFP4 covers only the experts of this model (gpt-oss as published: attention, router, embeddings
    and head stay in the compute dtype), rather than every Linear (``--quant mxfp4`` on another family)."""
    return cfg.model_type == "gpt_oss"


def is_mxfp4_checkpoint(extra: dict[str, Any]) -> bool:
    """Whether a config.json's unmodelled keys (``ModelConfig.extra``) say ``quant_method: mxfp4``."""
    section = extra.get(HF_SECTION)
    return isinstance(section, dict) and section.get("quant_method") == "mxfp4"


def hf_quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of a published gpt-oss checkpoint."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(NOT_CONVERTED)}


def _expert_modules(model: nn.Module) -> list[tuple[str, GptOssExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GptOssExperts)]


def load_mxfp4_weights(model: nn.Module, ckpt, dtype: torch.dtype, device: torch.device) -> None:
    """Fill a meta-device gpt-oss model from a published MXFP4 checkpoint, experts as stored.

    Raises:
        CheckpointError: not a gpt-oss model, or an expert tensor missing, mis-shaped or not uint8 (naming the
            file and tensor).
    """
    experts = _expert_modules(model)
    if not experts:
        raise CheckpointError(f"{ckpt.folder}: quantization_config says mxfp4, which Ember reads for gpt-oss "
                              f"experts only; model_type {model.config.model_type!r} has none")
    names = set(ckpt.names())
    for prefix, m in experts:
        shapes = expected_expert_shapes(m.num_experts, m.hidden_size, m.intermediate_size)
        tensors = {}
        for part, (shape, kind) in shapes.items():
            key = f"{prefix}.{part}"
            if key not in names:
                other = f"{prefix}.{part.rsplit('_', 1)[0]}" if kind == "uint8" else None
                hint = (f" (it holds float {other!r}: drop quantization_config from config.json or re-run "
                        "`ember quantize --to mxfp4`)" if other in names else "")
                raise CheckpointError(f"{ckpt.folder}: MXFP4 checkpoint lacks tensor {key!r}{hint}")
            info = ckpt.info(key)
            if tuple(info.shape) != shape or (kind == "uint8") != (info.dtype == torch.uint8):
                raise CheckpointError(f"{info.file}: tensor {key!r} is {info.dtype} {list(info.shape)}; MXFP4 experts "
                                      f"of this config.json need {'uint8' if kind == 'uint8' else 'float'} "
                                      f"{list(shape)} (blocks: 16 bytes = 32 E2M1 codes per E8M0 scale)")
            tensors[part] = torch.empty(shape, dtype=torch.uint8 if kind == "uint8" else dtype, device="meta")
        model.set_submodule(prefix, Mxfp4Experts(m.num_experts, m.hidden_size, m.intermediate_size, m.alpha,
                                                 m.limit, tensors))
    ignore = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
    load_weights(model, ckpt, dtype, device, ignore=ignore)


def quantize_experts(model: nn.Module) -> int:
    """Swap every float :class:`GptOssExperts` of ``model`` for MXFP4 ones, layer by layer (each float copy is
    released once its replacement exists). Returns the number of layers swapped."""
    experts = _expert_modules(model)
    for prefix, m in experts:
        if not isinstance(m, Mxfp4Experts):
            model.set_submodule(prefix, Mxfp4Experts.from_float(m))
    return len(experts)


def quantize_gpt_oss_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, device: str = "cpu",
                                max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> tuple[Path, dict]:
    """Write a float gpt-oss folder as the hub publishes gpt-oss: MXFP4 experts, the rest as stored, and a
    ``quantization_config`` in config.json (atomic folder write; tokenizer and chat template copied)."""
    folder = Path(src)
    raw = json.loads((folder / "config.json").read_text())
    if is_mxfp4_checkpoint(raw):
        raise QuantizationError(f"{folder}: already MXFP4; quantize the float checkpoint instead")
    # the float model as ember.loading.load_model builds it (that function dispatches here, so it is not called)
    cfg = ModelConfig.from_file(folder)
    ckpt = expert_layout_view(Checkpoint(folder), cfg)
    dtype = resolve_dtype("auto", ckpt.dtype(), torch.device(device))
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, ckpt, dtype, torch.device(device), ignore=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    layers = quantize_experts(model)
    if not layers:
        raise QuantizationError(f"{folder}: model_type {raw.get('model_type')!r} has no gpt-oss experts")
    raw[HF_SECTION] = hf_quantization_config()
    config = (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode()
    before = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    dest = save_hf_checkpoint(dest, model, tokenizer_files=side_files(folder), max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite, extra_files={"config.json": config})
    after = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    section = {"method": "mxfp4", "lm_head": "none"}
    return dest, {"bytes_before": before, "bytes_after": after, "quantized": layers,
                  "kept": list(NOT_CONVERTED), "section": section}
