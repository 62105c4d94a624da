"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2; HF's ``DeepseekV3Attention``).

Each token's keys and values come from one latent: ``kv_a_proj_with_mqa(x)`` gives ``c`` (kv_lora_rank channels,
RMS-normed) and ``k_rot`` (qk_rope_head_dim channels, rotated, shared by every head). The cache keeps those two
per token per layer (the ``latent`` kind of :mod:`ember.cache`), never the expanded keys/values.

* Prefill (several tokens) expands them as HF does: ``kv_b_proj(c)`` -> per-head ``k_nope`` (qk_nope_head_dim) and
  ``v`` (v_head_dim); keys are ``[k_nope | k_rot]``; softmax attention with scale ``qk_head_dim ** -0.5``.
* Decode (one token) uses the absorbed form, reading the latent cache once: with ``W_uk``/``W_uv`` the key and value
  rows of ``kv_b_proj``, ``q_nope . k_nope = (q_nope W_uk) . c``, so scores are ``(q_nope W_uk) . c + q_rot . k_rot``
  over the cached latents and the output is ``(softmax . c) W_uv^T``: nothing of size heads x tokens is made
  but the scores. A ``kv_b_proj`` that is not a plain weight (quantized, LoRA) is expanded instead.

Shapes: B batch, T new tokens, S cached+new slots, nh heads, r kv_lora_rank, dn/dr/dv nope/rope/value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.attention import KVStore, sdpa_attention
from ember.models.linear import Linear
from ember.models.norms import RMSNorm
from ember.models.rope import apply_interleaved_rope, apply_rope, yarn_softmax_mscale


class MLAttention(nn.Module):
    """DeepSeek's multi-head latent attention with HF's module names (``q_a_proj``, ``kv_a_proj_with_mqa``, ...)."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.sliding_window = sliding_window
        self.nh, h = cfg.num_attention_heads, cfg.hidden_size
        self.r, self.dn, self.dr, self.dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        # YaRN (DeepSeek-V3's released config): the softmax scale also takes mscale(factor, mscale_all_dim)
        # squared, over every channel (HF's yarn_apply_mscale)
        self.scaling = (self.dn + self.dr) ** -0.5 * yarn_softmax_mscale(cfg) ** 2
        self.interleaved = cfg.rope_interleave
        bias = cfg.attention_bias
        q_out = self.nh * (self.dn + self.dr)
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # HF: default eps 1e-6, not rms_norm_eps
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, bias=False)
            self.q_proj = None
        else:
            self.q_proj = Linear(h, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.r + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.r)
        self.kv_b_proj = Linear(self.r, self.nh * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(self.nh * self.dv, h, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVStore | None, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, dr), mask bool (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.nh, self.dn + self.dr).transpose(1, 2)  # (B, nh, T, dn + dr)
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        c = self.kv_a_layernorm(c).view(B, 1, T, self.r)
        k_rot = k_rot.reshape(B, 1, T, self.dr)
        rope = apply_interleaved_rope if self.interleaved else apply_rope
        q_rot, k_rot = rope(q_rot, cos, sin), rope(k_rot, cos, sin)
        if cache is not None:
            c, k_rot = cache.update(self.layer, c, k_rot)  # (B, 1, S, r), (B, 1, S, dr): the latent cache
        rows = accel.attention_rows if type(self.kv_b_proj) is Linear else None
        out = rows(self._absorbed, (q_nope, q_rot), (c, k_rot), mask) if rows is not None else None
        if out is None and T == 1 and type(self.kv_b_proj) is Linear:
            out = self._absorbed(q_nope, q_rot, c, k_rot, mask)
        elif out is None:
            kv = self.kv_b_proj(c[:, 0]).view(B, -1, self.nh, self.dn + self.dv).transpose(1, 2)
            k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, nh, S, dn), (B, nh, S, dv)
            k = torch.cat((k_nope, k_rot.expand(-1, self.nh, -1, -1)), dim=-1)
            out = sdpa_attention(torch.cat((q_nope, q_rot), dim=-1), k, v, mask, is_causal, scale=self.scaling)
        return self.o_proj(out)

    def _absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, c: torch.Tensor, k_rot: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """One query token over the latent cache: q_nope (B, nh, 1, dn), q_rot (B, nh, 1, dr), c (B, 1, S, r),
        k_rot (B, 1, S, dr) -> (B, 1, nh * dv)."""
        B = q_nope.shape[0]
        w = self.kv_b_proj.weight.view(self.nh, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # (nh, dn, r), (nh, dv, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, nh, 1, r)
        scores = (q_lat @ c.transpose(2, 3) + q_rot @ k_rot.transpose(2, 3)) * self.scaling  # (B, nh, 1, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)
        o_lat = probs @ c  # (B, nh, 1, r)
        out = torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)  # (B, 1, nh, dv)
        return out.reshape(B, 1, self.nh * self.dv)
