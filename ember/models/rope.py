"""Rotary position embeddings: frequencies (with ``linear``, ``llama3`` and ``yarn`` scaling), tables, rotation."""

from __future__ import annotations

import math

import torch

from ember.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Inverse RoPE frequencies, (rotary_dim/2,) fp32, including ``linear`` and ``llama3`` scaling; "proportional"
    (Gemma 4's full layers): (global head dim / 2,), see :func:`proportional_inv_freq`."""
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "proportional":
        return proportional_inv_freq(cfg.rope_theta, cfg.global_head_dim or cfg.head_dim, cfg.rope_scaling, device)
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
    if kind == "yarn":
        return _yarn_inv_freq(cfg, scaling, device)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig rejects these earlier


def proportional_inv_freq(base: float, head_dim: int, scaling: dict, device) -> torch.Tensor:
    """HF's "proportional" RoPE: the first ``partial_rotary_factor * head_dim / 2`` pairs turn at
    ``base ** (-2i / head_dim)`` (exponents over the whole head), the rest not at all (frequency 0: cos 1, sin 0),
    all divided by ``factor``; (head_dim/2,) fp32 for a rotation over the whole head."""
    turning = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
    exponents = torch.arange(0, 2 * turning, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = torch.cat((1.0 / (base ** exponents), torch.zeros(head_dim // 2 - turning, device=device)))
    return inv_freq / scaling.get("factor", 1.0)


def _yarn_factor(cfg: ModelConfig, scaling: dict) -> float:
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-style configs: the ratio of the two context lengths
        factor = cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(factor)


def _yarn_inv_freq(cfg: ModelConfig, scaling: dict, device) -> torch.Tensor:
    """YaRN (HF's ``_compute_yarn_parameters``): each frequency is interpolated (divided by ``factor``) or
    extrapolated (kept) by how many turns it makes over the original context; a linear ramp between the
    ``beta_fast``/``beta_slow`` correction dimensions blends the two."""
    dim, base = cfg.rotary_dim, cfg.rope_theta  # HF: head_dim * partial_rotary_factor (MLA: qk_rope_head_dim)
    factor = _yarn_factor(cfg, scaling)
    old_ctx = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over old_ctx
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    return interpolation * (1 - keep) + extrapolation * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos/sin by (1.0 for every other rope type): ``attention_factor`` if the
    config gives it, else ``0.1 ln(factor) + 1`` (or the ratio of two such terms with ``mscale``/``mscale_all_dim``)."""
    scaling = cfg.rope_scaling
    if not scaling or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(cfg, scaling)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def yarn_softmax_mscale(cfg: ModelConfig) -> float:
    """The factor whose square multi-head latent attention's softmax scale takes under YaRN: ``0.1 mscale_all_dim
    ln(factor) + 1`` (1.0 without YaRN, or without ``mscale_all_dim``; HF's ``yarn_apply_mscale``)."""
    scaling = cfg.rope_scaling
    if not scaling or scaling["rope_type"] == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    factor = _yarn_factor(cfg, scaling)
    return 1.0 if factor <= 1 else 0.1 * scaling["mscale_all_dim"] * math.log(factor) + 1.0


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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` (B, T) -> two (B, T, hd) tensors in ``dtype``, times ``scale`` (YaRN's
    attention factor, applied in fp32 before the cast as HF does)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2) fp32, exact product like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hd) by cos/sin (B, 1, T, hd) in the half-split layout HF uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
