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
    -> (N, H) in x's dtype.

    A token's k outputs are summed in its routing order in fp32 (a product and an add per expert, one rounding
    at the end), the same elementwise steps whether it runs alone or among others: a served row rounds as its
    one-token step whatever rides beside it."""
    N, k = ids.shape
    if N == 1:  # decode: one token, its k experts only
        ys = torch.stack([experts[e](x)[0] for e in ids[0].tolist()])[None]  # (1, k, H)
    else:  # prefill / batches: one matmul per expert over all of its tokens
        ys = None
        for e, pairs in expert_groups(ids, len(experts)):
            y = experts[e](x[pairs // k])  # (n, H)
            if ys is None:
                ys = y.new_empty(N * k, y.shape[-1])
            ys[pairs] = y  # in (token, routing slot) order
        ys = ys.view(N, k, -1)
    w = weights.float()
    acc = ys[:, 0].float() * w[:, :1]  # (N, H) fp32: each product rounded once, as alone
    for j in range(1, k):  # summed in routing order, elementwise: no reduction whose order varies with N
        acc += ys[:, j].float() * w[:, j:j + 1]  # one (N, H) temporary per slot, not an (N, k, H) one
    return acc.to(x.dtype)


def expert_groups(ids: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor]]:
    """The (token, expert) pairs of ``ids`` (N, k) grouped by expert, in increasing expert id: a list of
    (expert, flat pair indices ``token * k + slot``, increasing)."""
    flat = ids.flatten()  # (N*k,), token-major
    order = torch.argsort(flat, stable=True)
    groups, begin = [], 0
    for e, n in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if n:
            groups.append((e, order[begin:begin + n]))
            begin += n
    return groups
