"""The fine-tuning loop: AdamW, warmup + cosine/linear schedule, gradient accumulation, eval,
progress, metrics, atomic checkpoints and exact resume.

Numerics follow HF ``Trainer`` so that a run can be checked step by step against transformers +
PEFT: the loss of an optimizer step is the mean over every target token of its micro-batches
(summed CE / target count), gradients are clipped to ``max_grad_norm``, and the learning rate
of step k (0-based) is ``lr * factor(k)`` with HF's ``get_{cosine,linear}_schedule_with_warmup``
factor (so with warmup the first step's learning rate is 0, as there).

Checkpoints (``OUT_DIR/checkpoints/step-000100``) hold the trainable weights, the AdamW state,
the RNG states, the step and the data position (index of the next micro-batch). Each is built
in a ``.step-000100.tmp-*`` folder and renamed into place when complete, so a run killed while
writing leaves the previous checkpoint as the newest loadable one. Epoch order depends only on
(seed, epoch), so ``resume`` replays exactly the batches, dropout masks and updates an
uninterrupted run would have made; the resumed loss trajectory is bit-identical on the same
machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ember.checkpoint_io import (
    atomic_write_json, atomic_write_text, fsync_dir, make_temp_dir, remove_stale_temp_dirs, save_safetensors, seal_temp_dir,
    stale_note,
)
from ember.errors import TrainingError
from ember.models import Transformer
from ember.train.data import BatchPlan
from ember.train.forward import batch_loss_sum
from ember.train.adapter_files import save_adapter
from ember.train.lora import LoRAConfig
from ember.train.plot import write_loss_curve

CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
TRAIN_CONFIG = "train_config.json"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Everything that decides a run's numbers (saved with it; ``resume`` checks it is unchanged).

    Attributes:
        method: ``lora``, ``qlora`` (LoRA over an NF4 base) or ``full``.
        rank, alpha, dropout, targets: LoRA hyper-parameters (see :class:`~ember.train.lora.LoRAConfig`).
        steps: optimizer steps; None = ``epochs`` passes over the data.
        epochs: passes over the data when ``steps`` is None.
        lr: peak learning rate.  batch: rows per micro-batch.  grad_accum: micro-batches per step.
        seq_len: longest row in tokens.  warmup: warmup steps (a value in (0, 1) = fraction of steps).
        schedule: ``cosine``, ``linear`` or ``constant`` after warmup.
        weight_decay, betas, eps: AdamW.  max_grad_norm: clip (0 = off).
        pack: several examples per row (attention kept within each).  grad_checkpoint: recompute
            activations in backward.  loss_on: ``assistant`` or ``all``.  overlong: ``truncate``/``drop``.
        eval_every / save_every: in steps (0 = only at the end).  keep_checkpoints: newest kept.
        seed: LoRA init, data order, dropout.  dtype: ``auto`` (bf16 where the device runs it natively,
            else fp32), ``bf16``, ``fp32``.
    """

    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 2e-4
    batch: int = 1
    grad_accum: int = 1
    seq_len: int = 2048
    warmup: float = 0.0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    pack: bool = False
    grad_checkpoint: bool = False
    loss_on: str = "assistant"
    overlong: str = "truncate"
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "auto"

    def check(self) -> None:
        """Raise :class:`TrainingError` for an impossible combination of options."""
        def bad(msg: str) -> None:
            raise TrainingError(msg)

        if self.method not in ("lora", "qlora", "full"):
            bad(f"--method must be lora, qlora or full, not {self.method!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            bad(f"--schedule must be cosine, linear or constant, not {self.schedule!r}")
        if self.rank < 1:
            bad(f"--rank must be at least 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.lr <= 0:
            bad(f"--lr must be positive (got {self.lr})")
        for name in ("batch", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.steps is not None and self.steps < 1:
            bad(f"--steps must be at least 1 (got {self.steps})")
        if self.steps is None and self.epochs <= 0:
            bad(f"--epochs must be positive (got {self.epochs})")
        if self.warmup < 0:
            bad(f"--warmup must be >= 0 (got {self.warmup})")

    def lora(self) -> LoRAConfig:
        targets = self.targets
        if isinstance(targets, str) and targets != "all-linear" and "," in targets:
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        elif isinstance(targets, str) and targets != "all-linear" and not any(c in targets for c in "*()[]|\\^$+?"):
            targets = [targets]
        return LoRAConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """HF's warmup + decay factor for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class StepMetrics:
    """One optimizer step (a line of metrics.jsonl)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int          # real input tokens of the step (all micro-batches)
    target_tokens: int   # tokens that carried loss
    tok_s: float         # tokens / second of this step
    elapsed_s: float     # training seconds so far (across resumes)


class Trainer:
    """Runs optimizer steps over a :class:`~ember.train.data.BatchPlan`.

    Args:
        model: the Transformer with trainable parameters already set (LoRA injected, or all for full).
        plan: training batches.
        cfg: hyper-parameters.
        out_dir: where metrics, plots, checkpoints and the final adapter go (None: keep nothing).
        eval_plan: batches for eval loss (optional).
        lora: the LoRA config when training an adapter (None for full fine-tuning).
        base_model: recorded as ``base_model_name_or_path`` in adapter configs.
        progress: show a tqdm bar on stderr.
        log: where one-line messages go (default stderr).
        autocast_dtype: compute dtype for fp32 weights under ``torch.autocast`` (full fine-tuning in
            bf16), or None to compute in the weights' dtype.
    """

    def __init__(self, model: Transformer, plan: BatchPlan, cfg: TrainConfig, out_dir: str | os.PathLike | None = None,
                 eval_plan: BatchPlan | None = None, lora: LoRAConfig | None = None, base_model: str | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        cfg.check()
        self.model, self.plan, self.cfg, self.eval_plan = model, plan, cfg, eval_plan
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.lora, self.base_model, self.progress = lora, base_model, progress
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.device = model.model.norm.weight.device
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise TrainingError("the model has no trainable parameters")
        decay = [p for n, p in self.named_params if p.dim() >= 2]
        no_decay = [p for n, p in self.named_params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.autocast_dtype = autocast_dtype
        self.micro_per_epoch = plan.batches_per_epoch()
        if cfg.steps is not None:
            self.total_steps = cfg.steps
            self.total_micro = cfg.steps * cfg.grad_accum
        else:
            self.total_micro = max(1, math.ceil(cfg.epochs * self.micro_per_epoch))
            self.total_steps = math.ceil(self.total_micro / cfg.grad_accum)
        w = cfg.warmup
        self.warmup_steps = int(round(w * self.total_steps)) if 0 < w < 1 else int(w)
        self.step = 0          # optimizer steps done
        self.micro = 0         # micro-batches consumed (the data position)
        self.elapsed = 0.0     # training seconds, across resumes
        self.tokens_seen = 0
        self.history: list[StepMetrics] = []
        self.evals: list[tuple[int, float]] = []
        # data-parallel hooks (:class:`ember.distributed.data.DataParallel`): this rank's rows, gradient all-reduce
        self.data_parallel = None
        if self.out_dir is not None:  # a killed earlier run may have left a checkpoint half-written
            stale = remove_stale_temp_dirs(self.checkpoint_dir(), r"\.step-\d+\.tmp-[a-z0-9_]+$")
            if stale:
                self.log(f"[ember tune] {stale_note(stale, 'checkpoint')}")

    # ------------------------------------------------------------------ one step
    def _micro_batch(self, m: int):
        epoch, idx = divmod(m, self.micro_per_epoch)
        return self.plan.collate(self.plan.epoch(epoch)[idx]).to(self.device)

    def train_step(self) -> StepMetrics:
        """One optimizer step over the next ``grad_accum`` micro-batches."""
        cfg = self.cfg
        t0 = time.perf_counter()
        n_micro = min(cfg.grad_accum, self.total_micro - self.micro) if cfg.steps is None else cfg.grad_accum
        batches = [self._micro_batch(self.micro + i) for i in range(n_micro)]
        n_targets = sum(b.n_targets for b in batches)
        lr = cfg.lr * lr_factor(self.step, self.warmup_steps, self.total_steps, cfg.schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        total = 0.0
        dp = self.data_parallel
        for b in batches:
            if dp is not None and (b := dp.rows(b)) is None:
                continue  # fewer rows than ranks: this rank sits the micro-batch out
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                loss_sum, _ = batch_loss_sum(self.model, b.input_ids, b.labels, b.positions, b.segments,
                                             cfg.grad_checkpoint)
            (loss_sum / max(1, n_targets)).backward()
            total += float(loss_sum.detach())
        params = [p for _, p in self.named_params]
        if dp is not None:  # the global gradient and loss (n_targets above is the global count already)
            dp.reduce_grads(params)
            total = dp.reduce_sum(total)
        if dp is not None and dp.sharded:  # FSDP2: shards and replicated gradients together
            gnorm = dp.clip_grad_norm(params, cfg.max_grad_norm)
        elif cfg.max_grad_norm and cfg.max_grad_norm > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params
                                                                if p.grad is not None])))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        self.micro += n_micro
        self.step += 1
        loss = total / max(1, n_targets)
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {self.step}; lower --lr or check the data")
        dt = time.perf_counter() - t0
        self.elapsed += dt
        tokens = sum(b.n_tokens for b in batches)
        self.tokens_seen += tokens
        m = StepMetrics(self.step, loss, lr, gnorm, tokens, n_targets, tokens / dt if dt > 0 else 0.0,
                        round(self.elapsed, 3))
        self.history.append(m)
        return m

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the whole eval set (dropout off)."""
        assert self.eval_plan is not None
        self.model.eval()
        total, n = 0.0, 0
        for _, b in self.eval_plan.iterate(0):
            b = b.to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                s, k = batch_loss_sum(self.model, b.input_ids, b.labels, b.positions, b.segments)
            total += float(s)
            n += k
        return total / max(1, n)

    # ------------------------------------------------------------------ the loop
    def run(self, callback: Callable[["Trainer", StepMetrics], None] | None = None) -> list[StepMetrics]:
        """Train until ``total_steps``; evaluate, checkpoint and log on the way.

        Args:
            callback: called after every step (and its eval/checkpoint) with (trainer, metrics).
        Returns:
            Metrics of every step done by this trainer (including those before a resume).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"tune ({cfg.method})", unit="step",
                   file=sys.stderr, disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                m = self.train_step()
                self._write_metrics(asdict(m))
                post = {"loss": f"{m.loss:.4f}", "tok/s": f"{m.tok_s:.0f}", "lr": f"{m.lr:.2e}"}
                if self.eval_plan is not None and (
                        (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps):
                    ev = self.evaluate()
                    self.evals.append((self.step, ev))
                    self._write_metrics({"step": self.step, "eval_loss": ev})
                    post["eval"] = f"{ev:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                sharded = self.data_parallel is not None and self.data_parallel.sharded  # every rank gathers
                if (self.out_dir is not None or sharded) and cfg.save_every and self.step % cfg.save_every == 0 \
                        and self.step < self.total_steps:
                    self.save_checkpoint()
                if callback is not None:
                    callback(self, m)
        finally:
            bar.close()
            if self.out_dir is not None and self.history:
                self.write_plot()
        return self.history

    # ------------------------------------------------------------------ outputs
    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_plot(self) -> None:
        """loss.png from the metrics of the whole run (including steps before a resume)."""
        if self.out_dir is None:
            return
        train, evals = [], []
        for row in read_metrics(self.out_dir / METRICS):
            if "loss" in row:
                train.append((row["step"], row["loss"]))
            elif "eval_loss" in row:
                evals.append((row["step"], row["eval_loss"]))
        write_loss_curve(self.out_dir / LOSS_PNG, train, evals)

    def save_final(self) -> Path:
        """The run's product in OUT_DIR: the PEFT adapter (LoRA/QLoRA) or trainable weights (full)."""
        assert self.out_dir is not None
        if self.lora is not None:
            return save_adapter(self.model, self.out_dir, self.lora, self.base_model)
        raise TrainingError("save_final is for adapters; full fine-tuning writes a checkpoint folder (see tune())")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNN`` atomically and prune old ones; returns its path (None on a rank
        that writes nothing: under FSDP2 it still takes part in gathering the tensors)."""
        full = self.data_parallel.full if self.data_parallel is not None else (lambda t: t)
        weights = {n: full(p.detach()) for n, p in self.named_params}
        opt_tensors = self._optimizer_tensors(full)
        if self.out_dir is None:
            return None
        root = self.checkpoint_dir()
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:06d}"
        dest = root / name
        tmp = make_temp_dir(root, f".{name}.tmp-")
        try:
            names = [n for n, _ in self.named_params]
            save_safetensors(tmp / "trainable.safetensors", weights)
            save_safetensors(tmp / "optimizer.safetensors", opt_tensors,
                             metadata={"format": "pt", "params": json.dumps(names)})
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    rng[f"cuda.{i}"] = s
            save_safetensors(tmp / "rng.safetensors", rng)
            if self.lora is not None:  # every checkpoint is also a loadable PEFT adapter
                save_adapter(self.model, tmp, self.lora, self.base_model)
            atomic_write_json(tmp / "trainer_state.json", {
                "format": CHECKPOINT_FORMAT, "step": self.step, "micro": self.micro, "elapsed_s": self.elapsed,
                "tokens_seen": self.tokens_seen, "total_steps": self.total_steps, "params": names,
                "config": self.cfg.as_json(), "evals": self.evals,
            })
            seal_temp_dir(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.write_plot()
        for old in list_checkpoints(root)[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def _optimizer_tensors(self, full=lambda t: t) -> dict[str, torch.Tensor]:
        state = self.opt.state_dict()["state"]
        out: dict[str, torch.Tensor] = {}
        for i, st in state.items():
            for k, v in st.items():
                out[f"{i}.{k}"] = full(v) if isinstance(v, torch.Tensor) else torch.tensor(v)
        return out

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore weights, optimizer, RNG, step and data position from a checkpoint folder."""
        from ember.loading.safetensors import SafetensorsFile

        folder = Path(folder)
        try:
            state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            weights = SafetensorsFile(folder / "trainable.safetensors")
            optf = SafetensorsFile(folder / "optimizer.safetensors")
            rngf = SafetensorsFile(folder / "rng.safetensors")
        except (OSError, ValueError) as e:
            raise TrainingError(f"{folder}: incomplete or unreadable checkpoint ({e})") from None
        names = [n for n, _ in self.named_params]
        if state.get("params") != names:
            raise TrainingError(f"{folder}: its trainable parameters differ from this run's "
                                "(different --method, --rank or --targets?)")
        local = self.data_parallel.local if self.data_parallel is not None else (lambda t, like: t)
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(local(weights.get(n).to(p.device, p.dtype), p))
        by_index = [p for g in self.opt.param_groups for p in g["params"]]
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key in optf.tensors:
            i, k = key.split(".", 1)
            opt_state.setdefault(int(i), {})[k] = local(optf.get(key).clone(), by_index[int(i)])
        sd = self.opt.state_dict()
        sd["state"] = opt_state
        self.opt.load_state_dict(sd)
        torch.set_rng_state(rngf.get("cpu").clone())
        if torch.cuda.is_available():
            cuda = [rngf.get(f"cuda.{i}").clone() for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rngf.tensors]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.elapsed, self.tokens_seen = float(state.get("elapsed_s", 0.0)), int(state.get("tokens_seen", 0))
        self.evals = [tuple(e) for e in state.get("evals", [])]
        if self.out_dir is not None:
            # The log keeps what happened up to the checkpoint; later lines are replayed by this run.
            rows = [r for r in read_metrics(self.out_dir / METRICS) if r.get("step", 0) <= self.step]
            atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def resume_latest(self) -> Path | None:
        """Load the newest checkpoint that loads; None when there is none."""
        for folder in reversed(list_checkpoints(self.checkpoint_dir())):
            try:
                self.load_checkpoint(folder)
                return folder
            except TrainingError as e:
                if "differ" in str(e):
                    raise
                self.log(f"[ember tune] skipping {folder.name}: {e}")
        return None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temp folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line from a crash is skipped)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
