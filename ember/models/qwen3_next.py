"""The Qwen3-Next / Qwen3.5 decoder layer (HF's ``modeling_qwen3_next.py`` and ``modeling_qwen3_5*.py``).

Layers follow ``config.layer_types``: ``"linear_attention"`` layers mix tokens with a Gated DeltaNet
(:mod:`ember.models.gated_deltanet`, HF name ``linear_attn``), ``"full_attention"`` layers (every fourth in
the published models) with :class:`GatedAttention` (``self_attn``). Every layer then has a SwiGLU MLP, or in
the MoE variants a top-k MoE plus a shared expert scaled by a sigmoid gate (:class:`SharedExpertMoE`). All
RMSNorms outside the DeltaNet scale by ``1 + weight`` (:class:`UnitOffsetRMSNorm`, HF's ``GemmaRMSNorm``).

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, nh/nkv heads, hd head dim, r rotary dims.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.attention import sdpa_attention
from ember.models.gated_deltanet import GatedDeltaNet
from ember.models.linear import Linear, project
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.models.norms import UnitOffsetRMSNorm
from ember.models.rope import apply_partial_rope


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool) -> torch.Tensor:
    """q (B, nh, T, hd) against k/v (B, nkv, S, hd) -> (B, T, nh * hd): one new token per row through the runtime's
    decode kernel where it applies (``accel.attention_decode``), else SDPA."""
    decode = accel.attention_decode
    if q.shape[2] == 1 and decode is not None:
        out = decode(q.transpose(1, 2).contiguous(), k, v, mask)
        if out is not None:
            return out
    return sdpa_attention(q, k, v, mask, is_causal)


class GatedAttention(nn.Module):
    """Grouped-query attention whose output is gated per channel by ``sigmoid(gate)``, the gate coming from the
    second half of each head's q projection (HF's ``Qwen3NextAttention``); q/k norms scale by 1 + w; RoPE on
    the first ``head_dim * partial_rotary_factor`` dims."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, 2 * self.nh * self.hd, bias=bias)  # per head: query, then gate
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=bias)
        self.q_norm = UnitOffsetRMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = UnitOffsetRMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache,
                is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, r), mask bool (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        qg, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q, gate = qg.view(B, T, self.nh, 2 * self.hd).chunk(2, dim=-1)
        q = apply_partial_rope(self.q_norm(q).transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        k = apply_partial_rope(self.k_norm(k.view(B, T, self.nkv, self.hd)).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        out = cached_attention(q, k, v, mask, is_causal)  # (B, T, nh * hd)
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))


class SharedExpertMoE(SparseMoE):
    """Top-k experts plus one shared SwiGLU expert every token goes through, scaled by
    ``sigmoid(shared_expert_gate(x))`` (HF's ``Qwen2MoeSparseMoeBlock``, used by Qwen3-Next and Qwen3.5-MoE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


def new_token_valid(mask: torch.Tensor | None, T: int, cache=None) -> torch.Tensor | None:
    """(B, T) bool, False at the padding columns of the T new tokens; None where nothing is padded.

    The paged cache says it (``new_valid``): there a row continuing its prompt with fewer new tokens than T has
    padding columns whose key slots hold its cached tokens, so the mask cannot tell them apart. Otherwise it is
    read off the attention mask (a new token sees its own key slot iff it is real; the new tokens hold the last
    T slots)."""
    if hasattr(cache, "new_valid"):
        return cache.new_valid
    if mask is None:
        return None
    valid = mask[:, 0, :, -T:].diagonal(dim1=-2, dim2=-1)  # (B or 1, T)
    return None if bool(valid.all()) else valid


class HybridDecoderLayer(nn.Module):
    """Pre-norm layer: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``, the mixer a Gated DeltaNet or gated
    attention per ``layer_types`` (HF's ``Qwen3NextDecoderLayer``)."""

    final_norm = UnitOffsetRMSNorm  # the model's final norm (see ember.models.transformer.Backbone)

    def __init__(self, cfg: ModelConfig, layer: int, attention_type: str = "full_attention",
                 mlp_type: str = "dense") -> None:
        super().__init__()
        self.attention_type, self.mlp_type = attention_type, mlp_type
        self.window = None
        if attention_type == "linear_attention":
            # llama.cpp's GGUF files store Qwen3-Next's fused projections split, as Qwen3.5's are
            split = cfg.model_type != "qwen3_next" or bool(cfg.extra.get("gguf_split_deltanet"))
            self.linear_attn = GatedDeltaNet(cfg, layer, split_projections=split)
        else:
            self.self_attn = GatedAttention(cfg, layer)
        if mlp_type == "moe":
            self.mlp = SharedExpertMoE(cfg) if cfg.shared_expert_intermediate_size else SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg)
        self.input_layernorm = UnitOffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = UnitOffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); ``mask`` the full-attention mask, ``cache`` the model's (KV and state)."""
        h = self.input_layernorm(x)
        if self.attention_type == "linear_attention":
            x = x + self.linear_attn(h, new_token_valid(mask, x.shape[1], cache), cache)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))
