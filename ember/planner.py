"""Planner: will it fit, and how fast? ``(ModelConfig, Hardware, Workload) -> Plan``, before a byte is allocated.

The model (every equation is here, and ``bench/plan_accuracy.py`` checks it against real runs):

**Weights.** Each ``nn.Linear`` of the decoder (attention, MLP, every expert) is stored as::

    none   out*in*b                                   (b = bytes of the compute dtype)
    int8   out*in + out*b                             (one scale per output channel)
    int4   out*in/2 + out*(in/g)*2*b                  (a scale and a zero per group of g, default 128)
    nf4    out*in/2 + out*in/64 * 1 + out*in/(64*256)*4 + 4   (block 64, absmax double-quantized to
                                                      8 bits with one fp32 scale per 256 blocks)
           or out*in/2 + out*in/64*4 without double quant

plus biases in the compute dtype. Embeddings, norms, MoE routers and (unless asked) the LM head stay
in the compute dtype. A tied LM head is the embedding, counted once.

**KV cache.** ``sum over layers of slots(layer) * batch * kv_heads * head_dim * 2 * kv_bytes`` with
``slots = context`` (a sliding-window layer is capped at its window when the cache supports it).

**Activations.** Inference peaks in prefill (one forward over the whole prompt, or one chunk of it):
``k_act * B*T * (2H + max(3I, 4q + 4kv)) * b`` (live hidden states plus the widest MLP or attention
temporaries; ``k_act`` covers allocator slack and was fitted on real runs), plus fp32 norm temporaries
``8 * B*T*H`` when ``b < 4``, plus the last-token logits. Training keeps, per token and layer, what
autograd saves (:func:`training_activation_bytes`): two fp32 RMSNorm inputs and normed outputs
``2*(4H + bH)``, attention ``(2q + 2kv)*b`` + fp32 log-sum-exp, SwiGLU ``4I*b`` and LoRA dropout's
int64 indices; with gradient checkpointing only ``2H*b`` (each half-layer's input) plus one half
rebuilt in backward; plus the larger of the chunked loss (one (chunk, V) fp32 block + its 16-bit copy,
and the previous chunk's fp32 block while the next is formed, ``hidden[keep]`` and its gradient) and
one half-layer's gradient buffers. That counts live tensors. On a CPU the process also holds what
glibc's heap cannot give back (:func:`cpu_training_heap_bytes`): the holes that the freed
temporaries of every half-layer leave between the tensors that outlive them, ``K_HEAP_HOLES * L * B*T
* H * b`` (while a (B*T, H) block is under glibc's 32 MiB mmap ceiling), and oneDNN's cached
primitives and scratchpads after the first 16-bit backward (``ONEDNN_TRAIN_BYTES``).

**Training state** (as ember.train keeps it). LoRA/QLoRA: ``r*(in+out)`` parameters per adapted
Linear, fp32, plus an fp32 gradient and AdamW's two fp32 moments: 16 bytes each (+ a 16-bit copy of A
and B for 16-bit compute), over a frozen base in the compute dtype (NF4 for QLoRA). Full fine-tuning: fp32 weights + fp32 gradients + fp32 AdamW
moments = 16 bytes per parameter, plus the 16-bit weight copies autocast caches.

**Runtime.** A fresh Ember process (torch, CUDA context) measured by ``ember hw --measure``.

**Decode speed.** One step for ``B`` sequences reads every non-expert weight once, the experts that
any of the B tokens is routed to (``E * (1 - (1 - k/E)^B)`` of ``E`` per MoE layer), and each
sequence's KV cache. ``t_mem = bytes / achieved bandwidth``, where achieved bandwidth is the measured
streaming rate of Ember's kernel at that working-set size (or ``peak x decode_efficiency`` for a
named profile); with quantized weights the projections stream at the quantized kernel's rate and
the 16-bit head, embedding row and norms at the compute dtype's, ``t_flop = 2 * active params * B / (peak FLOP/s x efficiency)``, and the dispatch
``t_disp = step + L * layer + (expert calls) * expert``. On CPU the three add up
(``max(t_mem, t_flop) + t_disp``: ops run one after another on the same cores); on a GPU dispatch
overlaps the device's work (``max(t_mem, t_flop, t_disp)``). ``tok/s per sequence = 1 / t_step``.
Several nodes (``2xdgx-spark``) split the layers (pipeline): memory adds up, a single stream's
speed does not, and each hop adds the interconnect latency.

**Prefill speed** comes from FLOPs: ``2 * active params * tokens`` (+ causal attention ``2 * L *
T^2 * q`` per sequence) over ``peak FLOP/s x compute_efficiency``.

**Training speed** comes from FLOPs too (:func:`train_flops_per_token`), per token: forward ``2P``
(P = active Linear parameters, LM head included) + causal attention ``2*T*q*L``; backward ``2P`` for
the input gradients and (full fine-tuning) ``2P`` more for the weight gradients, attention twice its
forward; LoRA adds ``6 r (in + out)`` per adapter (forward 2, backward 4); gradient checkpointing
runs the layers' forward again (for LoRA without the o_proj/down_proj base products, which its
recompute never reaches, and never the LM head). Over ``peak FLOP/s x training efficiency``, the
efficiency being what real LoRA steps of synthetic models achieved on this machine (``ember hw
--measure``, interpolated on the hidden size), else ``compute_efficiency``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.config import ModelConfig
from ember.errors import InsufficientMemoryError
from ember.hardware import GiB, Hardware

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTS = ("none", "int8", "int4", "nf4")
METHODS = ("lora", "qlora", "full")

# Allocator slack and temporaries on top of the live-tensor count in prefill, fitted on this repo's
# CPU runs (bench/plan_accuracy.py; 1.6-2.8 observed, glibc keeps freed chunks in its arenas).
K_ACT = 2.2
# AdamW keeps two fp32 moments per trainable parameter.
ADAM_BYTES = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quant_defaults() -> dict[str, Any]:
    """Group/block sizes of ember.quant when it is installed (so the planner follows the code), else ours."""
    out = {"int4_group": 128, "nf4_block": 64, "nf4_double_quant": True, "nf4_double_quant_block": 256,
           "lm_head": "int8"}
    try:  # pragma: no cover - depends on the quant package landing
        import ember.quant as q

        out["int4_group"] = int(getattr(q, "INT4_GROUP_SIZE", getattr(q, "DEFAULT_GROUP_SIZE", out["int4_group"])))
        out["nf4_block"] = int(getattr(q, "NF4_BLOCK_SIZE", out["nf4_block"]))
        out["nf4_double_quant_block"] = int(getattr(q, "DOUBLE_QUANT_BLOCK_SIZE", 256))
        out["lm_head"] = str(getattr(q, "DEFAULT_LM_HEAD", out["lm_head"]))
    except ImportError:
        pass
    return out


def _kv_caps_window() -> bool:
    """Whether Ember's KV caches keep only a sliding window's slots (they allocate the full context today)."""
    try:
        from ember.cache import StaticKVCache

        return bool(getattr(StaticKVCache, "caps_sliding_window", False))
    except ImportError:  # pragma: no cover
        return False


# ====================================================================== inputs


@dataclass(frozen=True)
class Workload:
    """What will be run.

    Attributes:
        task: ``infer`` or ``tune``.
        context: tokens per sequence: prompt + generated (infer) or the training sequence length (tune).
        batch: sequences at once (infer) or the micro-batch (tune).
        prompt: prefill tokens; default ``context`` (worst case: a prompt that fills the context).
        prefill_chunk: tokens per prefill forward (the server chunks; ``ember generate`` does not: None).
        dtype: compute dtype ``bf16``, ``fp16`` or ``fp32``.
        quant: weight format ``none``, ``int8``, ``int4`` or ``nf4``.
        kv_dtype: KV cache dtype (default: ``dtype``).
        method: tune only: ``lora``, ``qlora`` (LoRA over an NF4 base) or ``full``.
        lora_rank: LoRA rank r.
        lora_targets: Linear names adapted (suffixes, PEFT-style; experts' projections match too).
        grad_checkpointing: recompute each layer in backward instead of keeping its activations.
        lm_head: the LM head's format: ``auto`` (what the loader does: int8 under ``quant``, the compute
            dtype otherwise and when tuning), ``none``, ``same`` (as ``quant``), ``int8``, ``int4``, ``nf4``.
    """

    task: str = "infer"
    context: int = 4096
    batch: int = 1
    prompt: int | None = None
    prefill_chunk: int | None = None
    dtype: str = "bf16"
    quant: str = "none"
    kv_dtype: str | None = None
    method: str = "lora"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    grad_checkpointing: bool = True
    lm_head: str = "auto"

    def __post_init__(self) -> None:
        if self.task not in ("infer", "tune"):
            raise ValueError(f"task must be 'infer' or 'tune', got {self.task!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lm_head not in ("auto", "same") + QUANTS:
            raise ValueError(f"lm_head must be auto, same or one of {', '.join(QUANTS)}, got {self.lm_head!r}")
        if self.context < 1 or self.batch < 1:
            raise ValueError("context and batch must be >= 1")

    @property
    def prompt_tokens(self) -> int:
        return min(self.context, self.prompt if self.prompt is not None else self.context)

    @property
    def weight_quant(self) -> str:
        """The base weights' format: QLoRA means NF4 whatever ``quant`` says."""
        if self.task == "tune" and self.method == "qlora":
            return "nf4"
        if self.task == "tune" and self.method == "full":
            return "none"
        return self.quant

    @property
    def head_quant(self) -> str:
        """The LM head's format (see ``lm_head``); training keeps the head in the compute dtype."""
        if self.task == "tune" or self.weight_quant == "none":
            return "none"
        if self.lm_head == "auto":
            return _quant_defaults()["lm_head"]
        return self.weight_quant if self.lm_head == "same" else self.lm_head

    def label(self) -> str:
        if self.task == "tune":
            base = self.dtype if self.weight_quant == "none" else self.weight_quant
            return f"{self.method} ({base})"
        return self.dtype if self.quant == "none" else f"{self.quant} ({self.dtype})"


