"""Gemma 3's (and Gemma 2's) pieces (HF's ``modeling_gemma3.py``): scaled embeddings, GeGLU, the attention with (1 + w) q/k norms,
its own query scale and optional logit soft-capping, and the decoder layer with sandwich norms.

The rest of Gemma 3 is shared: :class:`~ember.models.norms.UnitOffsetRMSNorm` for every norm, the sliding layers'
RoPE base (:func:`~ember.models.rope.rope_local_inv_freq`, chosen per layer by the model) and the final-logit
soft-capping (:meth:`ember.models.Transformer.finish`).

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, nh/nkv query/kv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models.attention import Attention, KVStore, fit_mask, sdpa_attention
from ember.models.linear import project
from ember.models.mlp import MLP
from ember.models.norms import UnitOffsetRMSNorm
from ember.models.rope import apply_rope


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by ``sqrt(hidden_size)`` rounded to the table's dtype (HF's
    ``Gemma3TextScaledWordEmbedding``: an fp32 scalar cast to the weight dtype, then the product)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.vocab_size, cfg.hidden_size)
        self.scale = cfg.hidden_size ** 0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float32, device=self.weight.device).to(self.weight.dtype)
        return super().forward(input_ids) * scale


class GeGLUMLP(MLP):
    """Gated feed-forward with tanh-approximated GELU: down(gelu_tanh(gate(x)) * up(x)) (HF's ``Gemma3MLP``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """Attention whose logits are soft-capped, ``cap * tanh(logits / cap)``, before the mask and an fp32 softmax
    (HF's eager Gemma path). q (B, nh, T, hd), k/v (B, nkv, S, hd), mask bool (B or 1, 1, T, S) or None (causal
    over the last T of S keys) -> (B, T, nh * hd)."""
    B, nh, T, hd = q.shape
    S, rep = k.shape[2], nh // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = fit_mask(mask, S)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, nh, T, S)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    # a padding query sees no key: give it finite scores, so its (unused) output never carries NaN into the
    # padding slots' keys/values of the next layer
    scores = scores.masked_fill(~mask, float("-inf")).where(mask.any(-1, keepdim=True), 0.0)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)


class Gemma3Attention(Attention):
    """Grouped-query attention with (1 + w) q/k RMSNorms (Gemma 3), scale ``query_pre_attn_scalar ** -0.5`` and,
    where the config asks (Gemma 2), tanh soft-capping of the logits (``attn_logit_softcapping``)."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__(cfg, layer, sliding_window)
        if cfg.qk_norm:  # Gemma 3 (Gemma 2 has none)
            self.q_norm = UnitOffsetRMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = UnitOffsetRMSNorm(self.hd, cfg.rms_norm_eps)
        self.scaling = (cfg.query_pre_attn_scalar or self.hd) ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVStore | None, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, hd) of this layer's RoPE, mask (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh or nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        if self.softcap is None:
            out = sdpa_attention(q, k, v, mask, is_causal, scale=self.scaling)
        else:
            out = softcapped_attention(q, k, v, mask, self.scaling, self.softcap)
        return self.o_proj(out)


class Gemma3DecoderLayer(nn.Module):
    """``x + post_attn_norm(attn(input_norm(x)))`` then ``x + post_ff_norm(mlp(pre_ff_norm(x)))`` (HF's
    ``Gemma3DecoderLayer``): the sandwich norms, all (1 + w)."""

    def __init__(self, cfg: ModelConfig, layer: int, attention_type: str = "full_attention",
                 mlp_type: str = "dense") -> None:
        super().__init__()
        self.attention_type, self.mlp_type = attention_type, mlp_type
        self.window = cfg.layer_window(layer) if attention_type == "sliding_attention" else None
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg, layer, self.window)
        self.mlp = GeGLUMLP(cfg)
        self.input_layernorm = UnitOffsetRMSNorm(h, eps)
        self.post_attention_layernorm = UnitOffsetRMSNorm(h, eps)
        self.pre_feedforward_layernorm = UnitOffsetRMSNorm(h, eps)
        self.post_feedforward_layernorm = UnitOffsetRMSNorm(h, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); cos/sin are this layer's RoPE (local for sliding layers)."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                                             is_causal))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


# The pieces Gemma 3 puts in place of Llama's (see ember.models.decoder.FAMILY_CLASSES).
GEMMA3_CLASSES = {"layer": Gemma3DecoderLayer, "embedding": ScaledEmbedding, "norm": UnitOffsetRMSNorm}
