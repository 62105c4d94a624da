"""The decision: does a workload fit, how far can it stretch, which option to recommend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ember.config import ModelConfig
from ember.hardware import GiB, Hardware
from ember.loading.mxfp4 import experts_only as mxfp4_experts_only
from ember.planner.memory import MemoryBreakdown, memory, weight_bytes
from ember.planner.offload import OffloadPlan, offload_plan
from ember.planner.speed import _kernel, decode_step_seconds, prefill_seconds, train_tokens_per_second
from ember.planner.workload import METHODS, MIXED, QUANTS, Workload


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
    quality: float = 0.0              # rank among options when several fit (lower is better)
    offload: OffloadPlan | None = None  # how it runs with weights read from disk, when it does not fit

    @property
    def label(self) -> str:
        return self.workload.label()

    @property
    def runnable(self) -> bool:
        """It fits, or it runs with offload (the loader then offloads; it refuses nothing marked runnable)."""
        return self.fits or (self.offload is not None and self.offload.fits and not self.offload.needs_quantize)

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
            "runnable": self.runnable, "offload": None if self.offload is None else self.offload.to_json(),
        }



def plan(cfg: ModelConfig, hw: Hardware, wl: Workload, model: str = "", max_memory: float | None = None,
         checkpoint_dtype: str | None = None, in_process: bool = False, stored_quant: bool = False) -> Plan:
    """Plan ``wl`` for ``cfg`` on ``hw``.

    Args:
        model: a name for messages and tables.
        max_memory: cap on usable bytes per node (``--max-memory``), applied on top of the hardware's.
        checkpoint_dtype: on-disk dtype (``bf16``...) when known; drives the load transient.
        in_process: the caller *is* the Ember process, so its runtime memory is already in use
            (not in ``available``) and is not counted again.
        stored_quant: the checkpoint is stored in ``wl.quant`` already (an ``ember quantize`` folder): its
            experts can be offloaded quantized.
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
    off = None
    if not fits:
        off = offload_plan(cfg, hw, wl, usable, mem.kv_cache + mem.activations + mem.runtime, t_end, stored_quant)
        if off is not None and off.fits and not off.disk_measured:
            notes.append("offload speed assumes a disk read rate: run `ember hw --measure`")
    return Plan(model=model, hardware=hw, workload=wl, memory=mem, available=available, fits=fits,
                max_context=max_ctx, max_batch=max_batch, decode_tok_s=1 / t_end, decode_tok_s_start=1 / t_start,
                prefill_tok_s=prefill, train_tok_s=train, bytes_per_step=bytes_end, roofline_tok_s=roof,
                params=cfg.num_parameters(), active_params=cfg.active_parameters(), notes=notes,
                quality=quant_quality(cfg, wl.quant), offload=off)


def _granularity(cfg: ModelConfig, wl: Workload, hw: Hardware) -> float:
    """Split imbalance across nodes: layers are whole, so one node may hold one layer more than its share."""
    if hw.nodes == 1:
        return 0.0
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    per_layer = (wb.attention + wb.recurrent + wb.mlp + wb.experts) / cfg.num_hidden_layers
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
            if q == MIXED and not mxfp4_experts_only(cfg):
                continue  # gpt-oss's layout only
            plans.append(plan(cfg, hw, replace(wl, quant=q), model, max_memory, checkpoint_dtype, in_process))
    else:
        for m in methods or METHODS:
            plans.append(plan(cfg, hw, replace(wl, method=m), model, max_memory, checkpoint_dtype, in_process))
    return plans


# Quality order (best first): what to prefer when several options fit.
_QUALITY = {"none": 0, "int8": 1, "int4": 2, "mxfp4": 2.5, "nf4": 3}


def quant_quality(cfg: ModelConfig, quant: str) -> float:
    """Rank of a weight format for this model (lower is better). gpt-oss's MXFP4 experts are the published weights
    themselves (nothing is rounded again), so there it ranks just after the float weights."""
    if quant == "mxfp4" and mxfp4_experts_only(cfg):
        return 0.5
    if quant == MIXED:  # the published experts, the rest rounded once more to int8
        return 0.75
    return _QUALITY[quant]
_METHOD_QUALITY = {"full": 0, "lora": 1, "qlora": 2}


def recommend(plans: list[Plan], headroom: float = 0.9) -> Plan | None:
    """The highest-quality option that fits with ``1 - headroom`` spare; else the smallest that fits at all."""
    def quality(p: Plan) -> tuple:
        wl = p.workload
        if wl.task == "tune":
            return (_METHOD_QUALITY[wl.method],)
        return (p.quality,)

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