# ====================================================================== memory pieces


def linear_bytes(out_f: int, in_f: int, quant: str, b: int, qd: dict[str, Any] | None = None) -> float:
    """Bytes of one weight matrix (out_f, in_f) stored as ``quant`` with compute dtype of ``b`` bytes."""
    qd = qd or _quant_defaults()
    n = out_f * in_f
    if quant == "none":
        return n * b
    if quant == "int8":
        return n + out_f * b
    if quant == "int4":
        g = qd["int4_group"]
        return n / 2 + out_f * math.ceil(in_f / g) * 2 * b
    if quant == "nf4":
        blocks = math.ceil(n / qd["nf4_block"])
        if qd["nf4_double_quant"]:
            return n / 2 + blocks + math.ceil(blocks / qd["nf4_double_quant_block"]) * 4 + 4
        return n / 2 + blocks * 4
    raise ValueError(f"unknown quant {quant!r}")


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
    other: float              # norms, routers, biases
    moe_layers: int = 0
    experts_per_layer: int = 0
    experts_per_tok: int = 0
    linear_params_active: float = 0.0   # multiply-adds per token in Linear layers (FLOPs = 2x)

    @property
    def total(self) -> float:
        return self.embedding + self.lm_head + self.attention + self.mlp + self.experts + self.other

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
        return head + emb + self.attention + self.mlp + self.other + experts


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", quant: str = "none", lm_head: str = "none") -> WeightBytes:
    """Bytes of every weight of ``cfg`` in compute ``dtype`` with Linear layers stored as ``quant``, an untied
    LM head as ``lm_head``."""
    b = DTYPE_BYTES[dtype]
    qd = _quant_defaults()
    parts = {"attention": 0.0, "mlp": 0.0, "experts": 0.0, "lm_head": 0.0}
    bias_bytes = 0.0
    active = 0.0
    for lin in linears(cfg):
        q = quant if lin.kind != "lm_head" else lm_head
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
    active += routers
    return WeightBytes(
        embedding=cfg.vocab_size * h * b, lm_head=parts["lm_head"], attention=parts["attention"], mlp=parts["mlp"],
        experts=parts["experts"], other=(norms + routers) * b + bias_bytes, moe_layers=moe_layers,
        experts_per_layer=cfg.num_local_experts, experts_per_tok=cfg.num_experts_per_tok,
        linear_params_active=active + (cfg.vocab_size * h if cfg.tie_word_embeddings else 0),
    )


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16",
                   cap_window: bool | None = None) -> int:
    """KV cache bytes: layers x kv heads x head dim x slots x batch x 2 (k and v) x dtype bytes.

    Args:
        cap_window: keep only ``sliding_window`` slots in windowed layers; default: what Ember's
            cache does (today it allocates the full context in every layer).
    """
    if cap_window is None:
        cap_window = _kv_caps_window()
    if cfg.kv_lora_rank:  # multi-head latent attention caches one latent per token (ember.cache's "latent" kind)
        return batch * cfg.num_hidden_layers * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * DTYPE_BYTES[dtype]
    per_slot = cfg.num_key_value_heads * cfg.head_dim * 2 * DTYPE_BYTES[dtype]
    total = 0
    for layer in range(cfg.num_hidden_layers):
        w = cfg.layer_window(layer) if cap_window else None
        total += (min(context, w) if w else context) * per_slot
    return total * batch


