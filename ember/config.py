"""ModelConfig: the one description of a decoder-only transformer, read from an HF config.json.

Field names are exactly those of HF ``config.json`` so a reader can check them against the
checkpoint by eye; unknown keys are dropped. Families differ only by fields (qkv bias, q/k norm,
rope scaling, sliding window, MoE), never by subclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.config_gemma4 import DEFAULTS as GEMMA4_DEFAULTS, gemma4_count, kv_source, read_gemma4_fields
from ember.errors import ConfigError, UnsupportedModelError
from ember.hybrid_config import BLOCK_TYPES, deltanet_params, nemotron_h_params, nemotron_h_raw

# model_type -> per-family defaults that differ from the Llama baseline. A family is a row here.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True, "qkv_bias_only": True},
    "qwen3": {"qk_norm": True},
    # Mixture of experts. Mixtral always renormalises its top-k router weights; Qwen3-MoE only
    # when config.json says norm_topk_prob (HF default False), so that row leaves it to the file.
    "mixtral": {"norm_topk_prob": True},
    "qwen3_moe": {"qk_norm": True},
    # Hybrids with recurrent layers (docs/hybrid.md): Gated DeltaNet linear attention between gated full-attention
    # layers (``layer_types``), (1 + w) RMSNorms, partial RoPE; the MoE variants add a gated shared expert.
    "qwen3_next": {"qk_norm": True},
    "qwen3_5_text": {"qk_norm": True},
    "qwen3_5_moe_text": {"qk_norm": True, "norm_topk_prob": True},  # its router always renormalises
    # Nemotron-H / Nemotron 3: one block per layer (Mamba-2, attention without RoPE, relu2 MLP or MoE; hybrid_config.py)
    "nemotron_h": {"qk_norm": False},
    # gpt-oss: learned per-head attention sinks, biases on q/k/v/o, alternating sliding/full layers
    # (layer_types), YaRN RoPE, a biased top-k router and clamped-SwiGLU experts with biases.
    "gpt_oss": {"attention_bias": True, "attention_sinks": True},
    # Gemma 3: (1 + w) RMSNorms, sandwich norms, scaled embeddings, GeGLU, q/k norms, local/global RoPE
    # (ember/models/gemma.py). "gemma3" is the multimodal checkpoint: its text_config, weights under
    # model.language_model.* (the vision tower is skipped).
    # (HF's Gemma 3 attention never applies attn_logit_softcapping, so neither does Ember's.) Gemma 2: the same
    # pieces without q/k norms and one RoPE base, with attention logit soft-capping.
    "gemma3_text": {"qk_norm": True, "attn_logit_softcapping": None},
    "gemma3": {"qk_norm": True, "attn_logit_softcapping": None},
    "gemma2": {"qk_norm": False, "rope_local_base_freq": None},
    # GLM-4.5/4.6 MoE: partial RoPE, sigmoid router with correction bias and group-limited top-k, shared
    # experts, first_k_dense_replace dense layers (ember/models/routed_moe.py); q/k norm when use_qk_norm.
    "glm4_moe": {"qkv_bias_only": True},
    # DeepSeek-V3 (and R1, Kimi K2): multi-head latent attention (ember/models/mla.py) and GLM's router.
    "deepseek_v3": {},
    # MiniMax-M2: sigmoid router with correction bias (plain top-k), q/k RMSNorms over all heads at once, partial
    # RoPE (ember/models/minimax.py); its released config.json gives rotary_dim rather than partial_rotary_factor.
    "minimax_m2": {"qk_norm": False, "norm_topk_prob": True},
    # Gemma 4 (ember/models/gemma4.py, fields read by ember/config_gemma4.py): Gemma 3's pieces with plain-weight
    # norms, q/k/v norms and scale 1, per-layer-type head shapes and RoPE, per-layer input embeddings, keys/values
    # shared by the last layers, and a MoE block beside the dense MLP. "gemma4" is the multimodal checkpoint.
    "gemma4_text": {"qk_norm": True, "attn_logit_softcapping": None, "partial_rotary_factor": 1.0},
}

# Checkpoints whose config.json nests the language model's fields under text_config (multimodal ones).
_NESTED_TEXT_CONFIG = ("gemma3",)

# Multimodal wrappers (``...ForConditionalGeneration``): config.json nests the language model in ``text_config``
# and its weights live under ``model.language_model.``; Ember runs the text model (the vision tower is skipped).
MULTIMODAL_WRAPPERS: dict[str, str] = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text",
                                       "gemma4": "gemma4_text"}

# HF spells the expert count two ways; transformers 5 maps num_experts -> num_local_experts.
_ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts",
            "use_qk_norm": "qk_norm", "top_k_experts": "num_experts_per_tok"}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")

# Plain sanity bounds, well above every released model (the largest have ~262k vocabularies, 16k
# hidden sizes, ~130 layers, 10M-token contexts). A value past one is a corrupt or hostile file: it is
# refused here, before anything walks the layers or allocates, instead of running for hours.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "max_position_embeddings": 1 << 27, "num_local_experts": 4096, "moe_intermediate_size": 1 << 20,
    "sliding_window": 1 << 27,
}
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
# HF's defaults for fields a family's config.json may leave out (FAMILIES rows are fixed facts; these yield
# to the file).
_GEMMA3_DEFAULTS = {"tie_word_embeddings": True, "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {"tie_word_embeddings": True, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
               "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": _GEMMA3_DEFAULTS,
    "gemma3": _GEMMA3_DEFAULTS,
    "gemma4_text": GEMMA4_DEFAULTS,
    "glm4_moe": {"partial_rotary_factor": 0.5, "norm_topk_prob": True, "n_shared_experts": 1,
                 "first_k_dense_replace": 1},
    "deepseek_v3": {"norm_topk_prob": True, "n_shared_experts": 1, "first_k_dense_replace": 3,
                    "rope_interleave": True},
}


@dataclass
class ModelConfig:
    """Architecture facts needed to build :class:`ember.models.Transformer`.

    Attributes follow HF names; the derived ones (``head_dim``, ``qk_norm``, ``qkv_bias_only``)
    are filled by :meth:`from_dict`.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE); num_local_experts == 0 means a dense model.
    num_local_experts: int = 0       # experts per MoE layer (Qwen3-MoE's config.json calls it num_experts)
    num_experts_per_tok: int = 0     # top-k experts each token is routed to
    moe_intermediate_size: int | None = None  # expert FFN width; Mixtral: intermediate_size
    norm_topk_prob: bool = False     # renormalise the k selected router probabilities to sum to 1
    decoder_sparse_step: int = 1     # Qwen3-MoE: layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight (training only)
    shared_expert_intermediate_size: int = 0  # Qwen3-Next/3.5-MoE: width of the gated shared expert (0: none)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * factor dims of each head
    # Gated DeltaNet linear attention (layer_types "linear_attention"): heads, head dims, conv kernel
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    multimodal: bool = False         # read from a multimodal wrapper's text_config (vision tower skipped)
    swiglu_alpha: float = 1.702      # gpt-oss experts: sigmoid gain of the clamped SwiGLU ...
    swiglu_limit: float = 7.0        # ... and the clamp on its gate (above) and up (both sides) inputs
    # Derived / family fields (not HF keys, or HF keys with family-specific meaning).
    qk_norm: bool = False            # Qwen3: RMSNorm on each head of q and k before RoPE
    qkv_bias_only: bool = False      # Qwen2: bias on q/k/v but not o
    attention_sinks: bool = False    # gpt-oss: a learned logit per head joins each softmax (self_attn.sinks)
    # Gemma 3 (HF names): attention scale query_pre_attn_scalar**-0.5, tanh soft-capping of attention and
    # final logits (None: off), the sliding layers' RoPE base, the MLP activation.
    hidden_activation: str | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    # GLM-4.5 / DeepSeek-V3 (HF names): RoPE on the first partial_rotary_factor of each head; the
    # sigmoid router's group-limited top-k, shared experts, routed scaling; leading dense layers.
    n_group: int = 1
    topk_group: int = 1
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    # DeepSeek-V3 multi-head latent attention (HF names); kv_lora_rank None means ordinary attention.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # Gemma 4 (HF names; see ember/config_gemma4.py): per-layer input embeddings (0: none), value = key projection
    # on full layers, the last layers reusing earlier keys/values, double-width MLPs there, full layers' head shape.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Where the values came from, for error messages (not a field: not compared, copied or saved).
    source: dataclasses.InitVar[str] = "ModelConfig"

    def __post_init__(self, source: str = "ModelConfig") -> None:
        _check_int(self.num_attention_heads, "num_attention_heads", source)
        _check_int(self.hidden_size, "hidden_size", source)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.num_local_experts and self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if isinstance(self.pad_token_id, int) and not isinstance(self.pad_token_id, bool) and self.pad_token_id < 0:
            self.pad_token_id = None  # old Llama configs write -1 for "no padding token"
        if self.model_type in ("gemma3_text", "gemma3", "gemma2") and self.layer_types is None:
            # Gemma configs written before layer_types: every sliding_window_pattern-th layer is global (Gemma 2:
            # every other one)
            default = 2 if self.model_type == "gemma2" else 6
            pattern = int(self.extra.get("sliding_window_pattern", self.extra.get("_sliding_window_pattern", default)))
            self.layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]

        self.validate(source)

    def validate(self, source: str = "ModelConfig") -> None:
        """Check every field Ember reads, type and range, naming the field and ``source``.

        Raises:
            ConfigError: the first field that cannot describe a model Ember builds.
        """
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check_int(getattr(self, name), name, source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple "
                              f"of 'num_key_value_heads' ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' must be even (rotary embeddings rotate pairs), "
                              f"got {self.head_dim}")
        _check_float(self.rms_norm_eps, "rms_norm_eps", source, below=1.0)
        _check_float(self.rope_theta, "rope_theta", source)
        _check_float(self.partial_rotary_factor, "partial_rotary_factor", source, below=1.0 + 1e-9)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "norm_topk_prob",
                     "qk_norm", "qkv_bias_only"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: field {name!r} must be true or false, got {getattr(self, name)!r} "
                                  f"({_json_type(getattr(self, name))})")
        if not isinstance(self.hidden_act, str):
            raise ConfigError(f"{source}: field 'hidden_act' must be a string, got {self.hidden_act!r}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"{source}: field 'torch_dtype' must be a string such as \"bfloat16\", "
                              f"got {self.torch_dtype!r}")
        if self.sliding_window is not None:
            _check_int(self.sliding_window, "sliding_window", source)
        if self.max_window_layers is not None:
            _check_int(self.max_window_layers, "max_window_layers", source, minimum=0)
        if self.layer_types is not None:
            allowed = LAYER_TYPES + (BLOCK_TYPES if self.model_type == "nemotron_h" else ())
            if (not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers
                    or any(t not in allowed for t in self.layer_types)):
                raise ConfigError(f"{source}: field 'layer_types' must list {self.num_hidden_layers} entries "
                                  f"(num_hidden_layers), each one of {', '.join(allowed)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError(f"{source}: 'layer_types' has sliding_attention layers but 'sliding_window' is null")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name != "pad_token_id" else [value]
            for i in ids:
                if i is None and not isinstance(value, list):
                    continue
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    raise ConfigError(f"{source}: field {name!r} must be a token id in 0..{self.vocab_size - 1} "
                                      f"(vocab_size) or null, got {value!r}")
        self._validate_rope(source)
        self._validate_moe(source)

    def _validate_rope(self, source: str) -> None:
        s = self.rope_scaling
        if s is None:
            return
        if not isinstance(s, dict) or s.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: field 'rope_scaling' must be an object with a rope_type among "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}, got {s!r}")
        if s["rope_type"] == "default":
            return
        _check_float(s.get("factor"), "rope_scaling.factor", source)
        if s["rope_type"] == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _check_float(s.get(key), f"rope_scaling.{key}", source)
            if not s["high_freq_factor"] > s["low_freq_factor"]:
                raise ConfigError(f"{source}: field 'rope_scaling.high_freq_factor' ({s['high_freq_factor']}) must "
                                  f"exceed 'rope_scaling.low_freq_factor' ({s['low_freq_factor']})")

    def _validate_moe(self, source: str) -> None:
        n = self.num_local_experts
        _check_int(n, "num_local_experts", source, minimum=0)
        if not n:
            return
        k = self.num_experts_per_tok
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' must be an integer in 1..{n} "
                              f"(num_local_experts), got {k!r}")
        _check_int(self.decoder_sparse_step, "decoder_sparse_step", source)
        _check_int(self.moe_intermediate_size, "moe_intermediate_size", source)
        layers = self.mlp_only_layers
        if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ConfigError(f"{source}: field 'mlp_only_layers' must be a list of layer indices, got {layers!r}")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or isinstance(self.router_aux_loss_coef, bool) \
                or not math.isfinite(self.router_aux_loss_coef) or self.router_aux_loss_coef < 0:
            raise ConfigError(f"{source}: field 'router_aux_loss_coef' must be a finite number >= 0, "
                              f"got {self.router_aux_loss_coef!r}")

    @property
    def rotary_dim(self) -> int:
        """Channels of each query/key head that RoPE rotates: DeepSeek's qk_rope_head_dim, else the first
        ``partial_rotary_factor`` of ``head_dim`` (GLM-4.5: half)."""
        if self.kv_lora_rank:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build a config from a parsed HF config.json.

        Args:
            raw: the JSON object.
            source: where it came from, for error messages.
        Raises:
            UnsupportedModelError: unknown ``model_type`` or rope type.
            ConfigError: a required field is missing or has the wrong type.
        """
        model_type = raw.get("model_type")
        if isinstance(model_type, str) and model_type in MULTIMODAL_WRAPPERS and isinstance(raw.get("text_config"), dict):
            text = raw["text_config"]
            raw = {**text, "model_type": text.get("model_type", MULTIMODAL_WRAPPERS[model_type]), "multimodal": True,
                   **{k: raw[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype", "quantization")
                      if k in raw and k not in text}}
            model_type = raw["model_type"]
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(FAMILIES)}"
            )
        raw = nemotron_h_raw(raw, source) if model_type == "nemotron_h" else raw
        if model_type in _NESTED_TEXT_CONFIG and isinstance(raw.get("text_config"), dict):
            # the language model's fields; the vision tower's are not read (its weights are skipped)
            top = {k: raw[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype") if k in raw}
            raw = {**raw["text_config"], **top, "model_type": model_type}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in raw:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            _check_int(raw[key], key, source)

        names = {f.name for f in dataclasses.fields(cls)}
        for alias, name in _ALIASES.items():
            if alias in raw and name not in raw:
                raw = {**raw, name: raw[alias]}
        kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in names and k != "extra"}
        kwargs = {**_FAMILY_DEFAULTS.get(model_type, {}), **kwargs, **FAMILIES[model_type]}
        raw = read_gemma4_fields(raw, kwargs, source) if model_type == "gemma4_text" else raw
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers 5 writes "dtype"
            kwargs["torch_dtype"] = raw["dtype"]
        if kwargs.get("head_dim") is None and "head_dim" in kwargs:
            kwargs.pop("head_dim")  # null: derived from hidden_size / num_attention_heads, as HF does
        for name in _NOT_NULL:  # an explicit null for a field with a default is a broken file, not "default"
            if name in kwargs and kwargs[name] is None:
                raise ConfigError(f"{source}: field {name!r} is null; give a value or leave the field out")

        # RoPE: transformers 4 writes rope_theta + rope_scaling; 5 writes rope_parameters.
        rope = raw.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        if isinstance(rope, dict) and "rope_type" not in rope and rope and all(isinstance(v, dict) for v in rope.values()):
            rope = _split_layer_rope(rope, kwargs, source)  # per layer type (Gemma 3 in transformers 5)
        if isinstance(raw.get("rotary_dim"), int) and kwargs.get("head_dim"):  # MiniMax-M2's released files
            kwargs["partial_rotary_factor"] = raw["rotary_dim"] / kwargs["head_dim"]
        scaling = raw.get("rope_scaling") or rope
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {scaling!r}")
        if isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and "partial_rotary_factor" in rope and rope.get("rope_type") != "proportional":
            kwargs["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            kwargs["rope_scaling"] = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
        else:
            kwargs["rope_scaling"] = None

        act = kwargs.get("hidden_activation") or raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        kwargs["hidden_act"] = act
        if kwargs.get("num_local_experts"):
            _check_moe(kwargs, source)
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in names and k not in _ALIASES}
        if isinstance(kwargs.get("rope_theta"), int) and not isinstance(kwargs["rope_theta"], bool):
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        if isinstance(kwargs.get("rms_norm_eps"), int) and not isinstance(kwargs["rms_norm_eps"], bool):
            kwargs["rms_norm_eps"] = float(kwargs["rms_norm_eps"])
        return cls(**kwargs, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` (or a directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: not found; a model folder needs a config.json from Hugging Face")
        try:
            size = p.stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{p}: {size} bytes is not a config.json (the limit is {MAX_CONFIG_BYTES})")
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise ConfigError(f"{p}: invalid JSON (nested too deeply)") from None
        except ValueError as e:  # e.g. an integer literal past Python's digit limit
            raise ConfigError(f"{p}: invalid JSON ({str(e).splitlines()[0]})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls.from_dict(raw, source=str(p))

    # ------------------------------------------------------------------ derived facts
    def layer_window(self, layer: int) -> int | None:
        """Sliding-window size for layer ``layer`` or None for full attention."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        if self.model_type in ("mistral", "mixtral"):
            return self.sliding_window
        if self.use_sliding_window and self.sliding_window:
            start = self.max_window_layers if self.max_window_layers is not None else 0
            return self.sliding_window if layer >= start else None
        return None

    def layer_head_dim(self, layer: int) -> int:
        """Head dim of ``layer``'s attention: ``head_dim``, or Gemma 4's ``global_head_dim`` on its full layers."""
        return self.global_head_dim if self.global_head_dim and self.layer_window(layer) is None else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        """Key/value heads of ``layer``: ``num_key_value_heads``, or Gemma 4's global count on its full layers."""
        full = self.num_global_key_value_heads and self.layer_window(layer) is None
        return self.num_global_key_value_heads if full else self.num_key_value_heads

    def kv_source(self, layer: int) -> int | None:
        """The earlier layer whose keys/values ``layer`` reuses (Gemma 4's ``num_kv_shared_layers``), else None."""
        return kv_source(self, layer)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a sparse expert block (else a dense SwiGLU MLP)."""
        return (self.num_local_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0 and layer >= self.first_k_dense_replace)

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied), every expert included."""
        return self._count(self.num_local_experts)

    def active_parameters(self) -> int:
        """Parameters that take part in one token's forward pass: only ``num_experts_per_tok`` experts
        per MoE layer, everything else in full (embeddings too, as model cards count "A3B", "12.9B").

        Equals :meth:`num_parameters` for dense models.
        """
        return self._count(self.num_experts_per_tok)

    def decode_bytes_per_token(self, bytes_per_param: float = 2.0) -> int:
        """Weight bytes one decode step reads for one token: :meth:`active_parameters` less the
        embedding table, of which a lookup reads one row (unless it is tied to the LM head, which
        reads it all). KV-cache reads are not included.

        Args:
            bytes_per_param: storage per weight (2 for bf16/fp16, 4 for fp32, ~0.56 for int4 g32).
        Returns:
            bytes per token per sequence.
        """
        unread = 0 if self.tie_word_embeddings else (self.vocab_size - 1) * self.hidden_size
        return int((self.active_parameters() - unread) * bytes_per_param)

    def _count(self, experts: int) -> int:
        if self.model_type in ("gemma4_text", "nemotron_h"):
            return (gemma4_count if self.model_type == "gemma4_text" else nemotron_h_params)(self, experts)
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hd, nh, nkv = self.head_dim, self.num_attention_heads, self.num_key_value_heads
        if self.kv_lora_rank:
            attn = self._mla_count()
        else:
            attn = h * hd * (nh + 2 * nkv) + nh * hd * h
            if self.attention_bias:
                attn += hd * (nh + 2 * nkv) + (0 if self.qkv_bias_only else h)
            if self.qk_norm:
                attn += 2 * hd
            if self.model_type == "minimax_m2":  # q/k norms over all heads' channels
                attn += (nh + nkv) * hd
        if self.attention_sinks:
            attn += nh
        expert_bias = self.mlp_bias or self.model_type == "gpt_oss"  # gpt-oss experts and router carry biases
        bias = (lambda width: (2 * width + h) if expert_bias else 0)
        layer_norms = (4 if self.sandwich_norms else 2) * h
        dense = 3 * h * i + bias(i)
        total = v * h * (1 if self.tie_word_embeddings else 2) + h
        hybrid = self.model_type in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
        if hybrid:
            attn += h * hd * nh  # gated attention: q_proj also yields the output gate
        linear = deltanet_params(self) if hybrid else 0
        types = self.layer_types or []
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                im = self.moe_intermediate_size
                router = self.num_local_experts * (h + (1 if self.model_type == "gpt_oss" else 0))
                mlp = router + experts * (3 * h * im + bias(im))  # router + experts
                mlp += 3 * h * im * self.n_shared_experts  # shared experts (GLM-4.5, DeepSeek-V3)
                if self.shared_expert_intermediate_size:  # Qwen3-Next's gated shared expert and its gate
                    mlp += 3 * h * self.shared_expert_intermediate_size + h
            else:
                mlp = dense
            mixer = linear if layer < len(types) and types[layer] == "linear_attention" else attn
            total += mixer + mlp + layer_norms
        return total

    @property
    def sandwich_norms(self) -> bool:
        """Gemma: four norms per layer (before and after attention and the MLP), not two."""
        return self.model_type in ("gemma2", "gemma3_text", "gemma3")

    def _mla_count(self) -> int:
        """Parameters of one multi-head latent attention layer (DeepSeek-V3), its two latent norms included."""
        h, nh, b = self.hidden_size, self.num_attention_heads, self.attention_bias
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        r, qr = self.kv_lora_rank, self.q_lora_rank
        q = (h * qr + qr * b + qr + qr * nh * qk) if qr else h * nh * qk
        kv = h * (r + self.qk_rope_head_dim) + (r + self.qk_rope_head_dim) * b + r
        kv += r * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + nh * self.v_head_dim * h + h * b


