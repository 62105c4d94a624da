"""What each layer keeps between tokens, and what it costs: the layout both caches of :mod:`ember.cache` allocate.

Each layer keeps one of these kinds of state (:func:`layer_specs` reads them from the config):

* ``"full_attention"``: keys and values of every token (grows with the sequence);
* ``"sliding_attention"``: keys and values of the last ``window`` tokens only (a ring in the static cache,
  window-pool blocks given back as they leave the window in the paged one: :func:`ring_layers`);
* ``"latent"``: multi-head latent attention's per-token latent (DeepSeek-V3: ``kv_lora_rank`` channels and the
  shared ``qk_rope_head_dim`` rotated key), one head, not expanded keys/values (grows with the sequence);
* ``"recurrent"``: a fixed-size state per sequence, e.g. a convolution window and an SSM or delta-rule
  matrix, whatever the length;
* ``"shared"``: nothing of its own: the layer reads an earlier layer's keys/values (Gemma 4's
  ``num_kv_shared_layers``), so neither cache allocates buffers for it.

:func:`bytes_per_token` and :func:`bytes_per_sequence` price each kind, so memory plans (:mod:`ember.planner`) and
pool sizes come from the same numbers as the caches allocate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ember.config import ModelConfig
from ember.hybrid_config import BLOCK_TYPES, mamba_dims

LAYER_KINDS = ("full_attention", "sliding_attention", "recurrent", "latent", "shared")
NO_KV = ("recurrent", "shared")  # the kinds that keep no keys/values of their own (no buffers in either cache)
# Recurrent state is summed over every token of a sequence: it is kept in fp32 (as HF keeps it) in every cache.
RECURRENT_STATE_DTYPE = torch.float32


@dataclass(frozen=True)
class LayerSpec:
    """What one layer keeps per sequence between decode steps.

    Attributes:
        kind: one of ``LAYER_KINDS``.
        kv_heads, head_dim: key/value shape per token (attention kinds).
        window: tokens a sliding-window layer keeps (None otherwise).
        state_shapes: shapes of the fixed per-sequence tensors of a recurrent layer, e.g.
            ``((conv_dim, conv_kernel - 1), (heads, d_k, d_v))`` for a convolution window and a delta-rule state;
            ``()`` for a layer with no token mixer (Nemotron-H's MLP/MoE blocks): nothing per token or sequence.
        rope_dim: a latent layer's rotated-key channels; its ``head_dim`` is the latent's (``kv_lora_rank``), and
            ``kv_heads`` is 1. The cache's "keys" slot holds the latent, its "values" slot the rotated key.
    """

    kind: str
    kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None
    state_shapes: tuple[tuple[int, ...], ...] = ()
    rope_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer cache kind {self.kind!r}; known: {', '.join(LAYER_KINDS)}")
        if self.kind == "sliding_attention" and not (self.window and self.window > 0):
            raise ValueError(f"a sliding_attention layer needs a positive window, got {self.window!r}")


def recurrent_state_shapes(cfg: ModelConfig, layer: int) -> tuple[tuple[int, ...], ...] | None:
    """The per-sequence state shapes of ``layer`` when it is a recurrent mixer, else None.

    Gated DeltaNet (``layer_types`` "linear_attention"): the conv window (C, K - 1), C = 2 Hk dk + Hv dv, and the
    delta-rule matrices (Hv, dk, dv). Nemotron-H's Mamba-2 ("linear_attention"): the conv window
    (H P + 2 G N, K - 1) and the SSM state (H, P, N); its MLP and MoE layers keep nothing: ``()``.
    """
    types = cfg.layer_types or []
    kind = types[layer] if layer < len(types) else None
    if cfg.model_type == "nemotron_h" and kind != "full_attention":
        if kind in BLOCK_TYPES:
            return ()
        m = mamba_dims(cfg)
        return (m.conv_dim, m.kernel - 1), (m.heads, m.head_dim, m.state)
    if kind == "linear_attention":
        conv = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim \
            + cfg.linear_num_value_heads * cfg.linear_value_head_dim
        return ((conv, cfg.linear_conv_kernel_dim - 1),
                (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim))
    return None


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    """Each layer's :class:`LayerSpec` from the config (its ``layer_types`` or sliding-window fields)."""
    out = []
    for i in range(cfg.num_hidden_layers):
        shapes = recurrent_state_shapes(cfg, i)
        if shapes is not None:
            out.append(LayerSpec("recurrent", state_shapes=shapes))
            continue
        if cfg.kv_source(i) is not None:  # reuses an earlier layer's keys/values
            out.append(LayerSpec("shared"))
            continue
        if cfg.kv_lora_rank:  # multi-head latent attention keeps the latent
            out.append(LayerSpec("latent", 1, cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim))
            continue
        w = cfg.layer_window(i)
        kind = "full_attention" if w is None else "sliding_attention"
        out.append(LayerSpec(kind, cfg.layer_kv_heads(i), cfg.layer_head_dim(i), w))
    return out


def ring_layers(cfg: ModelConfig) -> frozenset[int]:
    """The sliding-window layers with keys/values of their own (every family: Gemma 2/3/4's local layers,
    gpt-oss's, Mistral-style ``sliding_window``): the static cache keeps only their window (a ring) and the paged
    cache gives their blocks back as they leave it. Their attention takes the window's keys only and cuts the
    model's mask to them (:func:`ember.models.attention.fit_mask`)."""
    return frozenset(i for i, s in enumerate(layer_specs(cfg)) if s.kind == "sliding_attention")


def window_blocks_per_seq(window: int | None, prefill_chunk: int, block_size: int) -> int:
    """Most window-pool blocks one sequence holds at once (:meth:`PagedKVCache.window_blocks_per_seq`): a pass of up
    to ``prefill_chunk`` new tokens reads back ``window - 1`` tokens, a span that touches at most this many blocks
    (0 without a ring layer)."""
    if window is None:
        return 0
    return -(-(window - 1 + prefill_chunk) // block_size) + 1


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def bytes_per_token(spec: LayerSpec, dtype: torch.dtype) -> int:
    """Bytes one more cached token adds to one sequence's state in this layer (keys and values); 0 for a
    recurrent or shared layer. A sliding-window layer stops growing at its window (see :func:`bytes_per_sequence`)."""
    if spec.kind in NO_KV:
        return 0
    if spec.kind == "latent":
        return spec.kv_heads * (spec.head_dim + spec.rope_dim) * _element_size(dtype)
    return 2 * spec.kv_heads * spec.head_dim * _element_size(dtype)


def kv_shapes(spec: LayerSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, channels) per token of an attention layer's two cached tensors: keys and values, or for a latent
    layer the latent and the rotated key."""
    if spec.kind == "latent":
        return (spec.kv_heads, spec.head_dim), (spec.kv_heads, spec.rope_dim)
    return (spec.kv_heads, spec.head_dim), (spec.kv_heads, spec.head_dim)


def bytes_per_sequence(spec: LayerSpec, dtype: torch.dtype, tokens: int, cap_window: bool = True) -> int:
    """Bytes this layer keeps for one sequence of ``tokens`` tokens: every token's keys/values (full), the
    last ``window`` tokens' (sliding, unless ``cap_window`` is False: a cache that keeps them all), or the
    fixed recurrent state."""
    if spec.kind == "recurrent":  # kept in fp32 whatever the model dtype (see RECURRENT_STATE_DTYPE)
        return sum(math.prod(s) for s in spec.state_shapes) * _element_size(RECURRENT_STATE_DTYPE)
    held = min(tokens, spec.window) if spec.kind == "sliding_attention" and cap_window else tokens
    return held * bytes_per_token(spec, dtype)


def cache_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int, batch: int = 1, cap_window: bool = True) -> int:
    """Bytes of every layer's state for ``batch`` sequences of ``tokens`` tokens each."""
    return batch * sum(bytes_per_sequence(s, dtype, tokens, cap_window) for s in layer_specs(cfg))
