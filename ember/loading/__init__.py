"""Loading weights into :class:`ember.models.Transformer` from checkpoint folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.errors import CheckpointError, QuantizationError
from ember.loading.dtypes import DTYPE_NAMES, blocks_dtype, device_supports_bf16, resolve_dtype
from ember.loading import mxfp4
from ember.loading.moe import expert_layout_view
from ember.loading.quantized import load_quantized_weights
from ember.loading.safetensors import Checkpoint, check_layers, load_weights
from ember.loading.names import renamed_text_model
from ember.loading.wrappers import text_model_view
from ember.models import Transformer
from ember.quant.quantize import DEFAULT_LM_HEAD

__all__ = ["DTYPE_NAMES", "Checkpoint", "check_layers", "device_supports_bf16", "load_model", "load_quantized_weights", "load_weights",
           "open_checkpoint", "resolve_dtype"]


def open_checkpoint(folder: Path, cfg: ModelConfig):
    """The checkpoint of ``folder`` under Ember's names (text model, per-expert names) and the ``mtp.*`` tensors
    kept apart; checks its layer count and embedding against ``cfg`` before anything is built."""
    ckpt = renamed_text_model(Checkpoint(folder), cfg)  # Gemma 3's multimodal names -> the text model's
    ckpt, extra = text_model_view(ckpt, cfg)  # Qwen3.5's multimodal wrappers; mtp.* kept apart
    check_layers(cfg, ckpt)  # before anything is built for the sizes config.json claims
    return expert_layout_view(ckpt, cfg), extra  # MoE: hub/fused expert names -> Ember's

def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto", quant: str | None = None,
               group_size: int | None = None, lm_head: str | None = DEFAULT_LM_HEAD,
               defer=None, shard=None) -> Transformer:
    """Build a :class:`Transformer` on the meta device and fill it from an HF checkpoint folder.

    Args:
        path: folder with config.json and safetensors weights.
        device: where the weights go ("cpu", "cuda", "cuda:1").
        dtype: "auto", "bf16", "fp16", "fp32" or a torch dtype.
        quant: None/"none", "int8", "int4", "nf4" or "mxfp4": quantize each Linear as its weight is read
            (peak memory ~ the quantized model). A folder written by ``ember quantize`` (config.json
            has a ``quantization`` section) loads as stored, with no re-quantization; so does a gpt-oss folder
            with ``quantization_config.quant_method: mxfp4`` (as published). ``mxfp4`` on a float gpt-oss
            folder quantizes its experts only, as published; ``mxfp4+int8`` also puts every other Linear in
            int8 (llama.cpp's MXFP4_MOE), as int8/int4/nf4 do beside an MXFP4 folder's stored experts.
        group_size: int4 group size (32, 64, 128; default 128).
        lm_head: with ``quant``, an untied LM head's format ("int8", "same", a mode, or None: float).
        defer: a predicate on checkpoint names: those tensors are not loaded and stay on the meta device, for
            :mod:`ember.offload` to read on demand (float weights only; with ``quant`` it is refused).
        shard: for a multi-process run (:mod:`ember.distributed`), an object whose ``select(model, ckpt)`` cuts
            the meta-device model down to this rank's part and returns the checkpoint view of just its tensors,
            and whose ``finish(model)`` swaps in the communicating modules once the weights are in.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (expected a directory with config.json and *.safetensors)")
    cfg = ModelConfig.from_file(folder)
    ckpt, extra = open_checkpoint(folder, cfg)
    device = torch.device(device)
    dt = resolve_dtype(dtype, _config_dtype(cfg) or ckpt.dtype(), device)
    if mxfp4.is_mxfp4_checkpoint(cfg.extra):  # gpt-oss as published: its experts multiply on the block kernels
        dt = blocks_dtype(dtype, dt, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    if shard is not None:
        ckpt = shard.select(model, ckpt)
    wants = (quant or "none").lower()
    deferred = tuple(n for n in ckpt.names() if defer(n)) if defer is not None else ()
    if deferred and (wants != "none" or mxfp4.is_mxfp4_checkpoint(cfg.extra)):
        raise QuantizationError(f"{folder}: offloaded weights are read as stored; --quant {wants} would quantize "
                                f"them on every read: run `ember quantize {folder} --to {wants} -o DIR` once and "
                                "run DIR (its experts are then read quantized)")
    rest = mxfp4.rest_mode(cfg, wants)  # the Linears beside MXFP4 experts (mxfp4+int8: int8)
    if mxfp4.mxfp4_experts_wanted(cfg, wants):
        # gpt-oss MXFP4 experts: read as stored, or quantized from a float folder; the other Linears float,
        # as a stored `quantization` section says, or quantized to `rest` as they are read
        stored = mxfp4.is_mxfp4_checkpoint(cfg.extra)
        if wants not in ("none", "mxfp4", mxfp4.MIXED) + mxfp4.REST_MODES:
            raise QuantizationError(f"{folder}: checkpoint is MXFP4 (quantization_config); load it without --quant, "
                                    f"with --quant mxfp4, or with {', '.join(mxfp4.REST_MODES)} or {mxfp4.MIXED} "
                                    "for the Linears beside its experts")
        if rest is not None or "quantization" in cfg.extra:
            load_quantized_weights(model, ckpt, dt, device, rest, group_size, lm_head=lm_head)
        elif stored:
            mxfp4.load_mxfp4_weights(model, ckpt, dt, device)
        else:
            load_weights(model, ckpt, dt, device, ignore=("lm_head.weight",) if cfg.tie_word_embeddings else ())
        if not stored:
            mxfp4.quantize_experts(model)
            cfg.extra[mxfp4.HF_SECTION] = mxfp4.hf_quantization_config()
    elif (quant is not None and quant != "none") or "quantization" in cfg.extra:
        load_quantized_weights(model, ckpt, dt, device, quant, group_size, lm_head=lm_head,
                               defer=defer if deferred else None)
    else:
        ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        load_weights(model, ckpt, dt, device, ignore=ignore + deferred)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if shard is not None:
        shard.finish(model)
    model.reset_rope()
    model.extra_weights = extra  # tensors outside the forward pass (mtp.* heads for speculative decoding)
    model.eval().requires_grad_(False)
    return model


def _config_dtype(cfg: ModelConfig) -> torch.dtype | None:
    return DTYPE_NAMES.get(str(cfg.torch_dtype).lower()) if cfg.torch_dtype else None
