"""The newer llama.cpp architectures: ``gpt-oss``, ``gemma3``, ``gemma4``, ``glm4moe``, ``deepseek2``, ``minimax-m2``.

For each, what ``convert_hf_to_gguf.py`` writes, undone into the HF ``config.json`` fields and parameter
names of Ember's model classes (``ember/models/gpt_oss.py``, ``gemma.py``, ``mla.py``, ``minimax.py``,
``routed_moe.py``). Facts the file does not carry are those llama.cpp itself fixes per architecture:

- ``gpt-oss``: every other layer (even ones) slides; SwiGLU clamp 7.0 with alpha 1.702; YaRN not truncated
  (the released config's ``truncate: false``). Experts are ``ffn_{gate,up,down}_exps`` (E, out, in) with
  biases, which Ember's fused HF layout (gate/up interleaved) is rebuilt from;
- ``gemma3``: the converter adds 1 to every ``*norm.weight`` (Gemma's ``(1 + w)`` norm), taken off here;
  layers slide except every 6th (``attention.sliding_window_pattern`` overrides); the query scale is
  1/sqrt(head_dim) except on the 62-layer 27B (1/sqrt(hidden/heads));
- ``glm4moe``: ``block_count`` counts the multi-token-prediction layers (``nextn_predict_layers``) that Ember
  does not run; their tensors are skipped;
- ``deepseek2``: MLA written as MQA over the latent (``key_length`` = kv_lora_rank + rope dims);
  ``kv_b_proj`` is split into ``attn_k_b`` (H, kv_lora_rank, nope), transposed, and ``attn_v_b``
  (H, v_dim, kv_lora_rank); older files keep ``attn_kv_b``. A file without ``expert_gating_func`` is
  DeepSeek-V2 (softmax router), which Ember does not run;
- ``minimax-m2``: sigmoid router with correction bias, q/k norms over all heads, partial RoPE;
- ``gemma4``: see :mod:`ember.loading.gguf.gemma4`.
"""

from __future__ import annotations

from typing import Any

from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.gguf import gemma4
from ember.loading.gguf.reader import GGUFFile

# llama.cpp's expert_gating_func values
_SOFTMAX, _SIGMOID = 1, 2

