"""The planner's inputs: what will be run (:class:`Workload`) and the formats and dtypes it prices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember.loading.mxfp4 import MIXED  # gpt-oss: MXFP4 experts, every other Linear int8

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTS = ("none", "int8", "int4", "nf4", "mxfp4", MIXED)
METHODS = ("lora", "qlora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quant_defaults() -> dict[str, Any]:
    """Group/block sizes and the LM head's default format of ``ember.quant`` (the planner follows the code)."""
    from ember.quant import DEFAULT_GROUP_SIZE, DEFAULT_LM_HEAD, DOUBLE_QUANT_BLOCK_SIZE, NF4_BLOCK_SIZE

    return {"int4_group": DEFAULT_GROUP_SIZE, "nf4_block": NF4_BLOCK_SIZE, "nf4_double_quant": True,
            "nf4_double_quant_block": DOUBLE_QUANT_BLOCK_SIZE, "lm_head": DEFAULT_LM_HEAD}


def kv_caps_window() -> bool:
    """Whether Ember's KV caches keep only a sliding window's slots (:attr:`ember.cache.StaticKVCache.caps_sliding_window`)."""
    from ember.cache import StaticKVCache

    return bool(getattr(StaticKVCache, "caps_sliding_window", False))


def short_dtype(name: str | None) -> str | None:
    """``torch.bfloat16``/``bfloat16``/``bf16`` -> ``bf16`` (likewise fp16, fp32); None when unknown."""
    if not name:
        return None
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
            "fp32": "fp32", "half": "fp16", "float": "fp32"}.get(str(name).lower().removeprefix("torch."))


def dtype_name(dtype) -> str:
    """:func:`short_dtype` that raises ValueError on an unknown dtype."""
    s = short_dtype(str(dtype))
    if s is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return s


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
        quant: weight format ``none``, ``int8``, ``int4``, ``nf4`` or ``mxfp4`` (gpt-oss: the experts only, as
            published; other families: every Linear), or ``mxfp4+int8`` (gpt-oss: MXFP4 experts, int8 elsewhere).
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
            return quant_defaults()["lm_head"]
        if self.lm_head == "same":
            return "int8" if self.weight_quant == MIXED else self.weight_quant
        return self.lm_head

    def label(self) -> str:
        if self.task == "tune":
            base = self.dtype if self.weight_quant == "none" else self.weight_quant
            return f"{self.method} ({base})"
        return self.dtype if self.quant == "none" else f"{self.quant} ({self.dtype})"

