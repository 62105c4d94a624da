"""Loading weights into :class:`ember.models.Transformer` from checkpoint folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ember import kernels
from ember.config import ModelConfig
from ember.errors import CheckpointError
from ember.loading.moe import expert_layout_view
from ember.loading.names import text_model_view
from ember.loading.safetensors import Checkpoint, load_weights
from ember.models import Transformer

DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def device_supports_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (not emulated) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN uses AVX512-BF16/AMX when present; elsewhere bf16 is slow emulation.
        return torch.backends.mkldnn.is_available() and kernels.native_bf16_gemm()
    return True


def resolve_dtype(name: str | torch.dtype | None, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype, except bf16 on a device without bf16 (fp32 on CPU, fp16 on GPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        dt = checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        if dt == torch.bfloat16 and not device_supports_bf16(device):
            dt = torch.float16 if device.type == "cuda" else torch.float32
        if dt == torch.float16 and device.type == "cpu":
            dt = torch.bfloat16 if device_supports_bf16(device) else torch.float32
        return dt
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto", quant: str | None = None,
               group_size: int | None = None, lm_head: str | None = "int8") -> Transformer:
    """Build a :class:`Transformer` on the meta device and fill it from an HF checkpoint folder.

    Args:
        path: folder with config.json and safetensors weights.
        device: where the weights go ("cpu", "cuda", "cuda:1").
        dtype: "auto", "bf16", "fp16", "fp32" or a torch dtype.
        quant: None/"none", "int8", "int4" or "nf4": quantize each Linear as its weight is read
            (peak memory ~ the quantized model). A folder written by ``ember quantize`` (config.json
            has a ``quantization`` section) loads as stored, with no re-quantization.
        group_size: int4 group size (32, 64, 128; default 128).
        lm_head: with ``quant``, an untied LM head's format ("int8", "same", a mode, or None: float).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (expected a directory with config.json and *.safetensors)")
    cfg = ModelConfig.from_file(folder)
    ckpt = expert_layout_view(text_model_view(Checkpoint(folder), cfg), cfg)  # multimodal, MoE names -> Ember's
    device = torch.device(device)
    dt = resolve_dtype(dtype, _config_dtype(cfg) or ckpt.dtype(), device)
    with torch.device("meta"):
        model = Transformer(cfg)
    if (quant is not None and quant != "none") or "quantization" in cfg.extra:
        from ember.quant import load_quantized_weights

        load_quantized_weights(model, ckpt, dt, device, quant, group_size, lm_head=lm_head)
    else:
        ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        load_weights(model, ckpt, dt, device, ignore=ignore)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    model.eval().requires_grad_(False)
    return model


def _config_dtype(cfg: ModelConfig) -> torch.dtype | None:
    return DTYPE_NAMES.get(str(cfg.torch_dtype).lower()) if cfg.torch_dtype else None
