"""The mixture of experts of GLM-4.5/4.6 and DeepSeek-V3 (HF's ``Glm4MoeMoE`` / ``DeepseekV3MoE``), and GLM's
attention with partial RoPE.

Router: ``sigmoid(gate(x))`` in fp32; the choice adds a learned per-expert ``e_score_correction_bias``, keeps the
``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best experts) and takes the top
``k`` experts inside them; the weights are the uncorrected sigmoid scores of those experts, renormalised when
``norm_topk_prob``, times ``routed_scaling_factor``. Shared experts (one SwiGLU of ``n_shared_experts`` times the
expert width) see every token and add to the routed output.

Shapes: N tokens, H hidden, E experts, k experts per token, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models.attention import Attention, KVStore, sdpa_attention
from ember.models.linear import project
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.models.rope import apply_partial_rope


class GroupTopkRouter(nn.Module):
    """The sigmoid router with correction bias and group-limited top-k (HF's ``Glm4MoeTopkRouter``); its weight
    and bias are named as in the checkpoints (``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``). Both are
    kept in fp32 whatever the model's dtype (``keep_fp32``, as HF's ``_keep_in_fp32_modules_strict``): near-ties
    between experts route as HF routes them."""

    keep_fp32 = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.num_local_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.n_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> routing weights (N, k) fp32 and expert ids (N, k)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        groups = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1.0)
        keep = keep.bool()[:, :, None].expand_as(groups).reshape(-1, self.n_experts)  # (N, E)
        ids = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1)[1]  # (N, k)
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class RoutedMoE(SparseMoE):
    """Group-routed SwiGLU experts plus shared experts. The experts run as :class:`SparseMoE`'s do (one token:
    its k experts; several: grouped by expert); only the router differs, and the shared experts add on."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.top_k = cfg.num_experts_per_tok
        self.gate = GroupTopkRouter(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_local_experts))
        self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class PartialRopeAttention(Attention):
    """Grouped-query attention whose RoPE turns only the first ``rotary_dim`` channels of each head (GLM-4.5:
    ``partial_rotary_factor`` 0.5), with GLM's bias on q/k/v only and optional q/k norms."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__(cfg, layer, sliding_window)
        self.rotary_dim = cfg.rotary_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVStore | None, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, rotary_dim) -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_partial_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        k = apply_partial_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(sdpa_attention(q, k, v, mask, is_causal))
