"""Config facts of the hybrid families beyond :class:`ember.config.ModelConfig`'s own fields.

* Nemotron-H (``model_type`` "nemotron_h"): config.json names each layer's single block in
  ``layers_block_type`` (transformers 5) or the older ``hybrid_override_pattern`` string (``M`` Mamba-2 mixer,
  ``*`` attention, ``-`` MLP, ``E`` MoE). :func:`nemotron_h_raw` rewrites such a file into ModelConfig's terms
  (``layer_types``, ``num_hidden_layers``, ``rms_norm_eps``, the MoE fields) and fills HF's defaults for the
  Mamba fields, which stay in ``cfg.extra`` under HF's names; :func:`mamba_dims` reads them.
* Parameter counts of the hybrid layers (:func:`deltanet_params`, :func:`nemotron_h_params`) for
  ``ModelConfig.num_parameters`` and the planner.

This module imports nothing of Ember's but the errors, so :mod:`ember.config` can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ember.errors import ConfigError, UnsupportedModelError

# hybrid_override_pattern letters -> layers_block_type entries (HF's NemotronHConfig._pattern_to_list)
NEMOTRON_BLOCKS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
# Nemotron-H layer types with no token mixer (one MLP or MoE block, nothing kept between tokens)
BLOCK_TYPES = ("mlp", "moe")
# HF NemotronHConfig's defaults for the fields Ember reads from cfg.extra
MAMBA_DEFAULTS: dict[str, Any] = {
    "ssm_state_size": 128, "mamba_num_heads": 128, "mamba_head_dim": 64, "n_groups": 8, "conv_kernel": 4,
    "use_conv_bias": True, "chunk_size": 128, "time_step_limit": [0.0, math.inf], "use_bias": False,
    "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "moe_shared_expert_intermediate_size": 7688,
    "moe_latent_size": None,
}
# older config.json spellings (HF's NemotronHConfig.__post_init__ reads them too)
_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_conv_bias": "use_conv_bias",
           "mamba_chunk_size": "chunk_size", "mamba_dt_limit": "time_step_limit"}


def _float(v: Any) -> float:
    """A JSON number, or transformers 5's ``{"__float__": "Infinity"}`` for a non-finite one."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(v)
    return float(v)


