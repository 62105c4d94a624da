"""What a workload takes in memory: weights, KV cache, activations, training state (bytes).

Every equation is written out in docs/planner.md; ``bench/plan_accuracy.py`` checks them against real runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ember.config import ModelConfig
from ember.hardware import Hardware
from ember.hybrid_config import mamba_dims
from ember.loading.mxfp4 import experts_only as mxfp4_experts_only
from ember.quant.mxfp4 import BLOCK as MXFP4_BLOCK
from ember.planner.workload import (
    DTYPE_BYTES, LORA_TARGETS, MIXED, Workload, kv_caps_window, quant_defaults, short_dtype,
)

# Allocator slack and temporaries on top of the live-tensor count in prefill, fitted on this repo's
# CPU runs (bench/plan_accuracy.py; 1.6-2.8 observed, glibc keeps freed chunks in its arenas).
K_ACT = 2.2
# AdamW keeps two fp32 moments per trainable parameter.
ADAM_BYTES = 8


# ====================================================================== memory pieces


def linear_bytes(out_f: int, in_f: int, quant: str, b: int, qd: dict[str, Any] | None = None) -> float:
    """Bytes of one weight matrix (out_f, in_f) stored as ``quant`` with compute dtype of ``b`` bytes."""
    qd = qd or quant_defaults()
    n = out_f * in_f
    if quant == "none":
        return n * b
    if quant == "int8":
        return n + out_f * b
    if quant == "int4":
        g = qd["int4_group"]
        return n / 2 + out_f * math.ceil(in_f / g) * 2 * b
    if quant == "mxfp4":  # E2M1 codes + one E8M0 byte per 32: 4.25 bits per weight
        return n / 2 + out_f * math.ceil(in_f / MXFP4_BLOCK)
    if quant == "nf4":
        blocks = math.ceil(n / qd["nf4_block"])
        if qd["nf4_double_quant"]:
            return n / 2 + blocks + math.ceil(blocks / qd["nf4_double_quant_block"]) * 4 + 4
        return n / 2 + blocks * 4
    raise ValueError(f"unknown quant {quant!r}")


def part_quant(cfg: ModelConfig, kind: str, quant: str, lm_head: str = "none") -> str:
    """The format a Linear of ``kind`` (attention, mlp, experts, lm_head, ...) is priced in under ``quant``.

    On gpt-oss ``mxfp4`` is its experts only, everything else (head included) in the compute dtype, as published;
    ``mxfp4+int8`` is those experts and every other Linear int8, the head as ``lm_head`` (what ``--quant
    mxfp4+int8`` loads; llama.cpp's MXFP4_MOE). Any other format covers every Linear, the head as ``lm_head``."""
    gpt_oss = mxfp4_experts_only(cfg)
    if kind == "lm_head":
        if quant == "mxfp4" and gpt_oss:
            return "none"
        return "int8" if lm_head == MIXED else lm_head
    if quant == MIXED or (quant == "mxfp4" and gpt_oss):
        return "mxfp4" if kind == "experts" else "int8" if quant == MIXED else "none"
    return quant


@dataclass(frozen=True)
class _Linear:
    kind: str      # attention | mlp | experts | lm_head
    name: str      # q_proj, ..., gate_proj (the module's own name)
    out_f: int
    in_f: int
    count: int     # how many such matrices in the model
    bias: bool


def linears(cfg: ModelConfig) -> list[_Linear]:
    """Every ``nn.Linear`` of :class:`ember.models.Transformer` grouped by shape (routers excluded)."""
    if cfg.model_type == "gemma4_text":
        return _gemma4_linears(cfg)
    if cfg.model_type in HYBRID_FAMILIES:
        out = _hybrid_linears(cfg)
        if not cfg.tie_word_embeddings:
            out.append(_Linear("lm_head", "lm_head", cfg.vocab_size, cfg.hidden_size, 1, False))
        return out
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    L = cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    dense_layers = L - moe_layers
    qkv_b = cfg.attention_bias
    o_b = cfg.attention_bias and not cfg.qkv_bias_only
    out = _mla_linears(cfg) if cfg.kv_lora_rank else [
        _Linear("attention", "q_proj", nh * hd, h, L, qkv_b),
        _Linear("attention", "k_proj", nkv * hd, h, L, qkv_b),
        _Linear("attention", "v_proj", nkv * hd, h, L, qkv_b),
        _Linear("attention", "o_proj", h, nh * hd, L, o_b),
    ]
    i = cfg.intermediate_size
    if dense_layers:
        out += [_Linear("mlp", "gate_proj", i, h, dense_layers, cfg.mlp_bias),
                _Linear("mlp", "up_proj", i, h, dense_layers, cfg.mlp_bias),
                _Linear("mlp", "down_proj", h, i, dense_layers, cfg.mlp_bias)]
    if moe_layers:
        im, e = cfg.moe_intermediate_size, cfg.num_local_experts
        out += [_Linear("experts", "gate_proj", im, h, moe_layers * e, cfg.mlp_bias),
                _Linear("experts", "up_proj", im, h, moe_layers * e, cfg.mlp_bias),
                _Linear("experts", "down_proj", h, im, moe_layers * e, cfg.mlp_bias)]
        if cfg.n_shared_experts:  # GLM-4.5, DeepSeek-V3: every token reads them, as a dense MLP's
            sh = im * cfg.n_shared_experts
            out += [_Linear("mlp", "gate_proj", sh, h, moe_layers, False), _Linear("mlp", "up_proj", sh, h, moe_layers, False),
                    _Linear("mlp", "down_proj", h, sh, moe_layers, False)]
    if not cfg.tie_word_embeddings:
        out.append(_Linear("lm_head", "lm_head", cfg.vocab_size, h, 1, False))
    return out


def _gemma4_linears(cfg: ModelConfig) -> list[_Linear]:
    """Gemma 4 (:mod:`ember.models.gemma4`): each layer's own head shape (k = v on full layers with
    ``attention_k_eq_v``, no k/v where a layer reuses another's), the dense MLP in every layer (double width where
    shared), the experts beside it, and the per-layer-input projections."""
    h, nh, L, b, p = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.attention_bias, \
        cfg.hidden_size_per_layer_input
    out: list[_Linear] = []
    for i in range(L):
        hd, nkv, shared = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.kv_source(i) is not None
        out += [_Linear("attention", "q_proj", nh * hd, h, 1, b), _Linear("attention", "o_proj", h, nh * hd, 1, b)]
        if not shared:
            out.append(_Linear("attention", "k_proj", nkv * hd, h, 1, b))
            if not (cfg.attention_k_eq_v and cfg.layer_window(i) is None):
                out.append(_Linear("attention", "v_proj", nkv * hd, h, 1, b))
        w = cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and shared else 1)
        out += [_Linear("mlp", "gate_proj", w, h, 1, False), _Linear("mlp", "up_proj", w, h, 1, False),
                _Linear("mlp", "down_proj", h, w, 1, False)]
        if p:
            out += [_Linear("mlp", "per_layer_input_gate", p, h, 1, False),
                    _Linear("mlp", "per_layer_projection", h, p, 1, False)]
    if cfg.num_local_experts:
        im, n = cfg.moe_intermediate_size, L * cfg.num_local_experts
        out += [_Linear("experts", "gate_proj", im, h, n, False), _Linear("experts", "up_proj", im, h, n, False),
                _Linear("experts", "down_proj", h, im, n, False)]
    if p:
        out.append(_Linear("mlp", "per_layer_model_projection", L * p, h, 1, False))
    if not cfg.tie_word_embeddings:
        out.append(_Linear("lm_head", "lm_head", cfg.vocab_size, h, 1, False))
    return out
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "nemotron_h")