def prefill_activation_bytes(cfg: ModelConfig, tokens: int, dtype: str = "bf16") -> float:
    """Peak transient bytes of one inference forward over ``tokens`` (= B x T) tokens."""
    b = DTYPE_BYTES[dtype]
    h = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    if cfg.num_local_experts:
        # MoE: tokens gathered in expert order (k*H), the output (H), the router's fp32 products
        # (2*k*H in 16-bit units), and the busiest expert's SwiGLU (~2x its fair share of tokens).
        e, k, im = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        per_expert = min(1.0, 2.0 * k / e)
        mlp = (3 * k + 2) * h + 3 * im * per_expert
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
QUANT_SCRATCH_PER_ELEMENT = {"int8": 7.2, "int4": 8.1, "nf4": 12.9}


def quant_load_scratch_bytes(cfg: ModelConfig, quant: str) -> float:
    """Peak temporaries of quantizing one weight chunk while loading (``ember.quant``'s chunk of rows)."""
    try:
        from ember.quant.base import QUANT_CHUNK_ELEMENTS as chunk
    except ImportError:  # pragma: no cover - before the quant package
        chunk = 1 << 24
    largest = max(lin.out_f * lin.in_f for lin in linears(cfg) if lin.kind != "lm_head")
    return min(largest, chunk) * QUANT_SCRATCH_PER_ELEMENT[quant]


