"""Compute dtypes: names users type, and what ``auto`` resolves to on a device."""

from __future__ import annotations

import torch

from ember import kernels

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


def blocks_dtype(name: str | torch.dtype | None, dt: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``'s compute dtype ``dt`` for a model whose large weights are held in blocks (a quantized GGUF file,
    MXFP4 experts): bf16 where ``auto`` gave fp32 on a CPU (no native bf16 GEMMs) whose kernels are built. The
    block kernels take bf16 activations on byte products (int8 per block, as llama.cpp's Q8 activations) and fp32
    ones on the exact float path, several times slower at decode."""
    if name in (None, "auto") and dt is torch.float32 and device.type == "cpu" and kernels.load() is not None:
        return torch.bfloat16
    return dt
