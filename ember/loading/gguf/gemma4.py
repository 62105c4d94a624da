"""llama.cpp's ``gemma4`` architecture: what ``convert_hf_to_gguf.py`` writes for ``Gemma4ForCausalLM`` /
``Gemma4ForConditionalGeneration`` (text part), undone into HF ``Gemma4TextConfig`` fields and the parameter
names of :mod:`ember.models.gemma4`.

Metadata beyond ``gemma3``'s: ``attention.sliding_window_pattern`` (one bool per layer), ``key_length`` /
``value_length`` for the full layers and ``*_swa`` for the sliding ones, ``head_count_kv`` and
``feed_forward_length`` per layer, ``attention.shared_kv_layers``, ``embedding_length_per_layer_input`` and, for
the MoE variant, ``expert_count`` / ``expert_used_count`` / ``expert_feed_forward_length``. Facts the converter
leaves implicit and how they are recovered:

- ``attention_k_eq_v``: a full layer that makes its own keys has no ``attn_v`` tensor (values = key projection);
- ``use_double_wide_mlp``: the shared layers' ``feed_forward_length`` is twice the others';
- the full layers' "proportional" RoPE: ``rope_freqs`` holds 1 for each rotated frequency pair and 1e30 for the
  rest, so ``partial_rotary_factor`` = 2 * (count of ones) / ``key_length``;
- norms are stored as they are (no ``1 + w`` shift, unlike ``gemma3``); the per-expert router scale is
  ``ffn_down_exps.scale``, the router's input scale ``ffn_gate_inp.scale``; ``ffn_gate_up_exps`` stacks each
  expert's gate rows then up rows (HF's ``experts.gate_up_proj``).
"""

from __future__ import annotations

from typing import Any

import torch

from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.gguf.reader import GGUFFile

ARCH = "gemma4"
# blk.N.<key> -> model.layers.N.<module> (with the suffix carried over)
TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection", "post_norm": "post_per_layer_input_norm",
    "ffn_gate_inp": "router.proj", "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1", "post_ffw_norm_2": "post_feedforward_layernorm_2",
}
# whole parameters: blk.N.<key>.<suffix> -> model.layers.N.<name>
PARAMS: dict[str, str] = {"layer_output_scale.weight": "layer_scalar", "ffn_gate_inp.scale": "router.scale",
                          "ffn_down_exps.scale": "router.per_expert_scale"}