def lora_parameters(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Trainable LoRA parameters: r x (in + out) for every Linear whose name is in ``targets``."""
    return sum(lin.count * rank * (lin.in_f + lin.out_f) for lin in linears(cfg) if lin.name in targets)


# ember.train computes the LM loss in row chunks of one ~32 MiB fp32 (chunk, V) block, never the whole
# (N, V) logits (ember.train.forward.LOSS_CHUNK_BYTES; this copy is used before that package exists).
LOSS_CHUNK_BYTES = 32 * 2**20
# ``ember tune``'s LoRA dropout (its default): dropout keeps the int64 indices of the dropped inputs.
LORA_DROPOUT = 0.05


def _loss_chunk_bytes() -> int:
    try:
        from ember.train.forward import LOSS_CHUNK_BYTES as chunk
    except ImportError:  # pragma: no cover - before the train package
        chunk = LOSS_CHUNK_BYTES
    return chunk


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
    chunk_rows = min(n, max(8, _loss_chunk_bytes() // (4 * V)))
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


# ====================================================================== the plan


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


@dataclass
class Plan:
    """One option (precision/quant/method) for one model on one machine and workload."""

    model: str
    hardware: Hardware
    workload: Workload
    memory: MemoryBreakdown
    available: float                  # bytes usable, all nodes
    fits: bool
    max_context: int                  # at this batch (0: not even one token)
    max_batch: int                    # at this context
    decode_tok_s: float               # per sequence, at the end of the context
    decode_tok_s_start: float         # per sequence, with an empty KV cache
    prefill_tok_s: float
    train_tok_s: float | None
    bytes_per_step: float             # weights + KV read by one decode step (whole batch), end of context
    roofline_tok_s: float             # peak bandwidth / bytes per step (per sequence)
    params: int
    active_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.workload.label()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes and tok/s as numbers)."""
        m = self.memory
        return {
            "model": self.model, "option": self.label, "hardware": self.hardware.name, "nodes": self.hardware.nodes,
            "workload": asdict(self.workload), "fits": self.fits,
            "memory_bytes": {"weights": m.weights, "kv_cache": m.kv_cache, "activations": m.activations,
                             "training": m.training, "runtime": m.runtime, "total": m.total,
                             "peak_rss": m.peak_rss, "detail": m.detail},
            "available_bytes": self.available, "max_context": self.max_context, "max_batch": self.max_batch,
            "decode_tok_s": self.decode_tok_s, "decode_tok_s_start": self.decode_tok_s_start,
            "prefill_tok_s": self.prefill_tok_s, "train_tok_s": self.train_tok_s,
            "bytes_per_step": self.bytes_per_step, "roofline_tok_s": self.roofline_tok_s,
            "params": self.params, "active_params": self.active_params, "notes": self.notes,
        }


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
              "weights.mlp": wb.mlp, "weights.experts": wb.experts, "weights.other": wb.other}
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
        src = _short_dtype(checkpoint_dtype) or _short_dtype(cfg.torch_dtype)
        if src is not None and src != b_name:
            src_wb = weight_bytes(cfg, src, "none")
            transient = src_wb.total if q == "none" else src_wb.embedding + src_wb.other + (
                src_wb.lm_head if wl.head_quant == "none" else 0.0)
    return MemoryBreakdown(weights=wb.total, kv_cache=kv, activations=act, training=training, runtime=runtime,
                           load_transient=transient, detail=detail)


def _short_dtype(name: str | None) -> str | None:
    if not name:
        return None
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
            "fp32": "fp32", "half": "fp16", "float": "fp32"}.get(str(name).lower().removeprefix("torch."))


def _kernel(wl: Workload, rows: int) -> str:
    path = "mv" if rows == 1 else "mm"
    q = wl.weight_quant
    return f"{path}-{wl.dtype}" if q == "none" else f"{path}-{q}"


