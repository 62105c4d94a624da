"""Planner: will it fit, and how fast? ``(ModelConfig, Hardware, Workload) -> Plan``, before a byte is allocated.

The equations (weights, KV cache, activations, training state, decode/prefill/training speed) are
written out in docs/planner.md; ``bench/plan_accuracy.py`` checks them against real runs.

    workload.py   the inputs: :class:`Workload`, dtypes and weight formats priced
    memory.py     bytes: weights, KV cache, activations, training state -> :class:`MemoryBreakdown`
    speed.py      seconds: decode step, prefill, training tokens/s from bytes streamed and FLOPs
    fit.py        the decision: :class:`Plan`, max context/batch, options, recommendation
    offload.py    the option of running with weights read from disk: :class:`OffloadPlan`
    source.py     what MODEL names: HF folder, GGUF file or catalog entry -> config (no weights read)
    preflight.py  the checks the loader and server run: fit check, KV-pool budget and block count
"""

from ember.planner.fit import Plan, explain, options, plan, quant_quality, recommend
from ember.planner.memory import (
    ADAM_BYTES, GLIBC_MMAP_MAX, K_ACT, K_HEAP_HOLES, LORA_DROPOUT, ONEDNN_TRAIN_BYTES, QUANT_SCRATCH_PER_ELEMENT,
    MemoryBreakdown, WeightBytes, cpu_training_heap_bytes, kv_cache_bytes, linear_bytes, linears, lora_parameters,
    memory, prefill_activation_bytes, quant_load_scratch_bytes, training_activation_bytes, weight_bytes,
)
from ember.planner.offload import DEFAULT_DISK_BANDWIDTH, OffloadPlan, disk_bandwidth, offload_plan
from ember.planner.preflight import (
    DEFAULT_CONTEXT, MIN_SEQ_TOKENS, check_fits, default_kv_pool_blocks, kv_block_bytes, kv_budget_bytes,
    kv_pool_blocks, preflight, window_pool_bytes,
)
from ember.planner.source import ResolvedModel, resolve_model
from ember.planner.speed import decode_step_seconds, prefill_seconds, train_flops_per_token, train_tokens_per_second
from ember.planner.workload import (
    DTYPE_BYTES, LORA_TARGETS, METHODS, MIXED, QUANTS, Workload, dtype_name, short_dtype,
)

__all__ = [
    "ADAM_BYTES", "DEFAULT_CONTEXT", "DEFAULT_DISK_BANDWIDTH", "OffloadPlan", "disk_bandwidth", "offload_plan", "DTYPE_BYTES", "GLIBC_MMAP_MAX", "K_ACT", "K_HEAP_HOLES", "LORA_DROPOUT",
    "LORA_TARGETS", "METHODS", "MIXED", "MIN_SEQ_TOKENS", "ONEDNN_TRAIN_BYTES", "QUANTS", "QUANT_SCRATCH_PER_ELEMENT",
    "MemoryBreakdown", "Plan", "ResolvedModel", "WeightBytes", "Workload", "check_fits", "cpu_training_heap_bytes",
    "decode_step_seconds", "default_kv_pool_blocks", "dtype_name", "explain", "kv_block_bytes", "kv_budget_bytes",
    "kv_cache_bytes", "kv_pool_blocks", "window_pool_bytes", "linear_bytes", "linears", "lora_parameters", "memory", "options", "plan",
    "prefill_activation_bytes", "prefill_seconds", "preflight", "quant_load_scratch_bytes", "quant_quality", "recommend",
    "resolve_model", "short_dtype", "train_flops_per_token", "train_tokens_per_second", "training_activation_bytes",
    "weight_bytes",
]
