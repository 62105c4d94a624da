"""Model definitions: the pieces of a decoder-only transformer in the shape of HF's ``modeling_*.py``.

Plain PyTorch modules with HF's names, chosen per layer from the config (:mod:`ember.models.decoder`). No
kernels, caches or decode sessions here: :mod:`ember.runtime` makes the pieces it knows faster from
outside, through the slots of :mod:`ember.models.accel`.
"""

from __future__ import annotations

from ember.models.attention import Attention, KVStore, build_mask, sdpa_attention
from ember.models.decoder import ATTENTION_CLASSES, MLP_CLASSES, DecoderLayer, attention_types, mlp_types
from ember.models.linear import Linear, project
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.models.norms import RMSNorm
from ember.models.rope import apply_rope, rope_cos_sin, rope_inv_freq
from ember.models.transformer import Backbone, Transformer

__all__ = ["ATTENTION_CLASSES", "MLP_CLASSES", "MLP", "Attention", "Backbone", "DecoderLayer", "KVStore", "Linear",
           "RMSNorm", "SparseMoE", "Transformer", "apply_rope", "attention_types", "build_mask", "mlp_types",
           "project", "rope_cos_sin", "rope_inv_freq", "sdpa_attention"]