def decode_step_seconds(cfg: ModelConfig, hw: Hardware, wl: Workload, kv_len: int) -> tuple[float, float]:
    """(seconds per decode step for ``wl.batch`` sequences with ``kv_len`` cached tokens each, bytes read)."""
    B = wl.batch
    b = DTYPE_BYTES[wl.dtype]
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    w_read = wb.read_per_step(B, cfg.hidden_size * b)
    kv_read = kv_cache_bytes(cfg, max(kv_len, 1), B, wl.kv_dtype or wl.dtype)
    working_set = wb.total + kv_read
    bw = hw.stream_bandwidth(_kernel(wl, B), working_set, fallback=f"{'mv' if B == 1 else 'mm'}-{wl.dtype}",
                             hidden=cfg.hidden_size)
    kv_bw = hw.stream_bandwidth(f"mv-{wl.kv_dtype or wl.dtype}", working_set)
    t_w = w_read / bw
    if wl.weight_quant != "none":
        # The quantized kernels stream the projections; the head (unless quantized), the embedding row
        # and the norms stay in the compute dtype and stream at its rate (for a small model the 16-bit
        # head can be half of what a step reads); a head in another format streams at that kernel's rate.
        path = "mv" if B == 1 else "mm"
        head = wb.lm_head if wb.lm_head else wb.embedding
        head_q = wl.head_quant if wb.lm_head else "none"
        float_read = wb.other + (head if head_q == "none" else 0.0)
        float_read += min(wb.embedding, B * cfg.hidden_size * b) if wb.lm_head else 0.0
        float_read = min(float_read, w_read)
        head_read = head if head_q not in ("none", wl.weight_quant) else 0.0
        bw_float = hw.stream_bandwidth(f"{path}-{wl.dtype}", working_set, hidden=cfg.hidden_size)
        bw_head = hw.stream_bandwidth(f"{path}-{head_q}", working_set, fallback=f"{path}-{wl.dtype}",
                                      hidden=cfg.hidden_size) if head_read else bw
        t_w = (w_read - float_read - head_read) / bw + float_read / bw_float + head_read / bw_head
    t_mem = t_w + kv_read / kv_bw
    flops = 2 * wb.linear_params_active * B + 4 * B * kv_len * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    t_flop = flops / (hw.peak_flops(wl.dtype) * hw.compute_efficiency)
    step, layer, expert = hw.overheads(wl.dtype)
    calls = wb.moe_layers * (cfg.num_experts_per_tok if B == 1 else wb.experts_touched(B))
    t_disp = step + cfg.num_hidden_layers * layer + calls * expert
    hops = (hw.nodes - 1) * (hw.interconnect_latency_s + (B * cfg.hidden_size * b / hw.interconnect_bandwidth
                                                           if hw.interconnect_bandwidth else 0.0))
    if hw.device == "cpu":
        t = max(t_mem, t_flop) + t_disp
    else:
        t = max(t_mem, t_flop, t_disp)
    return t + hops, w_read + kv_read


def prefill_seconds(cfg: ModelConfig, hw: Hardware, wl: Workload, tokens: int | None = None) -> float:
    """Seconds to prefill ``tokens`` prompt tokens per sequence for the batch (one forward, or chunks)."""
    T = tokens if tokens is not None else wl.prompt_tokens
    B = wl.batch
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    flops = 2 * wb.linear_params_active * B * T + 2 * B * T * T * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    flops -= 2 * B * (T - 1) * cfg.vocab_size * cfg.hidden_size  # the LM head runs on the last token only
    t_flop = flops / (hw.peak_flops(wl.dtype) * hw.compute_efficiency)
    chunks = 1 if wl.prefill_chunk is None else math.ceil(T / wl.prefill_chunk)
    w_read = wb.read_per_step(B * min(T, wl.prefill_chunk or T), cfg.hidden_size * DTYPE_BYTES[wl.dtype]) * chunks
    t_mem = w_read / hw.stream_bandwidth(_kernel(wl, 4), wb.total, fallback=f"mm-{wl.dtype}", hidden=cfg.hidden_size)
    step, layer, expert = hw.overheads(wl.dtype)
    t_disp = chunks * (step + cfg.num_hidden_layers * layer + wb.moe_layers * wb.experts_touched(B * T) * expert)
    return max(t_flop, t_mem) + (t_disp if hw.device == "cpu" else 0.0)


def train_flops_per_token(cfg: ModelConfig, wl: Workload) -> float:
    """FLOPs of one training token (forward, backward, optimizer-free), as ember.train runs them.

    Per token, with P the active Linear parameters (LM head included), ``attn = 2*T*q*L`` the
    causal attention products of the forward and n the LoRA parameters:

        LoRA/QLoRA   forward 2P + attn, backward 2P (input gradients through the frozen base;
                     the fused loss forms d/dh with one more (V, H) product) + 2 attn, adapters
                     6n (forward 2, backward 4: A's and B's gradients and the input's)
        full         3 (2P + attn): backward for activations and weights
        checkpoint   + the layers' forward again: 2 (P - head) + attn (+ 2n), for LoRA less the
                     o_proj/down_proj base products (the recompute stops at the last saved
                     tensor, their adapters' input)
    """
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant)
    p = wb.linear_params_active
    head = cfg.vocab_size * cfg.hidden_size
    attn = 2 * wl.context * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    if wl.method == "full":
        per_token = 3 * (2 * p + attn)
        recompute = 2 * (p - head) + attn
    else:
        n = lora_parameters(cfg, wl.lora_rank, wl.lora_targets)
        per_token = 4 * p + 3 * attn + 6 * n
        skipped = sum(lin.count * lin.out_f * lin.in_f for lin in linears(cfg) if lin.name in wl.lora_targets
                      and (lin.name == "o_proj" or (lin.kind == "mlp" and lin.name == "down_proj")))
        recompute = 2 * (p - head - skipped) + attn + 2 * n
    return per_token + (recompute if wl.grad_checkpointing else 0)


