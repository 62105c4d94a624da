"""The Nemotron-H / Nemotron 3 layer (HF's ``modeling_nemotron_h.py``): one block per layer.

``config.layer_types`` (HF's ``layers_block_type``) names each layer's only block, applied as
``x + block(norm(x))``:

* ``"linear_attention"``: a Mamba-2 mixer (:mod:`ember.models.mamba2`), with recurrent state;
* ``"full_attention"``: grouped-query attention with **no** position embedding (:class:`NoPositionAttention`);
* ``"mlp"``: ``down(relu(up(x))^2)`` (:class:`ReluSquaredMLP`);
* ``"moe"``: relu2 experts under GLM/DeepSeek's sigmoid group-limited router, plus one shared relu2 expert
  (:class:`NemotronMoE`), optionally through a latent projection (``moe_latent_size``).

The block is named ``mixer`` and the norm ``norm`` as in the checkpoints; the published files keep the model
under ``backbone.`` (``embeddings``, ``norm_f``), which :mod:`ember.loading.names` maps onto Ember's names.

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, nh/nkv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.hybrid_config import MAMBA_DEFAULTS
from ember.models.attention import Attention
from ember.models.linear import Linear, project
from ember.models.mamba2 import Mamba2Mixer
from ember.models.moe import SparseMoE
from ember.models.qwen3_next import cached_attention, new_token_valid
from ember.models.routed_moe import GroupTopkRouter


class FloatScaleRMSNorm(nn.Module):
    """RMSNorm whose weight multiplies in fp32 before the cast back to the input dtype (HF's
    ``NemotronHRMSNorm``; Llama's casts first). Another class than RMSNorm, so no runtime mistakes it for one."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class ReluSquaredMLP(nn.Module):
    """``down(relu(up(x))^2)`` (HF's ``NemotronHMLP``); also each expert of :class:`NemotronMoE`."""

    def __init__(self, dim: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = Linear(dim, width, bias=bias)
        self.down_proj = Linear(width, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class NemotronMoE(SparseMoE):
    """Sigmoid group-routed relu2 experts (run as :class:`SparseMoE` runs its experts) plus a shared relu2 expert
    on every token (HF's ``NemotronHMoE``). With ``moe_latent_size`` the experts work in a smaller space:
    ``fc2_latent_proj(experts(fc1_latent_proj(x)))``, routed on x itself."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        extra = {**MAMBA_DEFAULTS, **cfg.extra}
        latent = extra["moe_latent_size"]
        dim = latent or cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = GroupTopkRouter(cfg)
        self.experts = nn.ModuleList(ReluSquaredMLP(dim, cfg.moe_intermediate_size, cfg.mlp_bias)
                                     for _ in range(cfg.num_local_experts))
        self.shared_experts = ReluSquaredMLP(cfg.hidden_size, extra["moe_shared_expert_intermediate_size"],
                                             cfg.mlp_bias)
        if latent:
            self.fc1_latent_proj = Linear(cfg.hidden_size, latent, bias=cfg.mlp_bias)
            self.fc2_latent_proj = Linear(latent, cfg.hidden_size, bias=cfg.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (N, k) fp32 and expert ids (N, k); with a latent space, those of the hidden states
        that :meth:`forward` routed before projecting them."""
        return self._routing if self._routing is not None else self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x)
        if self.fc1_latent_proj is None:
            return super().forward(x) + shared
        self._routing = self.gate(x.reshape(-1, x.shape[-1]))
        try:
            routed = super().forward(self.fc1_latent_proj(x))
        finally:
            self._routing = None
        return self.fc2_latent_proj(routed) + shared


class NoPositionAttention(Attention):
    """Grouped-query attention with no RoPE and no q/k norms (Nemotron-H: the Mamba layers carry position)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H), mask bool (B or 1, 1, T, S) or None -> (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(B, T, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        return self.o_proj(cached_attention(q, k, v, mask, is_causal))


class NemotronHBlock(nn.Module):
    """``x + mixer(norm(x))``, the mixer chosen by ``layer_types[layer]`` (HF's ``NemotronHBlock``)."""

    final_norm = FloatScaleRMSNorm  # the model's final norm (HF's norm_f)

    def __init__(self, cfg: ModelConfig, layer: int, attention_type: str = "full_attention",
                 mlp_type: str = "dense") -> None:
        super().__init__()
        self.attention_type = self.block_type = cfg.layer_types[layer]
        self.mlp_type = mlp_type
        self.window = None
        self.norm = FloatScaleRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.block_type == "linear_attention":
            self.mixer = Mamba2Mixer(cfg, layer)
        elif self.block_type == "full_attention":
            self.mixer = NoPositionAttention(cfg, layer)
        elif self.block_type == "moe":
            self.mixer = NemotronMoE(cfg)
        else:
            self.mixer = ReluSquaredMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); ``mask`` the attention mask (cos/sin unused: no RoPE), ``cache`` the model's."""
        h = self.norm(x)
        if self.block_type == "linear_attention":
            return x + self.mixer(h, new_token_valid(mask, x.shape[1], cache), cache)
        if self.block_type == "full_attention":
            return x + self.mixer(h, mask, cache, is_causal)
        return x + self.mixer(h)
