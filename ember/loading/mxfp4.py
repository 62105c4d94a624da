"""gpt-oss MXFP4 checkpoints as the hub publishes them: reading them as stored, and writing them from float ones.

A published gpt-oss folder says ``"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert":
[...]}`` in config.json and stores each layer's experts as ``mlp.experts.{gate_up_proj,down_proj}_{blocks,scales}``
(uint8) plus float ``*_bias``; attention, router, embeddings and head stay float (see :mod:`ember.quant.mxfp4`
for the format). Loading swaps each layer's :class:`~ember.models.gpt_oss.GptOssExperts` for an
:class:`~ember.quant.mxfp4.Mxfp4Experts` and reads the uint8 tensors as they are (on CPU: views of the mapped
files), so the experts are never expanded to floats in memory.

``mxfp4+int8`` (:data:`MIXED`) is the same with every other Linear (attention, an untied head) in int8, as
llama.cpp's ``MXFP4_MOE`` type keeps them in 8 bits (Q8_0) and its router and sinks in float: on an MXFP4 folder
``--quant int8`` (or int4/nf4) means that too, the experts staying as stored. Such a folder written by ``ember
quantize`` carries both sections (``quantization_config`` for the experts, Ember's ``quantization`` for the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.errors import CheckpointError, QuantizationError
from ember.loading.safetensors import load_weights
from ember.models.gpt_oss import GptOssExperts
from ember.quant.mxfp4 import Mxfp4Experts, expected_expert_shapes

HF_SECTION = "quantization_config"
# what the published checkpoints keep in float (HF's names)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
MIXED = "mxfp4+int8"  # gpt-oss: MXFP4 experts, every other Linear int8 (module docstring)
REST_MODES = ("int8", "int4", "nf4")  # what the other Linears of an MXFP4 gpt-oss may be quantized to


def experts_only(cfg) -> bool:
    """Whether MXFP4 covers only the experts of this model (gpt-oss as published: attention, router, embeddings
    and head stay in the compute dtype), rather than every Linear (``--quant mxfp4`` on another family)."""
    return cfg.model_type == "gpt_oss"


def is_mxfp4_checkpoint(extra: dict[str, Any]) -> bool:
    """Whether a config.json's unmodelled keys (``ModelConfig.extra``) say ``quant_method: mxfp4``."""
    section = extra.get(HF_SECTION)
    return isinstance(section, dict) and section.get("quant_method") == "mxfp4"


def mxfp4_experts_wanted(cfg, quant: str | None) -> bool:
    """Whether loading ``cfg`` with ``quant`` gives gpt-oss MXFP4 experts (as stored, or quantized from floats)."""
    q = (quant or "none").lower()
    return is_mxfp4_checkpoint(cfg.extra) or (experts_only(cfg) and q in ("mxfp4", MIXED))


def rest_mode(cfg, quant: str | None) -> str | None:
    """The mode of the Linears other than the experts when ``quant`` loads an MXFP4 gpt-oss (None: float, or
    as a stored ``quantization`` section says).

    Raises:
        QuantizationError: ``mxfp4+int8`` on a model without gpt-oss experts.
    """
    q = (quant or "none").lower()
    if q == MIXED:
        if not experts_only(cfg):
            raise QuantizationError(f"--quant {MIXED} is gpt-oss's layout (MXFP4 experts, int8 elsewhere); "
                                    f"model_type {cfg.model_type!r} has no gpt-oss experts: use int8 or mxfp4")
        return "int8"
    return q if q in REST_MODES else None


def hf_quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of a published gpt-oss checkpoint."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(NOT_CONVERTED)}


def _expert_modules(model: nn.Module) -> list[tuple[str, GptOssExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GptOssExperts)]


def load_mxfp4_weights(model: nn.Module, ckpt, dtype: torch.dtype, device: torch.device) -> None:
    """Fill a meta-device gpt-oss model from a published MXFP4 checkpoint, experts as stored, the rest float
    (see :func:`swap_stored_experts` for the errors)."""
    swap_stored_experts(model, ckpt, dtype)
    ignore = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
    load_weights(model, ckpt, dtype, device, ignore=ignore)


def swap_stored_experts(model: nn.Module, ckpt, dtype: torch.dtype) -> None:
    """Swap each meta-device :class:`GptOssExperts` for an :class:`Mxfp4Experts` of meta tensors shaped as the
    checkpoint stores them (checked here), for ``load_weights`` to fill.

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


def quantize_experts(model: nn.Module) -> int:
    """Swap every float :class:`GptOssExperts` of ``model`` for MXFP4 ones, layer by layer (each float copy is
    released once its replacement exists). Returns the number of layers swapped."""
    experts = _expert_modules(model)
    for prefix, m in experts:
        if not isinstance(m, Mxfp4Experts):
            model.set_submodule(prefix, Mxfp4Experts.from_float(m))
    return len(experts)
