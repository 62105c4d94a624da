"""ModelConfig: the one description of a decoder-only transformer, read from an HF config.json.

Field names are exactly those of HF ``config.json`` so a reader can check them against the
checkpoint by eye; unknown keys are dropped. Families differ only by fields (qkv bias, q/k norm,
rope scaling, sliding window, MoE), never by subclass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ConfigError, UnsupportedModelError

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
}

# Checkpoints whose config.json nests the language model's fields under text_config (multimodal ones).
_NESTED_TEXT_CONFIG = ("gemma3",)

# HF spells the expert count two ways; transformers 5 maps num_experts -> num_local_experts.
_ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts",
            "use_qk_norm": "qk_norm"}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
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
    # Derived / family fields (not HF keys, or HF keys with family-specific meaning).
    qk_norm: bool = False            # Qwen3: RMSNorm on each head of q and k before RoPE
    qkv_bias_only: bool = False      # Qwen2: bias on q/k/v but not o
    # Gemma 3 (HF names): attention scale query_pre_attn_scalar**-0.5, tanh soft-capping of attention and
    # final logits (None: off), the sliding layers' RoPE base, the MLP activation.
    hidden_activation: str | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    # GLM-4.5 / DeepSeek-V3 (HF names): RoPE on the first partial_rotary_factor of each head; the
    # sigmoid router's group-limited top-k, shared experts, routed scaling; leading dense layers.
    partial_rotary_factor: float = 1.0
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.num_local_experts and self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.model_type in ("gemma3_text", "gemma3", "gemma2") and self.layer_types is None:
            # Gemma configs written before layer_types: every sliding_window_pattern-th layer is global (Gemma 2:
            # every other one)
            default = 2 if self.model_type == "gemma2" else 6
            pattern = int(self.extra.get("sliding_window_pattern", self.extra.get("_sliding_window_pattern", default)))
            self.layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]

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
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(FAMILIES)}"
            )
        if model_type in _NESTED_TEXT_CONFIG and isinstance(raw.get("text_config"), dict):
            # the language model's fields; the vision tower's are not read (its weights are skipped)
            top = {k: raw[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype") if k in raw}
            raw = {**raw["text_config"], **top, "model_type": model_type}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in raw:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            if not isinstance(raw[key], int) or raw[key] <= 0:
                raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {raw[key]!r}")

        names = {f.name for f in dataclasses.fields(cls)}
        for alias, name in _ALIASES.items():
            if alias in raw and name not in raw:
                raw = {**raw, name: raw[alias]}
        kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in names and k != "extra"}
        kwargs = {**_FAMILY_DEFAULTS.get(model_type, {}), **kwargs, **FAMILIES[model_type]}
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers 5 writes "dtype"
            kwargs["torch_dtype"] = raw["dtype"]
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)

        # RoPE: transformers 4 writes rope_theta + rope_scaling; 5 writes rope_parameters.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()):
            rope = _split_layer_rope(rope, kwargs, source)
        if isinstance(raw.get("rotary_dim"), int) and kwargs.get("head_dim"):  # MiniMax-M2's released files
            kwargs["partial_rotary_factor"] = raw["rotary_dim"] / kwargs["head_dim"]
        if isinstance(rope, dict) and "partial_rotary_factor" in rope:
            kwargs["partial_rotary_factor"] = float(rope["partial_rotary_factor"])
        scaling = raw.get("rope_scaling") or (rope if isinstance(rope, dict) else None)
        if isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
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
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass guards above make this rare
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` (or a directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: not found; a model folder needs a config.json from Hugging Face")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None
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
        bias = (lambda width: (2 * width + h) if self.mlp_bias else 0)
        layer_norms = (4 if self.sandwich_norms else 2) * h
        dense = 3 * h * i + bias(i)
        total = v * h * (1 if self.tie_word_embeddings else 2) + h
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                im = self.moe_intermediate_size
                mlp = self.num_local_experts * h + experts * (3 * h * im + bias(im))  # router + experts
                mlp += 3 * h * im * self.n_shared_experts  # shared experts (GLM-4.5, DeepSeek-V3)
            else:
                mlp = dense
            total += attn + mlp + layer_norms
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
