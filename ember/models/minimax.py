"""MiniMax-M2's pieces (HF's ``modeling_minimax_m2.py``): a sigmoid router with a correction bias (plain top-k, no
groups or shared experts) and attention whose q/k RMSNorms span all heads at once, with partial RoPE.

Shapes: N tokens, H hidden, E experts, k experts per token; B batch, T new tokens, nh/nkv heads, hd head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.models.attention import KVStore, sdpa_attention
from ember.models.linear import project
from ember.models.moe import SparseMoE
from ember.models.norms import RMSNorm
from ember.models.rope import apply_partial_rope
from ember.models.routed_moe import PartialRopeAttention


class SigmoidMoE(SparseMoE):
    """Top-k experts chosen by ``sigmoid(gate(x)) + e_score_correction_bias``, weighted by the uncorrected sigmoid
    scores renormalised to sum to 1 (HF's ``MiniMaxM2SparseMoeBlock``; the bias is the block's, ``mlp.e_score_...``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) fp32, expert ids (N, k)."""
        scores = self.gate(x).float().sigmoid()  # (N, E)
        ids = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        return weights / weights.sum(dim=-1, keepdim=True), ids


class FullQKNormAttention(PartialRopeAttention):
    """Attention with one RMSNorm over all query heads' channels (nh * hd) and one over all key heads' (nkv * hd),
    applied to the projections before they are split into heads; partial RoPE."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__(cfg, layer, sliding_window)
        self.q_norm = RMSNorm(self.nh * self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.nkv * self.hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVStore | None, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, rotary_dim) -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = apply_partial_rope(self.q_norm(q).view(B, T, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = apply_partial_rope(self.k_norm(k).view(B, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(sdpa_attention(q, k, v, mask, is_causal))


MINIMAX_M2_CLASSES: dict[str, type[nn.Module]] = {"full_attention": FullQKNormAttention, "moe": SigmoidMoE}
