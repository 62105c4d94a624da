"""Mixture of experts: a softmax top-k router over SwiGLU experts (HF's ``MixtralSparseMoeBlock`` and
``Qwen3MoeSparseMoeBlock``).

Shapes: N tokens, H hidden, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models.linear import Linear
from ember.models.mlp import MLP


class SparseMoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts (Mixtral, Qwen3-MoE), routed as HF does.

    Router: ``softmax(gate(x))`` in fp32, keep the top ``k`` probabilities, renormalise them to sum
    to 1 when ``norm_topk_prob`` (always for Mixtral). Each token's output is the weighted sum of
    its k experts' outputs. Experts are an ``nn.ModuleList`` of :class:`MLP`, so quantization and
    LoRA swap their ``Linear`` modules like any other. Module names are Qwen3-MoE's for every family
    (``mlp.gate``, ``mlp.experts.5.gate_proj``); :mod:`ember.loading.moe` maps Mixtral's onto them.

    Only the selected experts run, so a decode step reads k of the E experts' weights: one token
    calls its k experts directly; several tokens are grouped by expert (a sort) so each selected
    expert runs one matmul over all of its tokens. Reading the routing result on the host costs
    one device sync per MoE layer on CUDA.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert ids for tokens x (N, H) -> ((N, k) fp32, (N, k) int64)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (N, k), descending
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, ids = self.route(x)
        return mix_experts(self.experts, x, weights, ids).view(shape)


def mix_experts(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token of x (N, H) through its k experts ``ids`` (N, k), outputs summed with ``weights`` (N, k) fp32
    -> (N, H) in x's dtype."""
    if x.shape[0] == 1:
        # Decode: one token, its k experts only; their outputs are combined by one fp32 mv.
        ys = torch.stack([experts[e](x)[0] for e in ids[0].tolist()], dim=-1)  # (H, k)
        return torch.mv(ys.float(), weights[0]).to(x.dtype)[None]
    # Prefill / batches: sort the N*k (token, expert) pairs by expert; one matmul per expert.
    k = ids.shape[1]
    flat = ids.flatten()  # (N*k,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    token = order // k  # token of each sorted pair
    w = weights.flatten()[order]  # (N*k,)
    xs = x[token]  # (N*k, H) tokens gathered in expert order
    out = torch.zeros_like(x)
    begin = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(begin, begin + n)
        begin += n
        y = experts[e](xs[sl]) * w[sl, None]  # (n, H) fp32
        out.index_add_(0, token[sl], y.to(x.dtype))
    return out
