"""The decoder layer, assembled per layer from the config's layer kinds (HF's ``layer_types`` and friends).

A layer is ``x + attention(norm(x))`` then ``x + mlp(norm(x))``; which attention and which MLP comes from
two per-layer lists, each entry a key of a table below:

* :func:`attention_types` -> ``ATTENTION_CLASSES``: ``"full_attention"``, ``"sliding_attention"`` (HF's
  ``layer_types`` where the config has it, else Mistral's/Qwen2's ``sliding_window`` fields);
* :func:`mlp_types` -> ``MLP_CLASSES``: ``"dense"`` (SwiGLU) or ``"moe"`` (Qwen3-MoE's
  ``decoder_sparse_step``/``mlp_only_layers``, every layer for Mixtral).

A family with a new piece adds one class and one table entry; the runtime (:mod:`ember.runtime`) runs any
piece it has no kernel for as its PyTorch module.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ember.config import ModelConfig
from ember.hybrid_config import BLOCK_TYPES
from ember.models.attention import Attention
from ember.models.gemma import GEMMA3_CLASSES
from ember.models.gemma4 import GEMMA4_CLASSES
from ember.models.minimax import MINIMAX_M2_CLASSES
from ember.models.mla import MLAttention
from ember.models.gpt_oss import GptOssMLP, SinkAttention
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.models.nemotron_h import NemotronHBlock
from ember.models.routed_moe import PartialRopeAttention, RoutedMoE
from ember.models.norms import RMSNorm
from ember.models.qwen3_next import HybridDecoderLayer

# attention kind -> (cfg, layer index, sliding window or None) -> module
ATTENTION_CLASSES: dict[str, Callable[[ModelConfig, int, int | None], nn.Module]] = {
    "full_attention": Attention,
    "sliding_attention": Attention,  # the same projections; the model's mask hides keys outside the window
    "sink_attention": SinkAttention,  # gpt-oss: learned per-head sinks; full or windowed per layer_types
}
# MLP kind -> (cfg) -> module
MLP_CLASSES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "dense": MLP,
    "moe": SparseMoE,
    "gpt_oss_moe": GptOssMLP,  # biased top-k router, clamped-SwiGLU experts in HF's fused layout
}

# model_type -> the pieces a family puts in place of Llama's: an attention kind or MLP kind of the tables above,
# "layer" (the decoder layer class), "embedding" ((cfg) -> token embedding), "norm" ((dim, eps) -> final norm),
# "backbone" ((backbone, cfg) -> None: adds model-level modules after the layers are built).
FAMILY_CLASSES: dict[str, dict[str, Callable]] = {
    "gemma3_text": GEMMA3_CLASSES,
    "gemma3": GEMMA3_CLASSES,
    "gemma2": GEMMA3_CLASSES,
    "glm4_moe": {"full_attention": PartialRopeAttention, "moe": RoutedMoE},
    "deepseek_v3": {"full_attention": MLAttention, "moe": RoutedMoE},
    "minimax_m2": MINIMAX_M2_CLASSES,
    "gemma4_text": GEMMA4_CLASSES,
}


def family_class(cfg: ModelConfig, piece: str, default: Callable | None) -> Callable | None:
    """The class of ``piece`` (a table key, "layer", "embedding" or "norm") for ``cfg``'s family."""
    return FAMILY_CLASSES.get(cfg.model_type, {}).get(piece, default)


# layer_types entries that are recurrent mixers, not attention (their family's layer class builds them)
RECURRENT_TYPES = ("linear_attention",)
# ... and Nemotron-H's layers with no token mixer at all (one MLP or MoE block), built by its layer class
NON_ATTENTION_TYPES = RECURRENT_TYPES + BLOCK_TYPES


def attention_types(cfg: ModelConfig) -> list[str]:
    """Each layer's attention kind (a key of ``ATTENTION_CLASSES``, or a ``NON_ATTENTION_TYPES`` block)."""
    types = cfg.layer_types or []
    return [types[i] if i < len(types) and types[i] in NON_ATTENTION_TYPES
            else "sink_attention" if cfg.attention_sinks
            else "full_attention" if cfg.layer_window(i) is None else "sliding_attention"
            for i in range(cfg.num_hidden_layers)]


def mlp_types(cfg: ModelConfig) -> list[str]:
    """Each layer's MLP kind (a key of ``MLP_CLASSES``)."""
    moe = "gpt_oss_moe" if cfg.model_type == "gpt_oss" else "moe"
    return [moe if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]


def layer_class(cfg: ModelConfig) -> type[nn.Module]:
    """The decoder layer class of ``cfg``'s family: :class:`DecoderLayer`, or a row of ``LAYER_CLASSES``."""
    return LAYER_CLASSES.get(cfg.model_type, DecoderLayer)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; submodule names are HF's (``self_attn``, ``mlp``, ``input_layernorm``, ...)."""

    def __init__(self, cfg: ModelConfig, layer: int, attention_type: str = "full_attention",
                 mlp_type: str = "dense") -> None:
        super().__init__()
        self.attention_type, self.mlp_type = attention_type, mlp_type
        self.window = None if attention_type == "full_attention" else cfg.layer_window(layer)
        self.self_attn = family_class(cfg, attention_type, ATTENTION_CLASSES[attention_type])(cfg, layer, self.window)
        self.mlp = family_class(cfg, mlp_type, MLP_CLASSES[mlp_type])(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, is_causal: bool) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); ``mask`` is this layer's (its window's), ``cache`` the model's."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


# model_type -> decoder layer class, for families whose layers differ from DecoderLayer beyond its two tables
# (same constructor and forward signature; a ``final_norm`` class attribute names the model's final norm)
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    "qwen3_next": HybridDecoderLayer,
    "qwen3_5_text": HybridDecoderLayer,
    "qwen3_5_moe_text": HybridDecoderLayer,
    "nemotron_h": NemotronHBlock,
}
