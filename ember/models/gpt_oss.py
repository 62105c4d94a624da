"""gpt-oss pieces (HF's ``modeling_gpt_oss.py``): attention with learned sinks, the biased top-k router and the
clamped-SwiGLU experts with their fused, interleaved ``gate_up_proj``.

Everything else of a gpt-oss model (embedding, RMSNorm, pre-norm layers, untied head, the alternating
``layer_types`` windows) is the shared :mod:`ember.models.transformer`; YaRN lives in :mod:`ember.models.rope`.

Shapes: B batch, T new tokens, S key slots, H hidden, nh/nkv query/kv heads, hd head dim, N tokens, E experts,
I expert width, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.attention import Attention, fit_mask
from ember.models.linear import Linear, project
from ember.models.moe import expert_groups
from ember.models.rope import apply_rope


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention with one extra learned logit per head (HF's gpt-oss ``eager_attention_forward``).

    The sink joins each row's softmax as a key with no value: it takes probability mass away from the real keys
    (a row may attend to "nothing"), then is dropped. q (B, nh, T, hd), k/v (B, nkv, S, hd), sinks (nh,),
    mask bool (B or 1, 1, T, S) (True: may attend) -> (B, T, nh * hd). Scale 1/sqrt(hd).
    """
    B, nh, T, hd = q.shape
    rep = nh // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # HF's repeat_kv
    scores = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5  # (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(B, -1, T, 1)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values  # the sink is finite: no all -inf row
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    out = torch.matmul(probs.to(v.dtype), v)  # (B, nh, T, hd)
    return out.transpose(1, 2).reshape(B, T, nh * hd)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) bool: the T new tokens are the last T of S slots; each sees itself and earlier slots."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


class SinkAttention(Attention):
    """:class:`Attention` (GQA, q/k/v/o biases, full or sliding window) plus ``sinks`` (nh,): one learned logit per
    head that joins the softmax (HF's ``GptOssAttention``). The runtime runs it as this module (its projections
    and RoPE still on the per-piece kernels)."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__(cfg, layer, sliding_window)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_attention_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, hd), mask bool (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        rope_ = accel.rope_
        if rope_ is not None and rope_(q, k, cos[:, 0], sin[:, 0]):  # rotated in place (inference)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
            k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        mask = fit_mask(mask, k.shape[2])  # a ring layer's cache returned the window's keys only
        if mask is None and is_causal and T > 1:
            mask = causal_mask(T, k.shape[2], x.device)
        return self.o_proj(sink_attention(q, k, v, self.sinks, mask))


class GptOssExperts(nn.Module):
    """The E experts of one layer as HF stores them (``GptOssExperts``), one tensor per kind:

    * ``gate_up_proj`` (E, H, 2I), ``gate_up_proj_bias`` (E, 2I): x @ W; gate and up *interleaved* along the
      last axis (column 2j is gate j, 2j+1 is up j);
    * ``down_proj`` (E, I, H), ``down_proj_bias`` (E, H).

    One expert: ``gate, up = clamp(gate, max=limit), clamp(up, -limit, limit)``;
    ``down((up + 1) * gate * sigmoid(alpha * gate))``. The two products are :meth:`gate_up` and :meth:`down`, which
    :class:`ember.quant.mxfp4.Mxfp4Experts` replaces to multiply the checkpoint's MXFP4 blocks as stored.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, inter = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, inter
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * inter))
        self.down_proj = nn.Parameter(torch.zeros(E, inter, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s fused first product: x (n, H) -> (n, 2I), interleaved gate/up, bias added."""
        return x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s second product: h (n, I) -> (n, H), bias added."""
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The clamped SwiGLU of an interleaved (n, 2I) product -> (n, I)."""
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), ids/weights (N, k) -> (N, H): each token's weighted sum of its k experts' outputs, experts
        visited in increasing id order (HF's order, so fp32 sums round alike); one product per expert over all
        its tokens. Reading the routing on the host costs one device sync per layer on CUDA."""
        out = torch.zeros_like(x)
        w = weights.flatten()
        for e, pairs in expert_groups(ids, self.num_experts):
            rows = pairs // ids.shape[1]
            y = self.down(e, self.glu(self.gate_up(e, x[rows])))
            out.index_add_(0, rows, (y * w[pairs, None]).to(x.dtype))
        return out


class GptOssMLP(nn.Module):
    """The gpt-oss MoE block (HF's ``GptOssMLP``): ``router`` (a Linear with bias, E x H) picks the top k logits
    per token, a softmax over those k gives their weights, and :class:`GptOssExperts` runs them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = GptOssExperts(cfg)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) in x's dtype, expert ids (N, k)."""
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return F.softmax(top, dim=1, dtype=top.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weights, ids = self.route(x2)
        return self.experts(x2, ids, weights).view(shape)