# model-level per-layer-input tensors
GLOBALS: dict[str, str] = {"per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
                           "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
                           "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}
_UNROTATED = 1e29  # rope_freqs entries at or above this mark a pair that does not turn


def expert_targets(layer: int, key: str, n_experts: int) -> list[str] | None:
    """Per-expert Linears filled by a stacked expert tensor: ``ffn_gate_up_exps`` (E, 2I, H) as (2E, I, H), each
    expert's gate rows then its up rows; ``ffn_down_exps`` (E, H, I)."""
    prefix = f"model.layers.{layer}.experts."
    if key == "ffn_gate_up_exps":
        return [f"{prefix}{e}.{kind}_proj.weight" for e in range(n_experts) for kind in ("gate", "up")]
    if key == "ffn_down_exps":
        return [f"{prefix}{e}.down_proj.weight" for e in range(n_experts)]
    return None


def _per_layer(gf: GGUFFile, key: str, n: int, required: bool = True) -> list[int] | None:
    """An integer key written once or as one value per layer, as a per-layer list."""
    v = gf.get(f"{ARCH}.{key}")
    if v is None:
        if required:
            raise GGUFError(f"{gf.path}: metadata '{ARCH}.{key}' is missing")
        return None
    vals = v if isinstance(v, list) else [v]
    if any(not isinstance(x, int) or isinstance(x, bool) for x in vals):
        raise GGUFError(f"{gf.path}: metadata '{ARCH}.{key}' must be an integer or one integer per layer, got {v!r}")
    if isinstance(v, list) and len(v) != n:
        raise GGUFError(f"{gf.path}: metadata '{ARCH}.{key}' has {len(v)} entries for {n} layers")
    return vals * n if not isinstance(v, list) else vals


def _one(gf: GGUFFile, key: str, values: list[int], what: str) -> int:
    """The single value ``values`` must share (Ember runs one shape per layer type)."""
    found = sorted(set(values))
    if len(found) != 1:
        raise UnsupportedModelError(f"{gf.path}: '{ARCH}.{key}' gives the {what} layers different values {found}; "
                                    "Ember runs one shape per layer type")
    return found[0]


def _full_rotary_factor(gf: GGUFFile, head_dim: int) -> float:
    """The full layers' ``partial_rotary_factor`` from ``rope_freqs`` (1 = rotated pair, 1e30 = not rotated)."""
    if "rope_freqs.weight" not in gf.tensors:
        return 1.0
    f = gf.tensor("rope_freqs.weight", torch.float32)
    rotated = f < _UNROTATED
    n_rot = int(rotated.sum())
    if f.numel() != head_dim // 2 or not torch.all(f[rotated] == 1.0) or bool(rotated[n_rot:].any()):
        raise UnsupportedModelError(f"{gf.path}: rope_freqs.weight is not Gemma 4's proportional RoPE (ones for "
                                    f"the first rotated pairs of {head_dim // 2}, then 1e30); not supported")
    return 2.0 * n_rot / head_dim


def gemma4_config(gf: GGUFFile, hidden: int) -> dict[str, Any]:
    """The HF ``Gemma4TextConfig`` fields of a ``gemma4`` file (module docstring for the implicit ones).

    Raises:
        GGUFError: missing or malformed metadata.
        UnsupportedModelError: a layout HF's Gemma 4 cannot express (e.g. two shapes among the full layers).
    """
    g = lambda key, default=None, required=False: gf.get_int(f"{ARCH}.{key}", default, required)  # noqa: E731
    n = g("block_count", required=True)
    pattern = gf.get(f"{ARCH}.attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n:
        raise GGUFError(f"{gf.path}: metadata '{ARCH}.attention.sliding_window_pattern' must hold one bool per "
                        f"layer ({n}), got {pattern!r}")
    types = ["sliding_attention" if s else "full_attention" for s in pattern]
    sliding, full = [i for i in range(n) if pattern[i]], [i for i in range(n) if not pattern[i]]
    shared = g("attention.shared_kv_layers", 0)
    first_shared = n - shared
    kv = _per_layer(gf, "attention.head_count_kv", n)
    head_dim = g("attention.key_length_swa", required=True)
    global_head_dim = g("attention.key_length", required=True)
    for k, v in (("key_length_swa", "value_length_swa"), ("key_length", "value_length")):
        if g(f"attention.{v}", g(f"attention.{k}")) != g(f"attention.{k}"):
            raise UnsupportedModelError(f"{gf.path}: attention.{k} != attention.{v}; not supported")
    kv_sliding = _one(gf, "attention.head_count_kv", [kv[i] for i in sliding], "sliding") if sliding else kv[0]
    kv_full = _one(gf, "attention.head_count_kv", [kv[i] for i in full], "full") if full else kv_sliding
    own_full = [i for i in full if i < first_shared]
    k_eq_v = bool(own_full) and f"blk.{own_full[0]}.attn_v.weight" not in gf.tensors
    if not k_eq_v and kv_full != kv_sliding:
        raise UnsupportedModelError(f"{gf.path}: the full layers have {kv_full} kv heads and their own values; HF's "
                                    f"Gemma 4 gives them their own kv head count only with k = v")
    if g("rope.dimension_count_swa", head_dim) != head_dim:
        raise UnsupportedModelError(f"{gf.path}: partial RoPE on the sliding layers (rope.dimension_count_swa "
                                    f"{g('rope.dimension_count_swa')} of {head_dim}) is not supported")
    if gf.get(f"{ARCH}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"{gf.path}: rope scaling {gf.get(f'{ARCH}.rope.scaling.type')!r} for "
                                    f"{ARCH!r} is not supported")
    ff = _per_layer(gf, "feed_forward_length", n)
    inter = ff[0]
    double = shared > 0 and all(ff[i] == 2 * inter for i in range(first_shared, n))
    if any(ff[i] != inter for i in range(first_shared)) or not (double or len(set(ff)) == 1):
        raise UnsupportedModelError(f"{gf.path}: feed_forward_length {ff} is neither one width nor twice it on the "
                                    f"{shared} shared layers (use_double_wide_mlp); not supported")
    per_layer = g("embedding_length_per_layer_input", 0)
    window = g("attention.sliding_window")
    raw: dict[str, Any] = {
        "model_type": "gemma4_text", "num_hidden_layers": n, "num_attention_heads": g("attention.head_count",
                                                                                     required=True),
        "num_key_value_heads": kv_sliding, "head_dim": head_dim, "global_head_dim": global_head_dim,
        "attention_k_eq_v": k_eq_v, "num_global_key_value_heads": kv_full if k_eq_v else None,
        "intermediate_size": inter, "use_double_wide_mlp": double, "num_kv_shared_layers": shared,
        "layer_types": types, "sliding_window": window if window else None,
        "max_position_embeddings": g("context_length", 131072),
        "rms_norm_eps": gf.get_float(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6),
        "final_logit_softcapping": gf.get_float(f"{ARCH}.final_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": "blk.0.attn_q.bias" in gf.tensors,
        "hidden_size_per_layer_input": per_layer,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": gf.get_float(f"{ARCH}.rope.freq_base_swa", 10000.0)},
            "full_attention": {"rope_type": "proportional", "factor": 1.0,
                               "partial_rotary_factor": _full_rotary_factor(gf, global_head_dim),
                               "rope_theta": gf.get_float(f"{ARCH}.rope.freq_base", 1e6)}},
    }
    if per_layer:
        name = "per_layer_token_embd.weight"
        if name not in gf.tensors or len(gf.tensor_shape(name)) != 2:
            raise GGUFError(f"{gf.path}: embedding_length_per_layer_input is {per_layer} but tensor {name!r} is "
                            "missing or not a matrix")
        raw["vocab_size_per_layer_input"] = gf.tensor_shape(name)[0]
    experts = g("expert_count", 0)
    if experts:
        raw.update(enable_moe_block=True, num_experts=experts, top_k_experts=g("expert_used_count", required=True),
                   moe_intermediate_size=g("expert_feed_forward_length", required=True))
    return raw
