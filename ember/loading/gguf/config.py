"""GGUF metadata -> :class:`~ember.config.ModelConfig`, and the tensor-name table llama.cpp uses.

What llama.cpp's converter (``convert_hf_to_gguf.py``) does to an HF checkpoint's config, and we undo:
hyper-parameters become ``{arch}.*`` keys; Llama 3.1 style RoPE scaling is not written as metadata
but as a ``rope_freqs.weight`` tensor of per-frequency divisors, from which we recover the equivalent
``llama3`` ``rope_scaling`` (and check it); tied embeddings are written as no ``output.weight``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ember.config import ModelConfig
from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.gguf.families import FAMILY_TENSORS, family_config, is_family
from ember.loading.gguf.file_facts import check_layers_present as _check_layers_present
from ember.loading.gguf.file_facts import file_dtype_name as _file_dtype_name
from ember.loading.gguf.hybrid import HYBRID_ARCHITECTURES, hybrid_config_from_gguf
from ember.loading.gguf.reader import GGUFFile
from ember.models import rope_inv_freq

# general.architecture -> (Ember/HF model_type, whether llama.cpp permuted q/k rows for its RoPE).
# llama.cpp's "llama" also carries Mistral (same model) and Mixtral (with {arch}.expert_count > 0).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "qwen3moe": ("qwen3_moe", False),
}
MOE_MODEL_TYPES = {"llama": "mixtral", "qwen3moe": "qwen3_moe"}  # architecture with experts -> model_type

# Global tensors: GGUF name -> Ember/HF name.
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-layer tensors: blk.N.<key>.(weight|bias) -> model.layers.N.<value>.(weight|bias).
LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # MoE router
}
# Stacked experts: blk.N.<key>.weight of shape (E, out, in) -> model.layers.N.mlp.experts.<e>.<value>.weight.
EXPERT_TENSORS: dict[str, str] = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Older Mixtral files store one tensor per expert: blk.N.ffn_gate.E.weight.
_EXPERT_NAME = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
# Tensors that configure the model rather than hold weights.
CONFIG_TENSORS = ("rope_freqs.weight",)
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias|scale)")  # scale: Gemma 4's router


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` a GGUF file describes (metadata plus tensor shapes).

    Raises:
        UnsupportedModelError: an architecture, RoPE scaling or layout Ember does not run.
        GGUFError: required metadata is missing or malformed.
    """
    arch = gf.architecture
    if arch in HYBRID_ARCHITECTURES:
        return hybrid_config_from_gguf(gf)
    if is_family(arch):
        return _family_config(gf, arch)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{gf.path}: GGUF architecture {arch!r} is not supported; supported: "
                                    f"{', '.join(sorted([*ARCHITECTURES, *FAMILY_TENSORS]))}; "
                                    f"hybrid: {', '.join(sorted(HYBRID_ARCHITECTURES))}")
    model_type, _ = ARCHITECTURES[arch]
    n_experts = gf.get_int(f"{arch}.expert_count", 0)
    if n_experts and arch not in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"{gf.path}: {arch!r} with experts is not supported; mixture-of-experts "
                                    f"architectures: {', '.join(sorted(MOE_MODEL_TYPES))}")
    if n_experts:
        model_type = MOE_MODEL_TYPES[arch]
    if "token_embd.weight" not in gf.tensors or len(gf.tensor_shape("token_embd.weight")) != 2:
        raise GGUFError(f"{gf.path}: tensor 'token_embd.weight' is missing or not a matrix")
    vocab, hidden = gf.tensor_shape("token_embd.weight")
    n_head = gf.get_int(f"{arch}.attention.head_count", required=True)
    head_dim = gf.get_int(f"{arch}.attention.key_length")
    if head_dim is None:  # no explicit head size: hidden / heads, as HF defaults it
        if n_head <= 0 or hidden % n_head:
            raise GGUFError(f"{gf.path}: attention.head_count {n_head} does not divide the hidden size {hidden}")
        head_dim = hidden // n_head
    if n_head <= 0:
        raise GGUFError(f"{gf.path}: attention.head_count must be positive, got {n_head}")
    value_dim = gf.get_int(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{gf.path}: key_length {head_dim} != value_length {value_dim}; not supported")
    rope_dim = gf.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{gf.path}: partial rotary embeddings (rope.dimension_count {rope_dim} "
                                    f"< head dim {head_dim}) are not supported")
    raw: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": gf.get_int(f"{arch}.embedding_length", hidden),
        "intermediate_size": gf.get_int(f"{arch}.feed_forward_length",
                                        gf.get_int(f"{arch}.expert_feed_forward_length"), required=True),
        "num_hidden_layers": gf.get_int(f"{arch}.block_count", required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": gf.get_int(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": gf.get_int(f"{arch}.context_length", 4096),
        "rms_norm_eps": gf.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": gf.get_float(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": gf.get_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gf.get_int("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.get_int("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _file_dtype_name(gf),
        "gguf_file_type": gf.get_int("general.file_type"),
        "name_or_path": gf.get("general.name"),
    }
    _check_layers_present(gf, raw["num_hidden_layers"])
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if raw[key] <= 0:
            raise GGUFError(f"{gf.path}: metadata for {key} must be positive, got {raw[key]}")
    if n_head % raw["num_key_value_heads"]:
        raise GGUFError(f"{gf.path}: head_count {n_head} is not a multiple of head_count_kv {raw['num_key_value_heads']}")
    if raw["hidden_size"] != hidden:
        raise GGUFError(f"{gf.path}: embedding_length {raw['hidden_size']} but token_embd.weight has {hidden} columns")
    if n_experts:
        n_layers = raw["num_hidden_layers"]
        raw["num_local_experts"] = n_experts
        raw["num_experts_per_tok"] = gf.get_int(f"{arch}.expert_used_count", required=True)
        raw["moe_intermediate_size"] = gf.get_int(f"{arch}.expert_feed_forward_length", raw["intermediate_size"])
        # llama.cpp renormalises the top-k router weights for qwen3moe unless the file says otherwise
        # (Mixtral always, by its family).
        raw["norm_topk_prob"] = bool(gf.get(f"{arch}.expert_weights_norm", True))
        # GGUF has no layer pattern: a layer is sparse exactly when it has a router.
        raw["mlp_only_layers"] = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in gf.tensors]
    if model_type != "qwen2":  # Qwen2's q/k/v-only bias is fixed by its family; the rest say it by their tensors
        q_bias, o_bias = "blk.0.attn_q.bias" in gf.tensors, "blk.0.attn_output.bias" in gf.tensors
        raw["attention_bias"] = q_bias or o_bias
        raw["qkv_bias_only"] = q_bias and not o_bias
        raw["mlp_bias"] = "blk.0.ffn_up.bias" in gf.tensors
    # Every value checked (type, range, sanity bounds) before the RoPE fit does arithmetic with them.
    ModelConfig.from_dict({**raw, "rope_scaling": None}, source=f"{gf.path} (metadata)")
    raw["rope_scaling"] = _rope_scaling(gf, arch, raw)
    return ModelConfig.from_dict(raw, source=f"{gf.path} (metadata)")


def _family_config(gf: GGUFFile, arch: str) -> ModelConfig:
    """:func:`config_from_gguf` for the architectures of :mod:`ember.loading.gguf.families`."""
    if "token_embd.weight" not in gf.tensors or len(gf.tensor_shape("token_embd.weight")) != 2:
        raise GGUFError(f"{gf.path}: tensor 'token_embd.weight' is missing or not a matrix")
    vocab, hidden = gf.tensor_shape("token_embd.weight")
    raw = family_config(gf, arch, hidden)
    # Multi-token-prediction layers past the ones Ember runs may be in the table (GLM), or left out.
    _check_layers_present(gf, raw["num_hidden_layers"], gf.get_int(f"{arch}.block_count", required=True))
    if gf.get_int(f"{arch}.embedding_length", hidden) != hidden:
        raise GGUFError(f"{gf.path}: embedding_length {gf.get(f'{arch}.embedding_length')} but token_embd.weight "
                        f"has {hidden} columns")
    raw.update({
        "vocab_size": vocab, "hidden_size": hidden, "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": gf.get_int("tokenizer.ggml.bos_token_id"), "eos_token_id": gf.get_int("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.get_int("tokenizer.ggml.padding_token_id"), "torch_dtype": _file_dtype_name(gf),
        "gguf_file_type": gf.get_int("general.file_type"), "name_or_path": gf.get("general.name"),
    })
    return ModelConfig.from_dict(raw, source=f"{gf.path} (metadata)")


def _rope_scaling(gf: GGUFFile, arch: str, raw: dict[str, Any]) -> dict[str, Any] | None:
    kind = gf.get(f"{arch}.rope.scaling.type")
    factor = gf.get_float(f"{arch}.rope.scaling.factor") or gf.get_float(f"{arch}.rope.scale_linear")
    if "rope_freqs.weight" in gf.tensors:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{gf.path}: rope_freqs.weight together with rope scaling {kind!r} is not supported")
        factors = gf.tensor("rope_freqs.weight", torch.float64).reshape(-1)
        return _llama3_scaling_from_factors(factors, raw, str(gf.path))
    if kind in (None, "none") and (factor is None or factor == 1.0):
        return None
    if kind in (None, "linear") and factor:
        return {"rope_type": "linear", "factor": factor}
    raise UnsupportedModelError(f"{gf.path}: rope scaling {kind!r} is not supported; supported: none, linear, "
                                "llama3 (rope_freqs.weight)")


def _llama3_scaling_from_factors(factors: torch.Tensor, raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The ``llama3`` rope_scaling whose per-frequency divisors equal ``rope_freqs.weight``.

    llama.cpp stores f_i = inv_freq_i / scaled_inv_freq_i: 1 for short wavelengths, ``factor`` for
    long ones, and 1 / ((1-s)/factor + s) between, where s = old_ctx/((high-low)*wavelen) - low/(high-low)
    is linear in 1/wavelen. Only (factor, old_ctx/(high-low), low/(high-low)) are identifiable, so we
    fit those and pick low=B, high=B+1, old_ctx=A; the result is then checked against the file.
    """
    hd = raw["head_dim"]
    inv_freq = 1.0 / (raw["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if factors.numel() != inv_freq.numel() or not torch.isfinite(factors).all() or (factors <= 0).any():
        raise GGUFError(f"{source}: rope_freqs.weight has {factors.numel()} entries (expected {inv_freq.numel()}) "
                        "or non-positive values")
    big = float(factors.max())
    if abs(big - 1.0) < 1e-6 and float(factors.min()) > 1 - 1e-6:
        return None
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    tol = 1e-4 * big
    is_high = (factors - 1).abs() < 1e-4  # short wavelengths, unscaled
    is_low = (factors - big).abs() < tol  # long wavelengths, divided by factor
    mid = ~(is_high | is_low)
    s = (1 / factors - 1 / big) / (1 - 1 / big)  # target smooth value of each frequency
    x_low_max = float(x[is_low].max()) if is_low.any() else 0.0
    x_high_min = float(x[is_high].min()) if is_high.any() else math.inf
    if int(mid.sum()) >= 2:  # least squares on s = A*x - B
        design = torch.stack((x[mid], -torch.ones_like(x[mid])), dim=1)
        a, b = torch.linalg.lstsq(design, s[mid].unsqueeze(1)).solution.squeeze(1).tolist()
    elif int(mid.sum()) == 1:  # a line through the one point that keeps the groups on their sides
        xm, sm = float(x[mid][0]), float(s[mid][0])
        a = 2 * max(sm / (xm - x_low_max), (1 - sm) / (x_high_min - xm) if math.isfinite(x_high_min) else 0.0)
        b = a * xm - sm
    else:  # a clean step: put the whole ramp between the two groups
        hi = x_high_min if math.isfinite(x_high_min) else 2 * x_low_max
        a = 3 / (hi - x_low_max)
        b = a * x_low_max + 1
    scaling = {"rope_type": "llama3", "factor": big, "low_freq_factor": b, "high_freq_factor": b + 1,
               "original_max_position_embeddings": a}
    if not (a > 0 and b > 0):
        raise UnsupportedModelError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling; not supported")
    probe = ModelConfig(head_dim=hd, num_attention_heads=1, hidden_size=hd, rope_theta=raw["rope_theta"],
                        rope_scaling=scaling)
    got = inv_freq / rope_inv_freq(probe).double()
    worst = float(((got - factors) / factors).abs().max())
    if worst > 1e-4:
        raise UnsupportedModelError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling "
                                    f"(best fit is off by {worst:.2g}); not supported")
    return scaling