def train_tokens_per_second(cfg: ModelConfig, hw: Hardware, wl: Workload) -> float:
    """Training tokens/s: ``peak FLOP/s x training efficiency / FLOPs per token``.

    The efficiency is the fraction of the matmul rate that real LoRA (for QLoRA: QLoRA) steps reached
    when ``ember hw --measure`` timed them (at this model's hidden size, interpolated), else
    ``compute_efficiency``.
    """
    eff = hw.train_efficiency(wl.dtype, cfg.hidden_size, "qlora" if wl.method == "qlora" else "lora")
    return hw.peak_flops(wl.dtype) * eff / train_flops_per_token(cfg, wl)


def plan(cfg: ModelConfig, hw: Hardware, wl: Workload, model: str = "", max_memory: float | None = None,
         checkpoint_dtype: str | None = None, in_process: bool = False) -> Plan:
    """Plan ``wl`` for ``cfg`` on ``hw``.

    Args:
        model: a name for messages and tables.
        max_memory: cap on usable bytes per node (``--max-memory``), applied on top of the hardware's.
        checkpoint_dtype: on-disk dtype (``bf16``...) when known; drives the load transient.
        in_process: the caller *is* the Ember process, so its runtime memory is already in use
            (not in ``available``) and is not counted again.
    Returns:
        the :class:`Plan`.
    """
    mem = memory(cfg, hw, wl, checkpoint_dtype)
    if in_process:
        mem.runtime = 0.0
    usable = hw.usable_bytes if max_memory is None else min(hw.usable_bytes, max_memory)
    available = usable * hw.nodes
    need_per_node = mem.total / hw.nodes + _granularity(cfg, wl, hw)
    fits = need_per_node <= usable
    notes: list[str] = []
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)

    def need(context: int, batch: int) -> float:
        m = memory(cfg, hw, replace(wl, context=context, batch=batch, prompt=None if wl.prompt is None else min(wl.prompt, context)),
                   checkpoint_dtype)
        if in_process:
            m.runtime = 0.0
        return m.total / hw.nodes + _granularity(cfg, wl, hw)

    max_ctx = _largest(lambda c: need(c, wl.batch) <= usable, cfg.max_position_embeddings)
    max_batch = _largest(lambda bb: need(wl.context, bb) <= usable, 4096)

    t_end, bytes_end = decode_step_seconds(cfg, hw, wl, wl.context)
    t_start, _ = decode_step_seconds(cfg, hw, wl, 1)
    roof = hw.bandwidth / bytes_end
    prefill = wl.batch * wl.prompt_tokens / prefill_seconds(cfg, hw, wl)
    train = train_tokens_per_second(cfg, hw, wl) if wl.task == "tune" else None
    if wl.task == "infer" and wl.context > cfg.max_position_embeddings:
        notes.append(f"context {wl.context} exceeds the model's {cfg.max_position_embeddings}")
    if hw.nodes > 1:
        notes.append(f"layers split over {hw.nodes} nodes (pipeline): memory adds up, one stream's speed does not")
    if wl.weight_quant != "none" and hw.calibration is not None and hw.calibration.bandwidth(_kernel(wl, 1), 1) is None:
        notes.append(f"{wl.weight_quant} kernels not measured on this machine: speed assumes {wl.dtype} streaming rates")
    if not hw.measured and hw.device == "cpu":
        notes.append("bandwidth/FLOP/s are guesses: run `ember hw --measure`")
    for n in hw.notes:
        notes.append(n)
    return Plan(model=model, hardware=hw, workload=wl, memory=mem, available=available, fits=fits,
                max_context=max_ctx, max_batch=max_batch, decode_tok_s=1 / t_end, decode_tok_s_start=1 / t_start,
                prefill_tok_s=prefill, train_tok_s=train, bytes_per_step=bytes_end, roofline_tok_s=roof,
                params=cfg.num_parameters(), active_params=cfg.active_parameters(), notes=notes)


def _granularity(cfg: ModelConfig, wl: Workload, hw: Hardware) -> float:
    """Split imbalance across nodes: layers are whole, so one node may hold one layer more than its share."""
    if hw.nodes == 1:
        return 0.0
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    per_layer = (wb.attention + wb.mlp + wb.experts) / cfg.num_hidden_layers
    return per_layer + max(wb.embedding, wb.lm_head) / 2