def _hybrid_linears(cfg: ModelConfig) -> list[_Linear]:
    """The projections of the hybrids (docs/hybrid.md), each counted over the layers of its kind only: the
    recurrent mixers' (Gated DeltaNet, Mamba-2: kind "recurrent"), the attention layers', the MLPs and experts."""
    types = list(cfg.layer_types or [])
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    full, lin = types.count("full_attention"), types.count("linear_attention")
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    gated = cfg.model_type != "nemotron_h"  # Qwen's q_proj also yields the output gate
    out = [_Linear("attention", "q_proj", nh * hd * (2 if gated else 1), h, full, False),
           _Linear("attention", "k_proj", nkv * hd, h, full, False), _Linear("attention", "v_proj", nkv * hd, h, full, False),
           _Linear("attention", "o_proj", h, nh * hd, full, False)]
    im, e = cfg.moe_intermediate_size or 0, cfg.num_local_experts
    if cfg.model_type == "nemotron_h":
        m, extra = mamba_dims(cfg), cfg.extra
        dense, shared, latent = types.count("mlp"), extra.get("moe_shared_expert_intermediate_size", 0), \
            extra.get("moe_latent_size")
        d = latent or h
        out += [_Linear("recurrent", "in_proj", m.inner + m.conv_dim + m.heads, h, lin, m.proj_bias),
                _Linear("recurrent", "out_proj", h, m.inner, lin, m.proj_bias),
                _Linear("mlp", "up_proj", cfg.intermediate_size, h, dense, cfg.mlp_bias),
                _Linear("mlp", "down_proj", h, cfg.intermediate_size, dense, cfg.mlp_bias),
                _Linear("experts", "up_proj", im, d, moe * e, cfg.mlp_bias),
                _Linear("experts", "down_proj", d, im, moe * e, cfg.mlp_bias),
                _Linear("mlp", "up_proj", shared, h, moe, cfg.mlp_bias), _Linear("mlp", "down_proj", h, shared, moe, cfg.mlp_bias)]
        if latent:
            out += [_Linear("mlp", "fc1_latent_proj", latent, h, moe, cfg.mlp_bias),
                    _Linear("mlp", "fc2_latent_proj", h, latent, moe, cfg.mlp_bias)]
        return [x for x in out if x.count and x.out_f]
    kd, vd = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    nv = cfg.linear_num_value_heads
    if cfg.model_type == "qwen3_next":
        out += [_Linear("recurrent", "in_proj_qkvz", 2 * kd + 2 * vd, h, lin, False),
                _Linear("recurrent", "in_proj_ba", 2 * nv, h, lin, False)]
    else:
        out += [_Linear("recurrent", "in_proj_qkv", 2 * kd + vd, h, lin, False),
                _Linear("recurrent", "in_proj_z", vd, h, lin, False), _Linear("recurrent", "in_proj_b", nv, h, lin, False),
                _Linear("recurrent", "in_proj_a", nv, h, lin, False)]
    out.append(_Linear("recurrent", "out_proj", h, vd, lin, False))
    i, dense, sh = cfg.intermediate_size, cfg.num_hidden_layers - moe, cfg.shared_expert_intermediate_size
    for name, (o, n) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        out.append(_Linear("mlp", name, o, n, dense, False))
    for name, (o, n) in (("gate_proj", (im, h)), ("up_proj", (im, h)), ("down_proj", (h, im))):
        out.append(_Linear("experts", name, o, n, moe * e, False))
    if sh:  # the gated shared expert
        out += [_Linear("mlp", "gate_proj", sh, h, moe, False), _Linear("mlp", "up_proj", sh, h, moe, False),
                _Linear("mlp", "down_proj", h, sh, moe, False)]
    return [x for x in out if x.count and x.out_f]


