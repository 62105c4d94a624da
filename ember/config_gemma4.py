"""Gemma 4's config.json fields, read onto :class:`ember.config.ModelConfig` (HF's ``Gemma4TextConfig``).

Gemma 4 varies the attention by layer type: the sliding layers use ``head_dim`` and ``num_key_value_heads`` with
the default RoPE, the full layers ``global_head_dim`` (512 unless the file says otherwise) and, with
``attention_k_eq_v``, ``num_global_key_value_heads``, with "proportional" RoPE (only the first
``partial_rotary_factor`` of the frequency pairs turn). transformers 5 writes those per-layer facts as
``per_layer_config`` ({layer index: {head_dim, num_key_value_heads}} for the full layers); the published files
give ``global_head_dim``/``num_global_key_value_heads``. Both are read here. No import of :mod:`ember.config`
(it imports this module).
"""

from __future__ import annotations

from typing import Any

from ember.errors import ConfigError, UnsupportedModelError

# HF's defaults where config.json leaves a field out (Gemma4TextConfig)
DEFAULTS = {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512,
            "head_dim": 256, "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
            "max_position_embeddings": 131072}
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
DEFAULT_GLOBAL_HEAD_DIM = 512
SLIDING_PATTERN = 6  # without layer_types: every sixth layer is full


def read_gemma4_fields(raw: dict[str, Any], kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """Fill ``kwargs`` (ModelConfig fields being built) with Gemma 4's layer types, full-layer head shape, MoE and
    RoPE facts; returns ``raw`` with HF's default ``rope_parameters`` where it has none."""
    if raw.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention 'all' (a non-causal encoder) is not "
                                    f"supported; Ember runs Gemma 4 as a causal decoder")
    n = kwargs["num_hidden_layers"]
    types = list(kwargs.get("layer_types") or ["full_attention" if (i + 1) % SLIDING_PATTERN == 0
                                                else "sliding_attention" for i in range(n)])
    if types and len(types) == n:
        types[-1] = "full_attention"  # as HF: the last layer is always full
    kwargs["layer_types"] = types
    k_eq_v = bool(raw.get("attention_k_eq_v", False))
    per_layer = raw.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        shapes = set()
        for key, entry in per_layer.items():
            i = int(key) if str(key).isdigit() else -1
            if not (0 <= i < n and types[i] == "full_attention" and isinstance(entry, dict)):
                raise UnsupportedModelError(f"{source}: per_layer_config entry {key!r} is not a full-attention layer "
                                            f"override; Ember reads only those")
            shapes.add((entry.get("head_dim"), entry.get("num_key_value_heads")))
        if len(shapes) != 1:
            raise UnsupportedModelError(f"{source}: per_layer_config gives the full layers different shapes "
                                        f"{sorted(shapes, key=str)}; Ember needs one")
        head, kv = shapes.pop()
    else:
        head, kv = raw.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM), raw.get("num_global_key_value_heads")
        kv = kv if k_eq_v else None
    kwargs["global_head_dim"] = head
    kwargs["num_global_key_value_heads"] = kv
    if not raw.get("enable_moe_block", False):
        kwargs["num_local_experts"], kwargs["num_experts_per_tok"] = 0, 0
    elif not raw.get("moe_intermediate_size"):
        raise ConfigError(f"{source}: enable_moe_block is true but 'moe_intermediate_size' is missing")
    rope = raw.get("rope_parameters") or DEFAULT_ROPE
    full = rope.get("full_attention") if isinstance(rope, dict) else None
    if isinstance(full, dict) and full.get("rope_type") == "proportional" and full.get("factor") is None:
        rope = {**rope, "full_attention": {**full, "factor": 1.0}}  # HF's default; the validator wants one
    return {**raw, "rope_parameters": rope}


def gemma4_count(cfg: Any, experts: int) -> int:
    """Parameters of a Gemma 4 text model (embeddings once when tied) with ``experts`` experts per MoE layer."""
    h, v, nh, L = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_hidden_layers
    p, b = cfg.hidden_size_per_layer_input, cfg.attention_bias
    total = v * h * (1 if cfg.tie_word_embeddings else 2) + h
    if p:  # per-layer input embeddings, their projection from the hidden state and its norm
        total += cfg.vocab_size_per_layer_input * L * p + h * L * p + p
    for i in range(L):
        hd, nkv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        attn = 2 * h * nh * hd + hd + b * (nh * hd + h)  # q, o, q_norm
        if cfg.kv_source(i) is None:  # a layer that reuses another's keys/values has no k/v projections
            kv_proj = 1 if cfg.attention_k_eq_v and cfg.layer_window(i) is None else 2
            attn += kv_proj * (h * nkv * hd + b * nkv * hd) + hd
        width = cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and cfg.kv_source(i) is not None else 1)
        layer = attn + 3 * h * width + 4 * h
        if p:
            layer += 2 * h * p + h
        if cfg.num_local_experts:  # router (proj, scale, per-expert scale), experts, three more norms
            layer += cfg.num_local_experts * (h + 1) + h + experts * 3 * h * cfg.moe_intermediate_size + 3 * h
        total += layer
    return total


def kv_source(cfg: Any, layer: int) -> int | None:
    """The earlier layer whose keys/values ``layer`` reuses (the last of its type before the shared ones: HF's
    ``num_kv_shared_layers``), or None when it makes its own."""
    first = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    if not cfg.num_kv_shared_layers or layer < first:
        return None
    kind = cfg.layer_types[layer]
    found = [j for j in range(first) if cfg.layer_types[j] == kind]
    if not found:
        raise ConfigError(f"{cfg.model_type}: layer {layer} shares keys/values but no earlier {kind} layer makes them")
    return found[-1]