def _largest(ok, upper: int) -> int:
    """Largest n in [1, upper] with ok(n) (ok monotone decreasing); 0 if none."""
    if not ok(1):
        return 0
    lo, hi = 1, upper
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ====================================================================== options and advice


def options(cfg: ModelConfig, hw: Hardware, wl: Workload, model: str = "", max_memory: float | None = None,
            checkpoint_dtype: str | None = None, quants: tuple[str, ...] | None = None,
            methods: tuple[str, ...] | None = None, in_process: bool = False) -> list[Plan]:
    """The alternatives worth showing: every weight format for inference, every method for tuning."""
    plans = []
    if wl.task == "infer":
        for q in quants or QUANTS:
            plans.append(plan(cfg, hw, replace(wl, quant=q), model, max_memory, checkpoint_dtype, in_process))
    else:
        for m in methods or METHODS:
            plans.append(plan(cfg, hw, replace(wl, method=m), model, max_memory, checkpoint_dtype, in_process))
    return plans


# Quality order (best first): what to prefer when several options fit.
_QUALITY = {"none": 0, "int8": 1, "int4": 2, "nf4": 3}
_METHOD_QUALITY = {"full": 0, "lora": 1, "qlora": 2}


def recommend(plans: list[Plan], headroom: float = 0.9) -> Plan | None:
    """The highest-quality option that fits with ``1 - headroom`` spare; else the smallest that fits at all."""
    def quality(p: Plan) -> tuple:
        wl = p.workload
        if wl.task == "tune":
            return (_METHOD_QUALITY[wl.method],)
        return (_QUALITY[wl.quant],)

    roomy = [p for p in plans if p.fits and p.memory.total / p.hardware.nodes <= headroom * p.available / p.hardware.nodes]
    if roomy:
        return min(roomy, key=quality)
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: p.memory.total) if fitting else None


def explain(p: Plan) -> str:
    """One line on why a plan was recommended (or what would fit)."""
    wl = p.workload
    gib = p.memory.total / GiB
    if wl.task == "tune":
        return (f"{p.label}: {gib:.1f} GiB of {p.available / GiB:.1f} GiB, ~{p.train_tok_s:,.0f} training tok/s")
    return (f"{p.label}: {gib:.1f} GiB of {p.available / GiB:.1f} GiB, decode ~{p.decode_tok_s_start:.1f} tok/s "
            f"(~{p.decode_tok_s:.1f} at {wl.context} tokens), max context {p.max_context:,} at batch {wl.batch}")


# ====================================================================== used by the engine


def _dtype_name(dtype) -> str:
    s = _short_dtype(str(dtype))
    if s is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return s


def check_fits(cfg: ModelConfig, device, dtype, quant: str | None = None, context: int | None = None,
               batch: int = 1, max_memory: float | None = None, task: str = "infer", method: str = "lora",
               checkpoint_dtype: str | None = None, hardware: Hardware | None = None, lm_head: str | None = "auto") -> Plan:
    """Stop before allocating if the model will not fit; say what would.

    Call it in the process that is about to load (its runtime memory is already in use, so only the
    model's own memory is compared with what is free now).

    Args:
        cfg: the model.
        device: ``cpu``, ``cuda``, ``cuda:N`` or a torch.device.
        dtype: compute dtype (``bf16``, ``torch.bfloat16``, ...).
        quant: ``none``/None, ``int8``, ``int4``, ``nf4``.
        context: tokens per sequence (default: the model's max_position_embeddings).
        batch: sequences at once.
        max_memory: cap in GiB (``--max-memory``).
        task / method: ``tune`` with ``lora``/``qlora``/``full`` for fine-tuning.
        hardware: override detection (tests).
        lm_head: the LM head's format under ``quant`` (:attr:`Workload.lm_head`; None = ``none``).
    Returns:
        the :class:`Plan` when it fits.
    Raises:
        InsufficientMemoryError: "needs 41.2 GiB, 23.1 GiB available; int4 needs 11.0 GiB".
    """
    from ember.hardware import detect

    dev = str(device)
    hw = hardware or detect(dev if dev != "cuda" else "cuda:0")
    wl = Workload(task=task, context=context or cfg.max_position_embeddings, batch=batch, dtype=_dtype_name(dtype),
                  quant=quant or "none", method=method, lm_head=lm_head or "none")
    cap = None if max_memory is None else max_memory * GiB
    p = plan(cfg, hw, wl, max_memory=cap, checkpoint_dtype=checkpoint_dtype, in_process=True)
    if p.fits:
        return p
    raise InsufficientMemoryError(_does_not_fit_message(cfg, hw, wl, p, cap, checkpoint_dtype))


