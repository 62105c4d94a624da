"""Rotary position embeddings: frequencies (with ``linear`` and ``llama3`` scaling), tables, rotation."""

from __future__ import annotations

import math

import torch

from ember.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Inverse RoPE frequencies, (rotary_dim/2,) fp32, including ``linear`` and ``llama3`` scaling."""
    dim = cfg.rotary_dim
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


def rope_local_inv_freq(cfg: ModelConfig, device: torch.device | str | None = "cpu") -> torch.Tensor | None:
    """The sliding layers' own inverse frequencies (Gemma 3: base ``rope_local_base_freq``, unscaled), or None
    where every layer uses :func:`rope_inv_freq`."""
    if cfg.rope_local_base_freq is None:
        return None
    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (cfg.rope_local_base_freq ** exponents)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of x (B, n, T, hd) (half-split within them, as HF's GLM-4.5),
    passing the rest through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rotation of x (B, n, T, d): channel pairs (x0, x1), (x2, x3), ... each turned by one frequency,
    the results laid out as [even outputs | odd outputs] (HF's ``apply_rotary_pos_emb_interleave``)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


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