def _split_layer_rope(rope: dict[str, Any], kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """Per-layer-type ``rope_parameters`` (Gemma 3 in transformers 5): the full-attention layers' entry is the
    model's RoPE (returned); the sliding layers' base goes to ``rope_local_base_freq`` (unscaled, as Gemma 3's)."""
    if set(rope) - {"full_attention", "sliding_attention"} or "full_attention" not in rope:
        raise UnsupportedModelError(f"{source}: rope_parameters per layer type must have 'full_attention' (and "
                                    f"optionally 'sliding_attention'), got {sorted(rope)}")
    local = rope.get("sliding_attention")
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{source}: rope_parameters.sliding_attention.rope_type "
                                        f"{local['rope_type']!r} is not supported (only default)")
        kwargs["rope_local_base_freq"] = float(local["rope_theta"])
    return rope["full_attention"]


MAX_CONFIG_BYTES = 16 << 20
# Fields whose explicit null is an error (the rest take null as "not set").
_NOT_NULL = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
             "attention_bias", "mlp_bias", "use_sliding_window", "num_local_experts", "num_experts_per_tok",
             "norm_topk_prob", "decoder_sparse_step", "router_aux_loss_coef")


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _check_int(value: Any, name: str, source: str, minimum: int = 1) -> None:
    """``value`` is an int (not a bool) in ``minimum..LIMITS[name]``; else ConfigError naming ``name``."""
    top = LIMITS.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (top is not None and value > top):
        bound = f"{minimum}..{top}" if top is not None else f">= {minimum}"
        raise ConfigError(f"{source}: field {name!r} must be an integer in {bound}, got {value!r} ({_json_type(value)})")


def _check_float(value: Any, name: str, source: str, below: float | None = None) -> None:
    """``value`` is a finite number > 0 (and < ``below``); else ConfigError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (below is not None and value >= below):
        bound = f"in (0, {below})" if below is not None else "> 0"
        raise ConfigError(f"{source}: field {name!r} must be a finite number {bound}, got {value!r} ({_json_type(value)})")


def _check_moe(kwargs: dict[str, Any], source: str) -> None:
    """Reject MoE settings that cannot describe a model, naming the field."""
    n, k = kwargs["num_local_experts"], kwargs.get("num_experts_per_tok", 0)
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"{source}: field 'num_local_experts' must be a non-negative integer, got {n!r}")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"{source}: field 'num_experts_per_tok' must be an integer in 1..{n} "
                          f"(num_local_experts), got {k!r}")
    step = kwargs.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"{source}: field 'decoder_sparse_step' must be a positive integer, got {step!r}")
    im = kwargs.get("moe_intermediate_size")
    if im is not None and (not isinstance(im, int) or im <= 0):
        raise ConfigError(f"{source}: field 'moe_intermediate_size' must be a positive integer, got {im!r}")
