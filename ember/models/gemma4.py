"""Gemma 4's text model (HF's ``modeling_gemma4.py``: ``Gemma4TextModel``), on Gemma 3's scaled embedding and GeGLU.

What differs from Gemma 3:

* norms scale by ``weight`` (not ``1 + weight``); values get a weightless RMSNorm, queries and keys weighted ones;
  the attention scale is 1;
* full layers have their own head shape (``global_head_dim``, maybe fewer kv heads) and "proportional" RoPE; with
  ``attention_k_eq_v`` their values are the key projection (before the key norm);
* the last ``num_kv_shared_layers`` layers make no keys/values: each reuses those of the last earlier layer of
  its type (:meth:`ModelConfig.kv_source`), handed over within one forward pass;
* per-layer inputs (PLE): a second embedding table gives each layer ``hidden_size_per_layer_input`` channels per
  token, mixed with a projection of the embedded token and added through a gated bottleneck after the MLP;
* with ``enable_moe_block`` a softmax-routed mixture of GeGLU experts runs beside the dense MLP;
* each layer's output is multiplied by a stored ``layer_scalar``.

The model-level state of one forward pass (the per-layer inputs and the shared keys/values) lives in a
:class:`Gemma4Pass` that the embedding fills and the layers read; :func:`setup_backbone` wires it.

Shapes: B batch, T new tokens, S key slots, H hidden, L layers, P per-layer input width, N tokens (B*T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models.attention import KVStore, sdpa_attention
from ember.models.gemma import GeGLUMLP, ScaledEmbedding
from ember.models.linear import Linear, project
from ember.models.moe import mix_experts
from ember.models.rope import apply_rope


class Gemma4RMSNorm(nn.Module):
    """RMSNorm in fp32 times ``weight`` (ones at init), or with no weight (``with_scale=False``), rounded to the
    input dtype at the end (HF's ``Gemma4RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


class Gemma4Pass:
    """What one forward pass shares between the embedding and the layers: the per-layer inputs (B, T, L, P) and
    the keys/values of the producing layers by layer type. Not a module: holds no weights."""

    def __init__(self) -> None:
        self.per_layer: torch.Tensor | None = None
        self.shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.backbone: nn.Module | None = None


class Gemma4Embedding(ScaledEmbedding):
    """The scaled token embedding; on each call it also starts a :class:`Gemma4Pass` (the per-layer inputs from the
    backbone's PLE modules, where the model has them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.state = Gemma4Pass()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return begin_pass(self.state, self.cfg, input_ids, super().forward(input_ids))


def begin_pass(state: Gemma4Pass, cfg: ModelConfig, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Start one forward pass from the embedded tokens ``x`` (B, T, H): clear the shared keys/values and fill the
    per-layer inputs (B, T, L, P) where the model has them. Returns ``x``."""
    state.shared_kv = {}
    bb = state.backbone
    if bb is not None and cfg.hidden_size_per_layer_input:
        B, T = input_ids.shape
        shape = (B, T, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        token = bb.embed_tokens_per_layer(input_ids).view(shape)
        context = (bb.per_layer_model_projection(x) * cfg.hidden_size ** -0.5).view(shape)
        state.per_layer = (bb.per_layer_projection_norm(context) + token) * 2.0 ** -0.5
    return x


class PerLayerEmbedding(ScaledEmbedding):
    """The packed per-layer table (V_ple, L * P) scaled by ``sqrt(P)`` (HF's ``embed_tokens_per_layer``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        width = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
        nn.Embedding.__init__(self, cfg.vocab_size_per_layer_input, width)
        self.scale = cfg.hidden_size_per_layer_input ** 0.5


class Gemma4Attention(nn.Module):
    """Attention with weighted q/k norms, a weightless v norm, scale 1, this layer's head shape; keys/values made
    here (and cached) or reused from an earlier layer (``kv_source``)."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer, self.sliding_window = layer, sliding_window
        self.kind = "sliding_attention" if sliding_window is not None else "full_attention"
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
        h, b, eps = cfg.hidden_size, cfg.attention_bias, cfg.rms_norm_eps
        self.shared = cfg.kv_source(layer) is not None
        # the last layer of its type before the shared ones keeps its keys/values for them
        self.stores = not self.shared and any(cfg.kv_source(j) == layer for j in range(cfg.num_hidden_layers))
        self.q_proj = Linear(h, self.nh * self.hd, bias=b)
        self.q_norm = Gemma4RMSNorm(self.hd, eps)
        if not self.shared:
            self.k_proj = Linear(h, self.nkv * self.hd, bias=b)
            self.v_proj = None if cfg.attention_k_eq_v and sliding_window is None else Linear(h, self.nkv * self.hd, bias=b)
            self.k_norm = Gemma4RMSNorm(self.hd, eps)
            self.v_norm = Gemma4RMSNorm(self.hd, eps, with_scale=False)
        self.o_proj = Linear(self.nh * self.hd, h, bias=b)
        self.state: Gemma4Pass | None = None  # set by setup_backbone

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVStore | None, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, 1, T, hd) of this layer type's RoPE -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd))
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        if self.shared:
            k, v = self.state.shared_kv[self.kind]  # (B, nkv, S, hd), the producing layer's after its cache update
        else:
            if self.v_proj is None:  # attention_k_eq_v: the values are the raw key projection
                k = self.k_proj(x)
                v = k
            else:
                k, v = project(x, (self.k_proj, self.v_proj))
            k = apply_rope(self.k_norm(k.view(B, T, self.nkv, self.hd)).transpose(1, 2), cos, sin)
            v = self.v_norm(v.view(B, T, self.nkv, self.hd)).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
            if self.stores:
                self.state.shared_kv[self.kind] = (k, v)
        return self.o_proj(sdpa_attention(q, k, v, mask, is_causal, scale=1.0))


class Gemma4Router(nn.Module):
    """Softmax top-k router over a weightless-normed, scaled input (HF's ``Gemma4TextRouter``): fp32 softmax, the
    top ``k`` renormalised, each times its expert's learned scale. ``proj`` is an ``nn.Linear``, not Ember's
    :class:`Linear`, so quantization leaves it in float (a rounding error there changes which experts run)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, e = cfg.hidden_size, cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm = Gemma4RMSNorm(h, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(h, e, bias=False)
        self.scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(e))
        self.root = h ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) fp32 and expert ids (N, k)."""
        x = self.norm(x) * self.scale * self.root
        probs = F.softmax(self.proj(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Gemma4DecoderLayer(nn.Module):
    """Sandwich-normed attention and MLP (plus the MoE block beside the MLP), then the per-layer input, then the
    layer scalar (HF's ``Gemma4TextDecoderLayer``; the same names)."""

    final_norm = Gemma4RMSNorm

    def __init__(self, cfg: ModelConfig, layer: int, attention_type: str = "full_attention",
                 mlp_type: str = "dense") -> None:
        super().__init__()
        self.attention_type, self.mlp_type, self.layer = attention_type, mlp_type, layer
        self.window = cfg.layer_window(layer) if attention_type == "sliding_attention" else None
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma4Attention(cfg, layer, self.window)
        double = cfg.use_double_wide_mlp and cfg.kv_source(layer) is not None
        self.mlp = GeGLUMLP(cfg, cfg.intermediate_size * (2 if double else 1))
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # stored in the checkpoint
        self.per_layer = cfg.hidden_size_per_layer_input
        if self.per_layer:
            self.per_layer_input_gate = Linear(h, self.per_layer, bias=False)
            self.per_layer_projection = Linear(self.per_layer, h, bias=False)
            self.post_per_layer_input_norm = Gemma4RMSNorm(h, eps)
        self.moe = bool(cfg.num_local_experts)
        if self.moe:
            self.router = Gemma4Router(cfg)
            self.experts = nn.ModuleList(GeGLUMLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_local_experts))
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                setattr(self, name, Gemma4RMSNorm(h, eps))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); cos/sin are this layer type's RoPE."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                                             is_causal))
        y = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:  # the router and the experts read the residual stream, not the MLP's input
            flat = x.reshape(-1, x.shape[-1])  # (N, H)
            weights, ids = self.router(flat)
            moe = mix_experts(self.experts, self.pre_feedforward_layernorm_2(flat), weights, ids).view(x.shape)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(y)
        if self.per_layer:
            gate = F.gelu(self.per_layer_input_gate(x), approximate="tanh")
            extra = self.self_attn.state.per_layer[:, :, self.layer]  # (B, T, P)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate * extra))
        return x * self.layer_scalar


def setup_backbone(backbone: nn.Module, cfg: ModelConfig) -> None:
    """Add the model-level per-layer-input modules under HF's names (``model.embed_tokens_per_layer``,
    ``model.per_layer_model_projection``, ``model.per_layer_projection_norm``) and share one :class:`Gemma4Pass`
    between the embedding and every attention."""
    if cfg.hidden_size_per_layer_input:
        width = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
        backbone.embed_tokens_per_layer = PerLayerEmbedding(cfg)
        backbone.per_layer_model_projection = Linear(cfg.hidden_size, width, bias=False)
        backbone.per_layer_projection_norm = Gemma4RMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps)
    state = backbone.embed_tokens.state
    state.backbone = backbone
    for layer in backbone.layers:
        layer.self_attn.state = state


# The pieces Gemma 4 puts in place of Llama's (see ember.models.decoder.FAMILY_CLASSES).
GEMMA4_CLASSES = {"layer": Gemma4DecoderLayer, "embedding": Gemma4Embedding, "norm": Gemma4RMSNorm,
                  "backbone": setup_backbone}