_ATTN = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm"}
_DENSE = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_ROUTED = {"ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
           "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}
# Per-layer tensors: blk.N.<key>.(weight|bias) -> model.layers.N.<module>.(weight|bias); PARAMS names a
# whole parameter where the suffix does not carry over.
FAMILY_TENSORS: dict[str, dict[str, str]] = {
    "gpt-oss": {**_ATTN, "post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router"},
    "gemma3": {**_ATTN, **_DENSE, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "glm4moe": {**_ATTN, **_DENSE, **_ROUTED, "post_attention_norm": "post_attention_layernorm"},
    "deepseek2": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
                  "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
                  "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
                  "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj", **_DENSE, **_ROUTED},
    "minimax-m2": {**_ATTN, "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"},
    gemma4.ARCH: gemma4.TENSORS,
}
PARAMS: dict[str, dict[str, str]] = {
    "gpt-oss": {"attn_sinks.weight": "self_attn.sinks"},
    "glm4moe": {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias"},
    "deepseek2": {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias"},
    "minimax-m2": {"exp_probs_b.bias": "mlp.e_score_correction_bias"},
    gemma4.ARCH: gemma4.PARAMS,
}
# Model-level tensors beyond token_embd/output_norm/output: GGUF name -> Ember name
FAMILY_GLOBALS: dict[str, dict[str, str]] = {gemma4.ARCH: gemma4.GLOBALS}
# Families whose stacked experts fill one Linear per expert (mlp.experts.<e>.<kind>_proj.weight);
# gpt-oss's fill its fused expert tensors instead (ember.loading.gguf.family_weights).
PER_EXPERT_LINEARS = ("glm4moe", "deepseek2", "minimax-m2")
NORM_PLUS_ONE = ("gemma3",)  # the converter stored 1 + w for every *norm.weight
# DeepSeek's split kv_b halves, recombined into kv_b_proj
KV_B_PARTS = ("attn_k_b", "attn_v_b")


def is_family(arch: str) -> bool:
    return arch in FAMILY_TENSORS


def layer_count(gf: GGUFFile, arch: str) -> int:
    """Layers Ember runs: ``block_count`` less GLM's multi-token-prediction layers."""
    n = gf.get_int(f"{arch}.block_count", required=True)
    return n - gf.get_int(f"{arch}.nextn_predict_layers", 0)


def _swa_layers(gf: GGUFFile, arch: str, n: int, period: int) -> list[bool]:
    """llama.cpp's sliding layers: ``attention.sliding_window_pattern`` (bools, or a period), else ``period``;
    with a period p, layer i slides unless i % p == p - 1."""
    pattern = gf.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) < n:
            raise GGUFError(f"{gf.path}: attention.sliding_window_pattern has {len(pattern)} entries for {n} layers")
        return [bool(x) for x in pattern[:n]]
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    return [period == 0 or i % period < period - 1 for i in range(n)]


def _gating_is_sigmoid(gf: GGUFFile, arch: str, default: int) -> None:
    func = gf.get_int(f"{arch}.expert_gating_func", default)
    if func != _SIGMOID:
        what = "DeepSeek-V2 style softmax" if func == _SOFTMAX else f"expert_gating_func {func}"
        raise UnsupportedModelError(f"{gf.path}: {arch!r} with a {what} router is not supported; Ember runs "
                                    "the sigmoid router with correction bias (DeepSeek-V3, GLM-4.5, MiniMax-M2)")


def _rope(gf: GGUFFile, arch: str, theta: float, **extra: Any) -> dict[str, Any]:
    """HF ``rope_parameters`` from ``rope.*``: default, linear or YaRN."""
    kind = gf.get(f"{arch}.rope.scaling.type")
    factor = gf.get_float(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return {"rope_type": "default", "rope_theta": theta, **extra}
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta, **extra}
    if kind == "yarn":
        p = {"rope_type": "yarn", "factor": factor, "rope_theta": theta,
             "original_max_position_embeddings": gf.get_int(f"{arch}.rope.scaling.original_context_length",
                                                            required=True),
             "beta_fast": gf.get_float(f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
             "beta_slow": gf.get_float(f"{arch}.rope.scaling.yarn_beta_slow", 1.0), **extra}
        return p
    raise UnsupportedModelError(f"{gf.path}: rope scaling {kind!r} for {arch!r} is not supported; supported: "
                                "none, linear, yarn")


def family_config(gf: GGUFFile, arch: str, hidden: int) -> dict[str, Any]:
    """The HF ``config.json`` fields (model_type and hyper-parameters) of a file of architecture ``arch``."""
    if arch == gemma4.ARCH:
        return gemma4.gemma4_config(gf, hidden)
    g = lambda key, default=None, required=False: gf.get_int(f"{arch}.{key}", default, required)  # noqa: E731
    n = layer_count(gf, arch)
    heads = g("attention.head_count", required=True)
    head_dim = g("attention.key_length") or hidden // max(heads, 1)
    theta = gf.get_float(f"{arch}.rope.freq_base", 10000.0)
    raw: dict[str, Any] = {
        "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": head_dim, "max_position_embeddings": g("context_length", 4096),
        "rms_norm_eps": gf.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "intermediate_size": g("feed_forward_length", g("expert_feed_forward_length"), required=True),
    }
    rope_dim = g("rope.dimension_count", head_dim)
    if arch in ("glm4moe", "deepseek2", "minimax-m2"):
        _gating_is_sigmoid(gf, arch, _SOFTMAX if arch == "deepseek2" else _SIGMOID)
        raw.update(num_experts_per_tok=g("expert_used_count", required=True),
                   moe_intermediate_size=g("expert_feed_forward_length", raw["intermediate_size"]))
    if arch == "gpt-oss":
        window = g("attention.sliding_window", required=True)
        swa = _swa_layers(gf, arch, n, 2)
        rope = _rope(gf, arch, theta)
        if rope["rope_type"] == "yarn":
            rope["truncate"] = False
        raw.update(model_type="gpt_oss", intermediate_size=g("expert_feed_forward_length", raw["intermediate_size"]),
                   num_local_experts=g("expert_count", required=True),
                   num_experts_per_tok=g("expert_used_count", required=True), sliding_window=window,
                   layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                   rope_parameters=rope, swiglu_limit=7.0, attention_bias=True)
    elif arch == "gemma3":
        window = g("attention.sliding_window", 0)
        swa = _swa_layers(gf, arch, n, 6) if window else [False] * n
        local_theta = gf.get_float(f"{arch}.rope.freq_base_swa", 10000.0)
        raw.update(model_type="gemma3_text", sliding_window=window or None,
                   query_pre_attn_scalar=hidden // heads if n == 62 else head_dim,
                   layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                                    "full_attention": _rope(gf, arch, theta)},
                   final_logit_softcapping=gf.get_float(f"{arch}.final_logit_softcapping"),
                   attn_logit_softcapping=None)
    elif arch == "glm4moe":
        raw.update(model_type="glm4_moe", n_routed_experts=g("expert_count", required=True),
                   n_shared_experts=g("expert_shared_count", 0), n_group=g("expert_group_count", 1),
                   topk_group=g("expert_group_used_count", 1), first_k_dense_replace=g("leading_dense_block_count", 0),
                   routed_scaling_factor=gf.get_float(f"{arch}.expert_weights_scale", 1.0),
                   norm_topk_prob=bool(gf.get(f"{arch}.expert_weights_norm", False)),
                   use_qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
                   attention_bias="blk.0.attn_q.bias" in gf.tensors, partial_rotary_factor=rope_dim / head_dim,
                   rope_parameters=_rope(gf, arch, theta, partial_rotary_factor=rope_dim / head_dim))
    elif arch == "deepseek2":
        kv_lora = g("attention.kv_lora_rank", required=True)
        k_mla, v_mla = g("attention.key_length_mla"), g("attention.value_length_mla")
        qk_head = k_mla if k_mla is not None else head_dim  # older files: key_length is the per-head size
        rope = _rope(gf, arch, theta)
        log_mul = gf.get_float(f"{arch}.rope.scaling.yarn_log_multiplier")
        if rope["rope_type"] == "yarn" and log_mul is not None:  # the converter wrote 0.1 * mscale_all_dim
            rope.update(mscale=log_mul / 0.1, mscale_all_dim=log_mul / 0.1)
        raw.update(model_type="deepseek_v3", num_key_value_heads=heads, head_dim=rope_dim,
                   q_lora_rank=g("attention.q_lora_rank"), kv_lora_rank=kv_lora, qk_rope_head_dim=rope_dim,
                   qk_nope_head_dim=qk_head - rope_dim,
                   v_head_dim=v_mla if v_mla is not None else g("attention.value_length", required=True),
                   n_routed_experts=g("expert_count", required=True), n_shared_experts=g("expert_shared_count", 0),
                   n_group=g("expert_group_count", 1), topk_group=g("expert_group_used_count", 1),
                   first_k_dense_replace=g("leading_dense_block_count", 0),
                   routed_scaling_factor=gf.get_float(f"{arch}.expert_weights_scale", 1.0),
                   norm_topk_prob=bool(gf.get(f"{arch}.expert_weights_norm", False)), rope_interleave=True,
                   rope_parameters=rope)
    elif arch == "minimax-m2":
        raw.update(model_type="minimax_m2", intermediate_size=raw["moe_intermediate_size"],
                   num_local_experts=g("expert_count", required=True), rotary_dim=rope_dim, scoring_func="sigmoid",
                   use_qk_norm=True, rope_parameters=_rope(gf, arch, theta, partial_rotary_factor=rope_dim / head_dim))
    return raw


def family_targets(arch: str, name: str, layer: int, key: str, suffix: str, n_experts: int) -> list[str] | None:
    """Ember parameter name(s) of ``blk.<layer>.<key>.<suffix>`` (None: not a tensor of this family)."""
    prefix = f"model.layers.{layer}."
    whole = PARAMS.get(arch, {}).get(f"{key}.{suffix}")
    if whole:
        return [prefix + whole]
    if key in FAMILY_TENSORS[arch]:
        return [f"{prefix}{FAMILY_TENSORS[arch][key]}.{suffix}"]
    if arch == gemma4.ARCH and suffix == "weight":
        return gemma4.expert_targets(layer, key, n_experts)
    kinds = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
    if key in kinds and arch in PER_EXPERT_LINEARS and suffix == "weight":
        return [f"{prefix}mlp.experts.{e}.{kinds[key]}.weight" for e in range(n_experts)]
    return None