def nemotron_h_raw(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A Nemotron-H config.json in ModelConfig's terms (a new dict; the Mamba fields keep HF's names).

    Raises:
        ConfigError: a missing or malformed layer list, or a Mamba size that cannot describe a model.
        UnsupportedModelError: an activation other than Nemotron-H's (relu2 MLPs, silu Mamba).
    """
    raw = dict(raw)
    for old, new in _LEGACY.items():
        if old in raw and new not in raw:
            raw[new] = raw.pop(old)
    types = raw.get("layers_block_type") or raw.get("layer_types")
    if types is None:
        pattern = raw.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(NEMOTRON_BLOCKS):
            raise ConfigError(f"{source}: a nemotron_h config needs 'layers_block_type' (a list) or "
                              f"'hybrid_override_pattern' (a string of M, *, -, E), got {pattern!r}")
        types = [NEMOTRON_BLOCKS[c] for c in pattern]
    allowed = set(NEMOTRON_BLOCKS.values())
    if not isinstance(types, list) or not types or any(t not in allowed for t in types):
        raise ConfigError(f"{source}: field 'layers_block_type' must list each layer's block, one of "
                          f"{', '.join(sorted(allowed))}, got {types!r}")
    raw["layer_types"], raw["num_hidden_layers"] = list(types), len(types)
    raw.setdefault("rms_norm_eps", raw.get("layer_norm_epsilon", 1e-5))
    for key, value in MAMBA_DEFAULTS.items():
        if raw.get(key) is None:
            raw[key] = value
    try:
        lo, hi = (_float(v) for v in raw["time_step_limit"])
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: field 'time_step_limit' must be [min, max], got {raw['time_step_limit']!r}") \
            from None
    raw["time_step_limit"] = [lo, hi]
    if raw["mlp_hidden_act"] != "relu2" or raw["mamba_hidden_act"] != "silu":
        raise UnsupportedModelError(f"{source}: nemotron_h with mlp_hidden_act {raw['mlp_hidden_act']!r} / "
                                    f"mamba_hidden_act {raw['mamba_hidden_act']!r} is not supported (relu2 / silu)")
    for key in ("ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel", "chunk_size"):
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
            raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {v!r}")
    if raw["mamba_num_heads"] % raw["n_groups"]:
        raise ConfigError(f"{source}: field 'mamba_num_heads' ({raw['mamba_num_heads']}) must be a multiple of "
                          f"'n_groups' ({raw['n_groups']})")
    moe = [i for i, t in enumerate(types) if t == "moe"]
    if moe:  # HF's defaults; the dense layers are listed as mlp_only_layers so is_moe_layer() names the MoE ones
        raw["num_local_experts"] = raw.get("n_routed_experts", raw.get("num_local_experts", 8))
        raw.setdefault("num_experts_per_tok", 2)
        raw.setdefault("moe_intermediate_size", 7688)
        raw.setdefault("norm_topk_prob", True)
        raw["mlp_only_layers"] = [i for i in range(len(types)) if i not in set(moe)]
    else:
        raw["num_local_experts"] = 0
    raw["n_shared_experts"] = 0  # the shared expert's width is moe_shared_expert_intermediate_size
    raw.setdefault("head_dim", 128)
    raw.setdefault("num_key_value_heads", 8)
    return raw


@dataclass(frozen=True)
class MambaDims:
    """One Mamba-2 mixer's sizes (HF names in the comments): H heads of P channels, G groups of B/C of size N."""

    heads: int        # mamba_num_heads
    head_dim: int     # mamba_head_dim
    groups: int       # n_groups
    state: int        # ssm_state_size
    kernel: int       # conv_kernel
    conv_bias: bool   # use_conv_bias
    proj_bias: bool   # use_bias (in_proj and out_proj)
    chunk: int        # chunk_size
    dt_limit: tuple[float, float]  # time_step_limit

    @property
    def inner(self) -> int:
        """H * P: the x and gate widths."""
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the convolution: x, B and C."""
        return self.inner + 2 * self.groups * self.state


def mamba_dims(cfg) -> MambaDims:
    """The Mamba-2 sizes of a nemotron_h ``ModelConfig`` (read from ``cfg.extra``, HF's defaults filled in)."""
    e = {**MAMBA_DEFAULTS, **{k: v for k, v in cfg.extra.items() if v is not None}}
    return MambaDims(e["mamba_num_heads"], e["mamba_head_dim"], e["n_groups"], e["ssm_state_size"], e["conv_kernel"],
                     bool(e["use_conv_bias"]), bool(e["use_bias"]), e["chunk_size"],
                     tuple(_float(v) for v in e["time_step_limit"]))


def deltanet_params(cfg) -> int:
    """Parameters of one Gated DeltaNet mixer: q/k/v/z and b/a projections, depthwise conv, dt_bias + A_log,
    gated norm, out_proj."""
    h = cfg.hidden_size
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    nv = cfg.linear_num_value_heads
    return (h * (2 * kd + 2 * vd + 2 * nv) + (2 * kd + vd) * cfg.linear_conv_kernel_dim + 2 * nv
            + cfg.linear_value_head_dim + vd * h)


def mamba_params(cfg) -> int:
    """Parameters of one Mamba-2 mixer: in_proj (gate, x|B|C, dt), conv (+ bias), dt_bias, A_log, D, the grouped
    gated norm, out_proj (+ biases with use_bias)."""
    m, h = mamba_dims(cfg), cfg.hidden_size
    proj = h * (m.inner + m.conv_dim + m.heads) + (m.inner + m.conv_dim + m.heads + h if m.proj_bias else 0)
    return proj + m.conv_dim * (m.kernel + m.conv_bias) + 3 * m.heads + m.inner + m.inner * h


def nemotron_h_params(cfg, experts: int) -> int:
    """Parameters of a Nemotron-H model with ``experts`` experts per MoE layer (all of them for the size, top-k
    for the active count): embeddings, LM head, final norm, and per layer its norm and block."""
    h, v = cfg.hidden_size, cfg.vocab_size
    e = {**MAMBA_DEFAULTS, **cfg.extra}
    latent = e["moe_latent_size"]
    blocks = {
        "linear_attention": mamba_params(cfg),
        "full_attention": h * cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        + cfg.num_attention_heads * cfg.head_dim * h,
        "mlp": 2 * h * cfg.intermediate_size + (cfg.intermediate_size + h if cfg.mlp_bias else 0),
        "moe": cfg.num_local_experts * h + experts * 2 * (latent or h) * (cfg.moe_intermediate_size or 0)
        + 2 * h * e["moe_shared_expert_intermediate_size"] + (2 * h * latent if latent else 0),
    }
    return v * h * (1 if cfg.tie_word_embeddings else 2) + h + sum(blocks[t] + h for t in cfg.layer_types)
