"""``ember tune`` and ``ember merge`` as functions: load, prepare, train, write; merge an adapter.

:func:`tune` is the whole command: it validates the data before loading the model, loads the
model in the training dtype (bf16 where the device runs it natively, else fp32), prepares it for
the method (LoRA adapters; QLoRA: NF4 base + adapters; full: every weight trainable, fp32
masters), trains with :class:`~ember.train.trainer.Trainer` and writes OUT_DIR:

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (lora / qlora)
    model/                                           a full HF checkpoint (full)
    metrics.jsonl, loss.png, train_config.json       the run's record
    checkpoints/step-NNNNNN/                         resumable state (with --save-every)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ember.checkpoint_io import atomic_write_json, save_hf_checkpoint
from ember.errors import TrainingError
from ember.train.data import BatchPlan, DataStats, load_jsonl
from ember.train.adapter_files import apply_adapter
from ember.train.lora import inject_lora, merge_lora
from ember.train.trainer import CHECKPOINT_DIR, TRAIN_CONFIG, StepMetrics, TrainConfig, Trainer, list_checkpoints

# Config fields that may change between a run and its resume (they do not change the numbers).
_RESUMABLE_CHANGES = {"eval_every", "save_every", "keep_checkpoints"}

# Files of a checkpoint folder that describe the tokenizer and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class TuneResult:
    """What a :func:`tune` run produced."""

    out_dir: Path
    metrics: list[StepMetrics]
    evals: list[tuple[int, float]]
    data: DataStats
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def training_dtypes(method: str, dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None) for a method and ``--dtype`` on ``device``.

    LoRA/QLoRA keep the frozen base in the compute dtype (bf16 where native) and fp32 adapters;
    full fine-tuning keeps fp32 weights and computes in bf16 under autocast.
    """
    from ember.loading import DTYPE_NAMES, device_supports_bf16

    if dtype in (None, "auto"):
        compute = torch.bfloat16 if device_supports_bf16(device) else torch.float32
    else:
        try:
            compute = DTYPE_NAMES[dtype.lower()]
        except KeyError:
            raise TrainingError(f"--dtype must be auto, bf16 or fp32, not {dtype!r}") from None
        if compute == torch.float16:
            raise TrainingError("fp16 training needs loss scaling, which Ember does not do; use bf16 or fp32")
    if method == "full":
        return torch.float32, (compute if compute != torch.float32 else None)
    return compute, None


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Make ``model`` trainable for ``cfg.method`` (in place).

    QLoRA quantizes the projections to NF4 here unless they already are quantized (a model
    loaded with ``load_model(..., quant="nf4")``, which never holds the 16-bit weights at once).
    """
    if cfg.method == "full":
        model.requires_grad_(True)
        return
    check_lora_targets(model, cfg.lora())
    if cfg.method == "qlora" and not any(callable(getattr(m, "dequantize_rows", None)) for m in model.modules()):
        quantize_nf4(model)
    inject_lora(model, cfg.lora(), dtype=torch.float32, seed=cfg.seed)


def check_lora_targets(model: torch.nn.Module, lora: Any) -> None:
    """Refuse LoRA targets that select a routed expert or the router of a family in :data:`ALL_LINEAR_AS` (HF keeps
    them as 3-D parameters / a custom module, so the adapter could not load in PEFT).

    Raises:
        TrainingError: naming the first such module and what can be adapted instead.
    """
    from ember.train.lora import target_module_names

    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in ALL_LINEAR_AS:
        return
    bad = [n for n in target_module_names(model, lora) if _ROUTED.fullmatch(n)]
    if bad:
        raise TrainingError(f"--targets selects {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: "
                            f"{family}'s routed experts and router are not Linears in HF/PEFT, so LoRA cannot adapt "
                            "them; name the attention, recurrent-mixer or shared-expert projections, or all-linear")


def quantize_nf4(model: torch.nn.Module) -> None:
    """Swap every projection except ``lm_head`` for ``ember.quant``'s ``NF4Linear`` (QLoRA's base)."""
    from ember.quant.quantize import quantize_model

    quantize_model(model, "nf4")


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / TRAIN_CONFIG).is_file():
            raise TrainingError(f"{out}: nothing to resume (no {TRAIN_CONFIG}); run without --resume first")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        hint = "; pass --resume to continue it" if (out / TRAIN_CONFIG).is_file() else ""
        raise TrainingError(f"{out}: output folder exists and is not empty{hint}, or choose another -o")


def _check_same_config(out: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    old = saved.get("config", {})
    diff = [k for k in now if k not in _RESUMABLE_CHANGES and k in old and old[k] != now[k]]
    if diff:
        parts = ", ".join(f"{k}: {old[k]!r} -> {now[k]!r}" for k in diff)
        raise TrainingError(f"{out}: --resume needs the options of the original run; changed: {parts}")


# Families whose training forward (ember.train.forward: pre-norm attention + MLP halves; family, recurrent and
# one-block layers whole) is tested against HF and PEFT (loss and LoRA gradients, adapters loaded in PEFT). The
# others load and generate, but their training path is not verified yet, so tuning them is refused.
TRAINABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gpt_oss", "qwen3_5_text",
                      "qwen3_5_moe_text", "qwen3_next", "nemotron_h", "gemma2", "gemma3_text", "gemma4_text",
                      "glm4_moe", "deepseek_v3", "minimax_m2")
# Families with recurrent layers: a packed row would carry one example's state into the next.
RECURRENT_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "nemotron_h")
# gpt-oss: the experts are fused 3-D tensors (HF's layout, MXFP4 as published) and HF's router is not an
# nn.Linear, so LoRA adapts the attention projections; "all-linear" means those, as it does in PEFT. The base
# (MXFP4 experts included) stays frozen as loaded.
FAMILY_LORA_TARGETS = {"gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj")}
# What "all-linear" adapts where PEFT's own choice differs. In HF 5 the routed experts of these MoE families are
# 3-D parameters and the router is not an nn.Linear: PEFT reaches them only as `target_parameters` (fused
# gate_up_proj, rank doubled), which Ember does not write, so every other projection is adapted and the adapter
# lists them by full name (PEFT then wraps exactly those). Nemotron-H: PEFT also refuses a Mamba mixer's out_proj.
_QWEN_MOE_LINEAR = (r".*\.(in_proj_\w+|out_proj|[qkvo]_proj|mlp\.(gate|up|down)_proj|"
                    r"shared_expert\.(gate|up|down)_proj|shared_expert_gate)")
ALL_LINEAR_AS = {"nemotron_h": r".*\.(in_proj|[qkvo]_proj|shared_experts\.(up|down)_proj|mixer\.(up|down)_proj)",
                 "qwen3_next": _QWEN_MOE_LINEAR, "qwen3_5_moe_text": _QWEN_MOE_LINEAR}
# Modules of those families that LoRA may not wrap: a routed expert's projections and the router.
_ROUTED = re.compile(r".*\.(mlp|mixer)\.(experts\.\d+\.\w+|gate)")


def check_trainable(model_path: str | os.PathLike, cfg: TrainConfig | None = None) -> TrainConfig | None:
    """Refuse, before any work, a checkpoint whose family ``ember tune`` cannot train yet (or not with ``cfg.pack``);
    return ``cfg`` with ``all-linear`` resolved for families whose adaptable Linears are a fixed set
    (:data:`FAMILY_LORA_TARGETS`, :data:`ALL_LINEAR_AS`).

    Raises:
        TrainingError: naming the family and the ones that can be tuned, or a target the family cannot adapt.
    """
    from ember.config import ModelConfig

    mcfg = ModelConfig.from_file(model_path)
    if mcfg.model_type not in TRAINABLE_FAMILIES:
        raise TrainingError(f"{model_path}: ember tune does not train model_type {mcfg.model_type!r} yet (it loads, "
                            f"generates and serves); families that can be tuned: {', '.join(TRAINABLE_FAMILIES)}")
    if mcfg.multimodal and mcfg.model_type in RECURRENT_FAMILIES:
        raise TrainingError(f"{model_path}: a multimodal {mcfg.model_type} checkpoint (weights under the wrapper's "
                            "names) cannot be tuned yet; tune the text-only checkpoint (...ForCausalLM)")
    if cfg is not None and cfg.pack and mcfg.model_type in RECURRENT_FAMILIES:
        raise TrainingError(f"{model_path}: {mcfg.model_type} has recurrent layers, whose state would run from one "
                            f"packed example into the next; tune it without --pack (one example per row)")
    if cfg is None or cfg.method == "full":
        return cfg
    if cfg.targets == "all-linear" and mcfg.model_type in ALL_LINEAR_AS:
        return dataclasses.replace(cfg, targets=ALL_LINEAR_AS[mcfg.model_type])
    allowed = FAMILY_LORA_TARGETS.get(mcfg.model_type)
    if allowed is None:
        return cfg
    if cfg.targets == "all-linear":
        return dataclasses.replace(cfg, targets=list(allowed))
    named = cfg.lora().target_modules
    bad = [t for t in named if t not in allowed] if isinstance(named, list) else []
    if bad:
        raise TrainingError(f"--targets {','.join(bad)}: {mcfg.model_type} adapts {', '.join(allowed)} (its experts "
                            "are fused 3-D tensors and its router is not a Linear in HF/PEFT)")
    return cfg


def tune(model_path: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainConfig,
         eval_data: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
         progress: bool = True, callback: Callable[[Trainer, StepMetrics], None] | None = None,
         log: Callable[[str], None] | None = None, max_memory: float | None = None) -> TuneResult:
    """Fine-tune ``model_path`` on a JSONL file; see the module docstring for what OUT_DIR gets.

    Args:
        model_path: HF checkpoint folder.
        data / eval_data: JSONL files (``messages``, ``prompt``/``completion`` or ``text`` records).
        out_dir: output folder; must be empty unless ``resume``.
        cfg: hyper-parameters.
        resume: continue the run in ``out_dir`` from its newest checkpoint (same options required).
        device: "cpu", "cuda", ...; default CUDA when available.
        progress: tqdm bar on stderr.
        callback: called after each step with (trainer, metrics).
        log: sink for one-line messages (default stderr).
        max_memory: GiB the run may use; the planner refuses a run that needs more (or more than is free).
    Raises:
        InsufficientMemoryError: the planner says the run does not fit (the message says what would).
        DataError: malformed data lines (before the model is loaded).
        TrainingError: bad options, occupied output folder, nothing to resume.
    """
    from ember.loading import load_model
    from ember.tokenizer import Tokenizer

    from ember.distributed import current
    from ember.distributed.data import DataParallel

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg.check()
    cfg = check_trainable(model_path, cfg)
    out = Path(out_dir)
    dist = current()
    dp = DataParallel(dist) if dist is not None and dist.mode == "dp" else None
    writes = dp is None or dp.writes  # under torchrun only rank 0 writes (and checks the folder)
    if writes:
        _check_out_dir(out, resume)
    record = {"model": str(model_path), "data": str(data), "eval": str(eval_data) if eval_data else None,
              "config": cfg.as_json()}
    if resume:
        _check_same_config(out, json.loads((out / TRAIN_CONFIG).read_text(encoding="utf-8")), cfg.as_json())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tok = Tokenizer.from_dir(model_path)
    train_ex, stats = load_jsonl(data, tok, cfg.seq_len, cfg.loss_on, cfg.overlong)
    log(f"[ember tune] {data}: {stats.summary()}")
    eval_ex = None
    if eval_data is not None:
        eval_ex, estats = load_jsonl(eval_data, tok, cfg.seq_len, cfg.loss_on, cfg.overlong)
        log(f"[ember tune] {eval_data} (eval): {estats.summary()}")

    weights_dtype, autocast = training_dtypes(cfg.method, cfg.dtype, dev)
    from ember.planner import preflight

    preflight(model_path, dev, autocast or weights_dtype, context=cfg.seq_len, batch=cfg.batch, max_memory=max_memory,
              task="tune", method=cfg.method)
    model = load_model(model_path, device=dev, dtype=weights_dtype, quant="nf4" if cfg.method == "qlora" else None)
    prepare_model(model, cfg)
    if dp is not None and cfg.method == "full":
        dp.shard(model)  # FSDP2: weights, gradients and optimizer state 1/n per rank (ember/distributed/data.py)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"[ember tune] {cfg.method}: {n_train / 1e6:.2f}M trainable of {n_all / 1e6:.1f}M parameters; "
        f"weights {_dtype_name(weights_dtype)}{f', compute {_dtype_name(autocast)}' if autocast else ''} on {dev}")

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_ids[0] if tok.eos_token_ids else 0)
    plan = BatchPlan(train_ex, cfg.batch, cfg.seq_len, cfg.pack, shuffle=True, seed=cfg.seed, pad_id=pad)
    eval_plan = BatchPlan(eval_ex, cfg.batch, cfg.seq_len, cfg.pack, shuffle=False, pad_id=pad) if eval_ex else None
    torch.manual_seed(cfg.seed)  # dropout stream of a fresh run (a resume restores the saved one)
    trainer = Trainer(model, plan, cfg, out, eval_plan, lora=cfg.lora() if cfg.method != "full" else None,
                      base_model=str(model_path), progress=progress, log=log, autocast_dtype=autocast)
    trainer.data_parallel = dp
    if dp is not None and dp.sharded:  # sharded (DTensor) and replicated parameters: one tensor at a time
        for g in trainer.opt.param_groups:
            g["foreach"] = False
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / TRAIN_CONFIG, record)
    resumed = None
    if resume:
        resumed = trainer.resume_latest()
        if resumed is None:
            raise TrainingError(f"{out / CHECKPOINT_DIR}: no complete checkpoint to resume from "
                                "(the run stopped before its first --save-every step)")
        log(f"[ember tune] resumed from {resumed} (step {trainer.step} of {trainer.total_steps})")
    if not writes:
        trainer.out_dir = None  # metrics, checkpoints and plots come from rank 0

    trainer.run(callback)
    saved = dp.full_model(model) if dp is not None and dp.sharded else model  # every rank gathers
    if not writes:
        return TuneResult(out, trainer.history, trainer.evals, stats, resumed)
    if cfg.method == "full":
        model.requires_grad_(False)
        save_hf_checkpoint(out / "model", saved, tokenizer_files=read_tokenizer_files(model_path),
                           generation_config=_read_json(Path(model_path) / "generation_config.json"), overwrite=True)
        product = out / "model"
    else:
        trainer.save_final()
        product = out
    trainer.write_plot()
    if trainer.history:
        last = trainer.history[-1]
        log(f"[ember tune] done: step {trainer.step}, loss {last.loss:.4f}"
            + (f", eval loss {trainer.evals[-1][1]:.4f}" if trainer.evals else "")
            + f"; wrote {product}")
    return TuneResult(out, trainer.history, trainer.evals, stats, resumed)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def read_tokenizer_files(model_path: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files of a checkpoint folder, name -> bytes (for writing a derived checkpoint)."""
    folder = Path(model_path)
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Write base + adapter as one HF checkpoint (W' = W + scaling * B @ A, formed in fp32).

    The merged weights keep the base checkpoint's dtype; tokenizer files and generation_config
    are copied from ``base``. The folder appears only when complete (see ``save_hf_checkpoint``).
    """
    from ember.loading import load_model
    from ember.loading.safetensors import Checkpoint

    dtype = Checkpoint(base).dtype()
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    model = load_model(base, device="cpu", dtype=dtype)
    apply_adapter(model, adapter, dtype=torch.float32)
    merge_lora(model, unwrap=True)
    return save_hf_checkpoint(out, model, tokenizer_files=read_tokenizer_files(base),
                              generation_config=_read_json(Path(base) / "generation_config.json"),
                              overwrite=overwrite)


__all__ = ["tune", "merge_checkpoint", "TuneResult", "training_dtypes", "prepare_model", "list_checkpoints"]
