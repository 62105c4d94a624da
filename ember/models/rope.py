"""Rotary position embeddings: frequencies (with ``linear`` and ``llama3`` scaling), tables, rotation."""

from __future__ import annotations

import math

import torch

from ember.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Inverse RoPE frequencies, (hd/2,) fp32, including ``linear`` and ``llama3`` scaling."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)  # partial RoPE rotates the first `dim` dims only
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated smoothly (Meta's reference formulation).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig rejects these earlier


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` (B, T) -> two (B, T, hd) tensors in ``dtype``."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2) fp32, exact product like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hd) by cos/sin (B, 1, T, hd) in the half-split layout HF uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
