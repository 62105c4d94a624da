"""Attention: grouped-query attention over a per-layer cache, full or sliding-window (HF's ``LlamaAttention``).

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, nh/nkv query/kv heads, hd head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.linear import Linear, project
from ember.models.norms import RMSNorm
from ember.models.rope import apply_rope


class KVStore(Protocol):
    """What attention needs from a cache (see :mod:`ember.cache`)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, nkv, T, hd) at the current slots; return all keys/values (B, nkv, S, hd)."""
        ...


def build_mask(q_slots: torch.Tensor, k_valid: torch.Tensor | None, n_keys: int, window: int | None) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S): True where a query may attend to a key.

    Args:
        q_slots: (T,) cache slot of each new token (slots are shared across the batch; rows
            shorter than the longest are left-padded, so slot distance == position distance).
        k_valid: (B, S) False at padding slots, or None when there is no padding.
        n_keys: S, number of key slots attended over.
        window: sliding-window size (keys with q - k >= window are hidden), or None.
    """
    k_slots = torch.arange(n_keys, device=q_slots.device)
    allowed = k_slots[None, :] <= q_slots[:, None]  # (T, S) causal
    if window is not None:
        allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :n_keys]
    return allowed


def fit_mask(mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """The mask's last ``n_keys`` columns: a sliding layer's cache that keeps only the window
    (:func:`ember.cache.ring_layers`) returns the last slots' keys of those the model's mask covers."""
    if mask is not None and mask.shape[-1] > n_keys:
        return mask[..., -n_keys:]
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of q (B, nh, T, hd) over k/v (B, nkv, S, hd or dv) -> (B, T, nh * dv), scale 1/sqrt(hd)
    unless ``scale`` is given."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    mask = fit_mask(mask, k.shape[2])
    if T == 1 and rep > 1:
        # One query token: fold the query heads of each group into the "time" axis so the
        # kernel reads each cached k/v once instead of materialising repeat_kv copies.
        qg = q.view(B, nkv, rep, hd)  # (B, nkv, rep, hd)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        out = out.reshape(B, nh, 1, v.shape[-1])
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             enable_gqa=rep > 1, scale=scale)
    return out.transpose(1, 2).reshape(B, T, nh * v.shape[-1])


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm (Qwen3) and qkv bias (Qwen2).

    ``sliding_window`` (None for full attention) is the layer's window: a key ``window`` or more tokens
    before the query is hidden. The mask that says so is made by the model, once per distinct window.
    """

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.sliding_window = sliding_window
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias
        o_bias = cfg.attention_bias and not cfg.qkv_bias_only
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVStore | None,
        is_causal: bool,
    ) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, hd), mask bool (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_ = accel.rope_
        if rope_ is not None and rope_(q, k, cos[:, 0], sin[:, 0]):  # rotated in place (inference)
            q_rows = q  # (B, T, nh, hd)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, n, T, hd)
            decode = accel.attention_decode
            # one token, or a padded batch's rows (verified proposals): one call over the cached keys
            if (T == 1 or mask is not None) and cache is not None and decode is not None:
                k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
                cache = None
                out = decode(q_rows, k, v, fit_mask(mask, k.shape[2]))  # (B, T, nh * hd), or None
                if out is not None:
                    return self.o_proj(out)
        else:
            q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
            k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        return self.o_proj(sdpa_attention(q, k, v, mask, is_causal))