def _mla_linears(cfg: ModelConfig) -> list[_Linear]:
    """The projections of multi-head latent attention (DeepSeek-V3, :mod:`ember.models.mla`)."""
    h, nh, L, b = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.attention_bias
    qk, r, qr, dr = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim
    q = ([_Linear("attention", "q_a_proj", qr, h, L, b), _Linear("attention", "q_b_proj", nh * qk, qr, L, False)]
         if qr else [_Linear("attention", "q_proj", nh * qk, h, L, False)])
    return q + [_Linear("attention", "kv_a_proj_with_mqa", r + dr, h, L, b),
                _Linear("attention", "kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), r, L, False),
                _Linear("attention", "o_proj", h, nh * cfg.v_head_dim, L, b)]


@dataclass
class WeightBytes:
    """Weight memory by part, bytes. ``read_per_token(B)`` gives what one decode step streams."""

    embedding: float
    lm_head: float            # 0 when tied (the embedding is the head)
    attention: float          # q/k/v/o, all layers
    mlp: float                # dense MLPs
    experts: float            # all experts of all MoE layers
    other: float              # norms, routers, biases (and the hybrids' conv and state-space parameters)
    moe_layers: int = 0
    experts_per_layer: int = 0
    experts_per_tok: int = 0
    linear_params_active: float = 0.0   # multiply-adds per token in Linear layers (FLOPs = 2x)
    recurrent: float = 0.0    # the hybrids' recurrent mixers' projections (Gated DeltaNet, Mamba-2)
    head_quant: str = "none"            # the untied LM head's format as priced

    @property
    def total(self) -> float:
        return self.embedding + self.lm_head + self.attention + self.recurrent + self.mlp + self.experts + self.other

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts per MoE layer used by ``tokens`` tokens routed uniformly at random."""
        if not self.moe_layers:
            return 0.0
        e, k = self.experts_per_layer, self.experts_per_tok
        return e * (1 - (1 - k / e) ** tokens)

    def read_per_step(self, tokens: int, row_bytes: float) -> float:
        """Weight bytes one forward over ``tokens`` tokens reads (embedding: one row per token)."""
        head = self.lm_head if self.lm_head else self.embedding
        emb = 0.0 if not self.lm_head else min(self.embedding, tokens * row_bytes)
        experts = 0.0
        if self.moe_layers:
            experts = self.experts * self.experts_touched(tokens) / self.experts_per_layer
        return head + emb + self.attention + self.recurrent + self.mlp + self.other + experts


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", quant: str = "none", lm_head: str = "none") -> WeightBytes:
    """Bytes of every weight of ``cfg`` in compute ``dtype`` with Linear layers stored as ``quant``, an untied
    LM head as ``lm_head``."""
    b = DTYPE_BYTES[dtype]
    qd = quant_defaults()
    parts = {"attention": 0.0, "recurrent": 0.0, "mlp": 0.0, "experts": 0.0, "lm_head": 0.0}
    bias_bytes = 0.0
    active = 0.0
    if quant == MIXED and not mxfp4_experts_only(cfg):
        raise ValueError(f"{MIXED} is gpt-oss's format (MXFP4 experts, int8 elsewhere); "
                         f"model_type {cfg.model_type!r} has no gpt-oss experts")
    lm_head = part_quant(cfg, "lm_head", quant, lm_head)
    for lin in linears(cfg):
        q = part_quant(cfg, lin.kind, quant, lm_head)
        parts[lin.kind] += lin.count * linear_bytes(lin.out_f, lin.in_f, q, b, qd)
        if lin.bias:
            bias_bytes += lin.count * lin.out_f * b
        per_layer = lin.count if lin.kind != "experts" else lin.count * cfg.num_experts_per_tok / cfg.num_local_experts
        active += per_layer * lin.out_f * lin.in_f
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    norms = ((4 if cfg.sandwich_norms else 2) * L + 1) * h + (2 * cfg.head_dim * L if cfg.qk_norm else 0)
    norms += L * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank) if cfg.kv_lora_rank else 0  # MLA's latent norms
    if cfg.model_type == "minimax_m2":  # q/k norms over all heads' channels
        norms += L * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim
    routers = moe_layers * cfg.num_local_experts * h
    if cfg.model_type == "gemma4_text":  # norms, router scales and per-layer tables: what the count has beyond these
        linear = sum(lin.count * (lin.out_f * lin.in_f + lin.bias * lin.out_f) for lin in linears(cfg))
        norms = cfg.num_parameters() - linear - cfg.vocab_size * h - routers
    active += routers
    if cfg.model_type in HYBRID_FAMILIES:  # norms, routers, convs, A_log/dt_bias/D: what the Linears leave
        in_linears = sum(lin.count * (lin.out_f * lin.in_f + lin.out_f * lin.bias) for lin in linears(cfg))
        norms = cfg.num_parameters() - in_linears - cfg.vocab_size * h - routers
        bias_bytes = 0.0
    held = cfg.extra.get("gguf_weights") if quant == "none" else None
    if held:  # a GGUF file (ember.planner.source): quantized tensors at their block bytes, floats in dtype
        parts.update({k: q + n * b for k, (q, n) in held.items()})
        return WeightBytes(
            embedding=parts["embedding"], lm_head=parts["lm_head"], attention=parts["attention"], mlp=parts["mlp"],
            experts=parts["experts"], other=parts["other"], moe_layers=moe_layers,
            experts_per_layer=cfg.num_local_experts, experts_per_tok=cfg.num_experts_per_tok,
            linear_params_active=active + (cfg.vocab_size * h if cfg.tie_word_embeddings else 0),
            recurrent=parts["recurrent"])
    return WeightBytes(
        head_quant=lm_head, embedding=cfg.vocab_size * h * b, lm_head=parts["lm_head"], attention=parts["attention"], mlp=parts["mlp"],
        experts=parts["experts"], other=(norms + routers) * b + bias_bytes, moe_layers=moe_layers,
        experts_per_layer=cfg.num_local_experts, experts_per_tok=cfg.num_experts_per_tok,
        linear_params_active=active + (cfg.vocab_size * h if cfg.tie_word_embeddings else 0),
        recurrent=parts["recurrent"],
    )


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16",
                   cap_window: bool | None = None) -> int:
    """KV cache bytes: layers x kv heads x head dim x slots x batch x 2 (k and v) x dtype bytes.

    Args:
        cap_window: keep only ``sliding_window`` slots in windowed layers; default: what Ember's caches do (every
            sliding layer keeps its window: ``ember.cache.ring_layers``); False prices every slot of every layer.
    """
    import torch  # noqa: PLC0415  (ember.cache needs it; `ember plan` alone does not import torch early)

    from ember.cache import bytes_per_sequence, layer_specs

    if cap_window is None:
        cap_window = kv_caps_window()
    total = 0.0
    for spec in layer_specs(cfg):
        if spec.kind == "recurrent":  # a fixed fp32 state per sequence, whatever the context or dtype
            total += bytes_per_sequence(spec, torch.float32, context)
            continue
        # ember.cache prices the held slots; at 1 byte per element its bytes are the element count
        total += bytes_per_sequence(spec, torch.uint8, context, cap_window) * DTYPE_BYTES[dtype]
    return int(total * batch)


def prefill_activation_bytes(cfg: ModelConfig, tokens: int, dtype: str = "bf16") -> float:
    """Peak transient bytes of one inference forward over ``tokens`` (= B x T) tokens."""
    b = DTYPE_BYTES[dtype]
    h = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    if cfg.num_local_experts:
        # MoE: tokens gathered in expert order (k*H), the output (H), the router's fp32 products
        # (2*k*H in 16-bit units), and the busiest expert's SwiGLU (~2x its fair share of tokens). Latent MoE
        # (Nemotron 3 Super) gathers and routes the tokens in its smaller latent space, not H.
        e, k, im = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        d = cfg.extra.get("moe_latent_size") or h
        per_expert = min(1.0, 2.0 * k / e)
        mlp = 3 * k * d + 2 * h + 3 * im * per_expert
        if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
            mlp = max(mlp, 3 * cfg.intermediate_size)
    else:
        mlp = 3 * cfg.intermediate_size
    per_token = K_ACT * (2 * h + max(mlp, 4 * q + 4 * kv)) * b
    if b < 4:
        per_token += 8 * h  # RMSNorm's fp32 copy and product
    return tokens * per_token


# Bytes of temporaries per weight element while ember.quant quantizes a chunk of rows (fp32 copy of
# the rows, normalised values, codes; measured on a 4096 x 4096 bf16 weight: RSS peak / elements,
# the stored result excluded).
# mxfp4: quantize_mxfp4's fp32 values, magnitudes and int64 bucket indices of one chunk (same measurement).
QUANT_SCRATCH_PER_ELEMENT = {"int8": 7.2, "int4": 8.1, "nf4": 12.9, "mxfp4": 52.1}


def quant_load_scratch_bytes(cfg: ModelConfig, quant: str) -> float:
    """Peak temporaries of quantizing one weight chunk while loading (``ember.quant``'s chunk of rows)."""
    from ember.quant.base import QUANT_CHUNK_ELEMENTS

    largest = max(lin.out_f * lin.in_f for lin in linears(cfg) if lin.kind != "lm_head")
    # mxfp4+int8 from a float gpt-oss: the experts' chunks as mxfp4's, the rest as int8's
    return min(largest, QUANT_CHUNK_ELEMENTS) * max(QUANT_SCRATCH_PER_ELEMENT[q] for q in quant.split("+"))


def lora_parameters(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Trainable LoRA parameters: r x (in + out) for every Linear whose name is in ``targets``."""
    return sum(lin.count * rank * (lin.in_f + lin.out_f) for lin in linears(cfg) if lin.name in targets)


# ``ember tune``'s LoRA dropout (its default): dropout keeps the int64 indices of the dropped inputs.
LORA_DROPOUT = 0.05


def training_activation_bytes(cfg: ModelConfig, batch: int, seq: int, dtype: str, checkpointing: bool,
                              lora_targets: tuple[str, ...] | None = LORA_TARGETS,
                              lora_dropout: float = LORA_DROPOUT) -> float:
    """Peak live bytes of one training micro-batch besides weights and optimizer state (ember.train).

    Counts what autograd keeps for backward, tensor by tensor, per token and layer (``b`` = bytes of
    the compute dtype, H hidden, q = heads x head_dim, kv = kv heads x head_dim, I intermediate)::

        RMSNorm (x2)   4H (the fp32 copy of its input, kept for the rsqrt's gradient) + bH (the
                       normed output, which the half's projections keep as their input)
        attention      q, k (after RoPE), v, the SDPA output: (2q + 2kv) b; fp32 log-sum-exp 4 x heads
        SwiGLU         gate, up, silu(gate), and their product (down_proj's input): 4 I b
        LoRA dropout   int64 indices of the dropped inputs: 8 p x (inputs of the adapted projections)

    Without checkpointing all L layers stay alive until backward reaches them. With checkpointing
    (ember.train checkpoints the attention and MLP halves separately) only the two (B, T, H) inputs
    per layer stay, and backward rebuilds one half at a time (the wider half's tensors above).
    On top: the chunked loss (``hidden[keep]`` and ``d loss/d hidden``: 2 H b per token, one
    (chunk, V) block of fp32 logits plus its ``b`` copy, the final norm's tensors; with more than
    one chunk, the previous chunk's fp32 block too, which is still bound while the next one's
    logits are formed), or, once backward runs, one half's gradient buffers (see below) --
    whichever is larger. What the allocator keeps on top is not counted here
    (:func:`cpu_training_heap_bytes`).

    Args:
        lora_targets: adapted projection names (dropout indices); None for full fine-tuning.
        lora_dropout: LoRA dropout probability.
    Returns:
        bytes.
    """
    b = DTYPE_BYTES[dtype]
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.num_local_experts else cfg.intermediate_size
    n = batch * seq
    p = lora_dropout if lora_targets else 0.0
    targets = lora_targets or ()
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": inter}
    drop_attn = 8 * p * sum(w for k, w in inputs.items() if k in targets and k.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    drop_mlp = 8 * p * sum(w for k, w in inputs.items() if k in targets and k in ("gate_proj", "up_proj", "down_proj"))
    norm = 4 * h + b * h                                                       # per half
    attn_half = norm + (2 * q + 2 * kv) * b + 4 * cfg.num_attention_heads + drop_attn
    mlp_half = norm + 4 * inter * b + drop_mlp
    # Backward of one half, while its saved tensors are still alive: the incoming gradient and the
    # block's output gradient (2 H b), the fp32 RMSNorm backward (3 x 4H), and the widest
    # intermediate gradients: SwiGLU's three (N, I) ones, or attention's dq, dk, dv and the gradient
    # of the SDPA output (2q + 2kv) b.
    grads = 2 * h * b + 12 * h + max(3 * inter, 2 * q + 2 * kv) * b
    if checkpointing:
        saved = L * 2 * h * b
        backward = max(attn_half, mlp_half) + grads
    else:
        saved = L * (attn_half + mlp_half)
        backward = grads
    # ember.train computes the LM loss in row chunks of one (chunk, V) fp32 block, never the whole (N, V) logits
    from ember.train.forward import LOSS_CHUNK_BYTES

    chunk_rows = min(n, max(8, LOSS_CHUNK_BYTES // (4 * V)))
    # Per logit: the fp32 block, its 16-bit matmul output / softmax copy (none in fp32), and with
    # several chunks the previous chunk's fp32 block (`logits = mm(...).float()` rebinds it only after).
    per_logit = 4 + (b if b < 4 else 0) + (4 if n > chunk_rows else 0)
    loss = n * (2 * h * b + norm) + chunk_rows * V * per_logit
    return n * saved + max(loss, n * backward)


# What glibc's heap keeps resident on top of the live tensors of a CPU training step. Each
# half-layer's temporaries (fp32 norm products, SwiGLU and attention intermediates, dropout copies)
# are freed between tensors that outlive them (saved activations, checkpoint inputs), and later,
# larger requests (the loss block, the next layer's (B*T, I) products) cannot reuse those holes, so
# the arena grows. Measured on the bench's training rows (bench/plan_accuracy.py, LoRA/QLoRA,
# hidden 768/1024, 12/24 layers, B*T 256-1024, with and without checkpointing): VmHWM with glibc's
# defaults minus VmHWM with MALLOC_MMAP_THRESHOLD_=131072 (which unmaps every freed block, so the
# peak is the live one) is 10-14 (B*T, H) blocks of the compute dtype per layer, checkpointed or not.
K_HEAP_HOLES = 11
# Blocks over glibc's mmap ceiling (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit) are mmapped and
# unmapped when freed: they leave no holes, so the term stops growing once a (B*T, H) block is larger.
GLIBC_MMAP_MAX = 32 * 2**20
# oneDNN's primitive cache and scratchpads after the first 16-bit training step on a CPU (heap in use
# after step 1 minus AdamW state and LoRA's casts: 18 MiB for both bench models; 0 with
# torch.backends.mkldnn.enabled = False).
ONEDNN_TRAIN_BYTES = 18 * 2**20


def cpu_training_heap_bytes(cfg: ModelConfig, batch: int, seq: int, dtype: str) -> tuple[float, float]:
    """(heap holes, oneDNN buffers): bytes a CPU training process holds beyond its live tensors.

    ``K_HEAP_HOLES * L * H * b * min(B*T, GLIBC_MMAP_MAX / (H * b))`` and ``ONEDNN_TRAIN_BYTES`` for
    16-bit compute (see the constants). Not for GPUs: the CUDA caching allocator is another story.
    """
    b = DTYPE_BYTES[dtype]
    h = cfg.hidden_size
    n = min(batch * seq, GLIBC_MMAP_MAX // (h * b))
    holes = K_HEAP_HOLES * cfg.num_hidden_layers * h * b * n
    return float(holes), float(ONEDNN_TRAIN_BYTES if b < 4 else 0)


@dataclass
class MemoryBreakdown:
    """Bytes, whole model (all nodes together)."""

    weights: float
    kv_cache: float
    activations: float
    training: float            # trainable parameters + gradients + optimizer states
    runtime: float             # per node, times the number of nodes
    load_transient: float = 0.0  # file pages mapped while casting at load: in peak RSS, reclaimable, not required
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """What must fit: everything but the reclaimable load transient."""
        return self.weights + self.kv_cache + self.activations + self.training + self.runtime

    @property
    def peak_rss(self) -> float:
        """What a process's peak RSS should show (CPU/unified): max of the load and the run."""
        load = self.weights + self.load_transient
        run = self.weights + self.kv_cache + self.activations + self.training
        return self.runtime + max(load, run)



def memory(cfg: ModelConfig, hw: Hardware, wl: Workload, checkpoint_dtype: str | None = None) -> MemoryBreakdown:
    """The memory breakdown of ``wl`` on ``hw`` (whole model; see the module docstring for the equations).

    Args:
        checkpoint_dtype: dtype of the weights on disk; when it differs from the compute dtype (or
            the weights are quantized at load), loading maps the whole file while converting.
    """
    b_name = wl.dtype
    full = wl.task == "tune" and wl.method == "full"
    wb = weight_bytes(cfg, "fp32" if full else b_name, wl.weight_quant, wl.head_quant)
    detail = {"weights.embedding": wb.embedding, "weights.lm_head": wb.lm_head, "weights.attention": wb.attention,
              "weights.recurrent": wb.recurrent, "weights.mlp": wb.mlp, "weights.experts": wb.experts, "weights.other": wb.other}
    kv_dt = wl.kv_dtype or wl.dtype
    training = 0.0
    if wl.task == "infer":
        kv = kv_cache_bytes(cfg, wl.context, wl.batch, kv_dt)
        chunk = wl.prompt_tokens if wl.prefill_chunk is None else min(wl.prefill_chunk, wl.prompt_tokens)
        act = prefill_activation_bytes(cfg, wl.batch * chunk, b_name) + wl.batch * cfg.vocab_size * (DTYPE_BYTES[b_name] + 4)
    else:
        kv = 0.0
        act = training_activation_bytes(cfg, wl.batch, wl.context, b_name, wl.grad_checkpointing,
                                        None if wl.method == "full" else wl.lora_targets)
        if wl.method == "full":
            # ember.train keeps fp32 master weights (so "weights" are fp32), fp32 gradients and AdamW
            # moments, and computes under bf16 autocast, which caches a 16-bit copy of each weight.
            p = cfg.num_parameters()
            grads, opt = p * 4, p * ADAM_BYTES
            training = grads + opt
            if b_name != "fp32":
                act += p * DTYPE_BYTES[b_name]
                detail["workspace.autocast_weights"] = p * DTYPE_BYTES[b_name]
            detail.update({"training.gradients": grads, "training.optimizer": opt})
        else:
            # fp32 A and B, their fp32 gradients, AdamW's two fp32 moments, and (16-bit compute) the
            # copies of A and B in the compute dtype that LoRALinear caches for the step's matmuls.
            n = lora_parameters(cfg, wl.lora_rank, wl.lora_targets)
            params, grads, opt = n * 4, n * 4, n * ADAM_BYTES
            cast = n * DTYPE_BYTES[b_name] if DTYPE_BYTES[b_name] != 4 else 0
            training = params + grads + opt + cast
            detail.update({"training.lora_params": params, "training.gradients": grads, "training.optimizer": opt,
                           "training.lora_cast": cast, "training.trainable_params": n})
    runtime = hw.runtime_bytes * hw.nodes
    if hw.calibration is not None and hw.calibration.context_bytes and not hw.unified:
        runtime = (hw.calibration.context_bytes) * hw.nodes
    if wl.task == "tune" and hw.device == "cpu":
        holes, onednn = cpu_training_heap_bytes(cfg, wl.batch, wl.context, b_name)
        act += holes + onednn
        detail.update({"workspace.heap_holes": holes, "workspace.onednn": onednn})
    q = wl.weight_quant
    if q != "none":
        # Quantizing while loading works through one chunk of rows at a time (fp32 copy, codes, scales).
        scratch = quant_load_scratch_bytes(cfg, q)
        detail["workspace.quant_load"] = scratch
        act = max(act, scratch)
    transient = 0.0
    if hw.device == "cpu" or hw.unified:
        # Casting at load maps (and so touches) the source file: its pages count in RSS until loading
        # ends; reclaimable, so not required. Quantized Linears are read with pread, never mapped.
        src = short_dtype(checkpoint_dtype) or short_dtype(cfg.torch_dtype)
        if src is not None and src != b_name:
            src_wb = weight_bytes(cfg, src, "none")
            transient = src_wb.total if q == "none" else src_wb.embedding + src_wb.other + (
                src_wb.lm_head if wl.head_quant == "none" else 0.0)
    return MemoryBreakdown(weights=wb.total, kv_cache=kv, activations=act, training=training, runtime=runtime,
                           load_transient=transient, detail=detail)

