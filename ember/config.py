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
    # gpt-oss: learned per-head attention sinks, biases on q/k/v/o, alternating sliding/full layers
    # (layer_types), YaRN RoPE, a biased top-k router and clamped-SwiGLU experts with biases.
    "gpt_oss": {"attention_bias": True, "attention_sinks": True},
}

# HF spells the expert count two ways; transformers 5 maps num_experts -> num_local_experts.
_ALIASES = {"num_experts": "num_local_experts"}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
    swiglu_alpha: float = 1.702      # gpt-oss experts: sigmoid gain of the clamped SwiGLU ...
    swiglu_limit: float = 7.0        # ... and the clamp on its gate (above) and up (both sides) inputs
    # Derived / family fields (not HF keys, or HF keys with family-specific meaning).
    qk_norm: bool = False            # Qwen3: RMSNorm on each head of q and k before RoPE
    qkv_bias_only: bool = False      # Qwen2: bias on q/k/v but not o
    attention_sinks: bool = False    # gpt-oss: a learned logit per head joins each softmax (self_attn.sinks)
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
        # Some checkpoints nest the LM config (e.g. text_config); we only read flat ones.
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
        kwargs.update(FAMILIES[model_type])
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers 5 writes "dtype"
            kwargs["torch_dtype"] = raw["dtype"]
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)

        # RoPE: transformers 4 writes rope_theta + rope_scaling; 5 writes rope_parameters.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()):
            raise UnsupportedModelError(f"{source}: per-layer rope_parameters are not supported")
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

        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
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
                and (layer + 1) % self.decoder_sparse_step == 0)

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
        attn = h * hd * (nh + 2 * nkv) + nh * hd * h
        if self.attention_bias:
            attn += hd * (nh + 2 * nkv) + (0 if self.qkv_bias_only else h)
        if self.qk_norm:
            attn += 2 * hd
        if self.attention_sinks:
            attn += nh
        expert_bias = self.mlp_bias or self.model_type == "gpt_oss"  # gpt-oss experts and router carry biases
        bias = (lambda width: (2 * width + h) if expert_bias else 0)
        dense = 3 * h * i + bias(i)
        total = v * h * (1 if self.tie_word_embeddings else 2) + h
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                im = self.moe_intermediate_size
                router = self.num_local_experts * (h + (1 if self.model_type == "gpt_oss" else 0))
                mlp = router + experts * (3 * h * im + bias(im))  # router + experts
            else:
                mlp = dense
            total += attn + mlp + 2 * h
        return total


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