def _does_not_fit_message(cfg: ModelConfig, hw: Hardware, wl: Workload, p: Plan, cap: float | None,
                          checkpoint_dtype: str | None) -> str:
    usable = p.available / hw.nodes
    what = "--max-memory" if cap is not None and cap < hw.usable_bytes else "available"
    msg = (f"{wl.label()} needs {p.memory.total / GiB:.1f} GiB (weights {p.memory.weights / GiB:.1f}, "
           f"KV cache {p.memory.kv_cache / GiB:.1f} for {wl.batch} x {wl.context} tokens, "
           f"activations {p.memory.activations / GiB:.1f}"
           + (f", training {p.memory.training / GiB:.1f}" if p.memory.training else "")
           + f"), {usable / GiB:.1f} GiB {what}")
    alts = [a for a in options(cfg, hw, wl, max_memory=cap, checkpoint_dtype=checkpoint_dtype, in_process=True)
            if a.workload != wl]
    fitting = [a for a in alts if a.fits]
    if fitting:
        best = recommend(fitting) or fitting[0]
        msg += f"; {best.label} needs {best.memory.total / GiB:.1f} GiB"
    elif p.max_context > 0:
        msg += f"; at most {p.max_context:,} tokens of context fit at batch {wl.batch} (--context)"
    else:
        smallest = min(alts + [p], key=lambda a: a.memory.weights)
        msg += (f"; nothing fits: even {smallest.label} weights take {smallest.memory.weights / GiB:.1f} GiB"
                if smallest.memory.weights > usable else
                f"; {smallest.label} fits with at most {smallest.max_context:,} tokens of context")
    return msg


def kv_budget_bytes(cfg: ModelConfig, device, dtype, quant: str | None = None, max_batch: int = 16,
                    prefill_chunk: int = 256, max_memory: float | None = None, loaded: bool = True,
                    safety: float = 0.9, hardware: Hardware | None = None) -> int:
    """Bytes a server may give its paged KV pool on ``device``.

    ``safety x (free memory now) - prefill activations for one chunk - decode logits``, minus the
    weights when they are not loaded yet (``loaded=False``).

    Args:
        max_memory: cap in GiB on everything the process may use on the device.
    """
    from ember.hardware import detect

    dev = str(device)
    hw = hardware or detect(dev if dev != "cuda" else "cuda:0")
    d = _dtype_name(dtype)
    free = hw.usable_bytes
    if max_memory is not None:
        free = min(free, max_memory * GiB)
    act = prefill_activation_bytes(cfg, prefill_chunk, d) + max_batch * cfg.vocab_size * (DTYPE_BYTES[d] + 4)
    weights = 0.0 if loaded else weight_bytes(cfg, d, quant or "none").total
    return max(0, int(safety * free - act - weights))


DEFAULT_CONTEXT = 4096  # what a load plans for when the caller does not say (capped at the model's own limit)


def preflight(path, device, dtype="auto", quant: str | None = None, context: int | None = None, batch: int = 1,
              max_memory: float | None = None, task: str = "infer", method: str = "lora",
              lm_head: str | None = "auto") -> Plan | None:
    """The check ``ember.load`` (and so generate/chat/serve/tune) runs before allocating anything.

    Reads only the model's config (HF folder or GGUF header), resolves ``dtype`` as the loader will,
    and calls :func:`check_fits`. A folder written by ``ember quantize`` is planned at its stored
    quantization.

    Args:
        path: HF checkpoint folder or ``.gguf`` file.
        context: tokens per sequence to plan for (default min(model limit, :data:`DEFAULT_CONTEXT`)).
    Returns:
        the plan, or None when ``path`` cannot be planned (missing, malformed): the loader then
        reports that problem with its own file- and field-located message.
    Raises:
        InsufficientMemoryError: with what would fit.
    """
    import torch

    from ember.errors import EmberError
    from ember.loading import DTYPE_NAMES, resolve_dtype
    from ember.plan_cli import resolve_model

    p = Path(path)
    if not ((p.is_dir() and (p / "config.json").is_file()) or p.is_file()):
        return None
    try:
        resolved = resolve_model(str(p))
    except (EmberError, OSError, ValueError):
        return None
    cfg = resolved.config
    section = cfg.extra.get("quantization") if isinstance(cfg.extra, dict) else None
    if isinstance(section, dict) and section.get("method") in ("int8", "int4", "nf4"):
        quant = section["method"]
        from ember.quant.quantize import section_lm_head

        head = section_lm_head(section)
        lm_head = head if head in QUANTS else "none"
    ckpt = DTYPE_NAMES.get(resolved.checkpoint_dtype or "", torch.bfloat16)
    dev = torch.device(device)
    dt = resolve_dtype(dtype, ckpt, dev)
    if context is None:
        context = min(cfg.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    return check_fits(cfg, dev, dt, quant=quant, context=context, batch=batch, max_memory=max_memory, task=task,
                      method=method, checkpoint_dtype=resolved.checkpoint_dtype, lm_head=lm_head)
