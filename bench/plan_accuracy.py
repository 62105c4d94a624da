"""Planner accuracy: predicted vs measured peak memory and decode tok/s on this machine.

Each run writes (once) a random checkpoint like bench/decode.py does, then runs it in a *fresh
subprocess* (so the peak is clean): ``ember.load`` + ``Engine.generate`` of B prompts of P tokens
with 1 and with N new tokens (greedy, EOS ignored). Measured:

- peak memory = the child's VmHWM (peak RSS of its own address space, load included), and the
  delta over its RSS after imports (before the model);
- decode tok/s per sequence = the engine's decode timer (N - 1 steps from the first token to the
  last, prefill excluded), best of ``--repeats`` (with ``--clock cpu``: (N - 1) / (t(N new) - t(1 new))
  in process CPU time);
- prefill tok/s = B * P / t(1 new).

Training rows (``task`` lora / qlora) run ``ember tune``'s own path in the child instead: ``load_model``
in the training dtype (NF4 while loading for QLoRA), ``prepare_model`` (LoRA r=16, alpha 32, dropout
0.05 on every projection but lm_head, fp32 adapters), and :class:`ember.train.trainer.Trainer` steps
(AdamW, clipping 1.0, ``--grad-checkpoint`` as the row says) on random tokens, loss on every token;
one warm-up step, then ``steps`` timed ones. Measured: VmHWM as above and training tok/s = B*T / the
median step. Predicted: :func:`ember.planner.memory` for ``Workload(task="tune", ...)`` and
:func:`ember.planner.train_tokens_per_second` (re-timed: with the bf16/fp32 matmul rate measured
again after the run).

Predicted: :func:`ember.planner.memory` (``peak_rss``: runtime + max(load, run)) and
:func:`ember.planner.decode_step_seconds` at the mean cache length P + N/2, using this machine's
calibration (``ember hw --measure``; measured first if missing). Targets: peak memory within
+-10% on every run, decode tok/s within +-25%. The roofline column is the measured large-copy
streaming bandwidth over the bytes one step must read (docs/design.md, principle 5).

    python bench/plan_accuracy.py                  # all runs (~5-10 min on 2 cores)
    python bench/plan_accuracy.py --only tiny,small --repeats 2
    python bench/plan_accuracy.py --only train        # training rows only (lora, qlora; ~1-2 min)
    python bench/plan_accuracy.py --remeasure      # re-time the machine first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20

SIZES = {
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "moe": dict(model_type="qwen3_moe", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                moe_intermediate_size=512, norm_topk_prob=True, vocab_size=32000, max_position_embeddings=4096),
}


@dataclass(frozen=True)
class Run:
    size: str
    dtype: str            # compute dtype (training: the frozen base's dtype; adapters are fp32)
    ckpt: str             # checkpoint dtype on disk
    batch: int
    prompt: int           # infer: prompt tokens; training: sequence length
    new: int              # infer: new tokens (unused in training rows)
    quant: str = "none"
    task: str = "infer"   # infer | lora | qlora (QLoRA: LoRA over an NF4 base)
    grad_ckpt: bool = False  # training: ``ember tune --grad-checkpoint``
    steps: int = 3           # training: timed optimizer steps (after one warm-up step)

    @property
    def training(self) -> bool:
        return self.task != "infer"

    @property
    def name(self) -> str:
        c = "" if self.ckpt == self.dtype else f" (from {self.ckpt})"
        if self.training:
            g = " ckpt" if self.grad_ckpt else ""
            return f"{self.size} {self.task} {self.dtype}{c} B{self.batch} T{self.prompt}{g}"
        q = "" if self.quant == "none" else f" {self.quant}"
        return f"{self.size} {self.dtype}{c}{q} B{self.batch} P{self.prompt} N{self.new}"


RUNS = [
    Run("tiny", "bf16", "bf16", 1, 128, 32),
    Run("small", "bf16", "bf16", 1, 128, 32),
    Run("medium", "bf16", "bf16", 1, 128, 32),
    Run("1.1b", "bf16", "bf16", 1, 128, 32),
    Run("tiny", "fp32", "fp32", 1, 512, 32),
    Run("small", "fp32", "fp32", 1, 128, 32),
    Run("medium", "fp32", "fp32", 1, 128, 32),
    Run("small", "fp32", "bf16", 1, 128, 32),      # cast at load: the load transient
    Run("small", "bf16", "bf16", 1, 1024, 32),     # longer context
    Run("medium", "bf16", "bf16", 1, 2048, 16),    # long prefill: activations
    Run("small", "bf16", "bf16", 4, 128, 32),      # batch
    Run("medium", "bf16", "bf16", 8, 256, 16),
    Run("moe", "bf16", "bf16", 1, 128, 32),
    Run("moe", "bf16", "bf16", 4, 256, 16),
    # Quantized rows run when ember.quant provides quantize(); training rows when ember.train exists.
    Run("small", "bf16", "bf16", 1, 128, 32, quant="int8"),
    Run("small", "bf16", "bf16", 1, 128, 32, quant="int4"),
    Run("small", "bf16", "bf16", 1, 128, 32, quant="nf4"),
    # Training (`ember tune` settings: LoRA r=16 alpha 32 dropout 0.05 on every projection but lm_head,
    # AdamW, clip 1.0; bf16 frozen base, fp32 adapters; loss on every token), one micro-batch per step.
    Run("small", "bf16", "bf16", 1, 256, 0, task="lora"),
    Run("small", "bf16", "bf16", 1, 512, 0, task="lora"),
    Run("small", "bf16", "bf16", 4, 256, 0, task="lora", grad_ckpt=True),
    Run("medium", "bf16", "bf16", 1, 512, 0, task="lora"),
    Run("medium", "bf16", "bf16", 1, 512, 0, task="lora", grad_ckpt=True),
    Run("small", "bf16", "bf16", 1, 512, 0, task="qlora"),
    Run("medium", "bf16", "bf16", 1, 512, 0, task="qlora", grad_ckpt=True),
]


# ====================================================================== child process


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    """Runs in a fresh interpreter: load, generate, report memory and timings."""
    import torch

    torch.set_num_threads(spec["threads"])
    import ember
    from ember.calibrate import runtime_probe
    from ember.sampling import SamplingParams

    runtime_probe("cpu")  # what every Ember process pays first (the planner's "runtime" term)
    base = _vm("VmHWM")
    t = time.perf_counter()
    llm = ember.load(spec["folder"], device="cpu", dtype=spec["dtype"],
                     **({"quant": spec["quant"]} if spec["quant"] != "none" else {}))  # quantized while loading
    load_s = time.perf_counter() - t
    after_load_hwm = _vm("VmHWM")
    g = torch.Generator().manual_seed(1)
    V = llm.config.vocab_size
    prompts = [torch.randint(3, V, (spec["prompt"],), generator=g).tolist() for _ in range(spec["batch"])]
    p1 = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    pn = SamplingParams(max_new_tokens=spec["new"], temperature=0.0, ignore_eos=True)

    clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter

    def timed(params):
        t0 = clock()
        out = llm.generate(prompts, params)
        return clock() - t0, out[0].stats

    timed(p1)  # warm-up
    t1 = min(timed(p1)[0] for _ in range(spec["repeats"]))
    runs = [timed(pn) for _ in range(spec["repeats"])]
    tn = min(t for t, _ in runs)
    if spec.get("clock") == "cpu":
        decode = (spec["new"] - 1) / (tn - t1) if tn > t1 else float("nan")
    else:
        # Wall clock: the engine's own decode timer (first token to last), best run. Differencing two
        # whole generate calls lets a slow spell during a long prefill swamp a short decode.
        decode = max(st.decode_tok_s for _, st in runs)
    peak = _vm("VmHWM")
    del llm
    # The machine as it is *now* (other tenants come and go): a quick calibration in this process,
    # after the peak was read, so the model can be checked apart from the machine's drift.
    from ember.calibrate import measure

    now = measure("cpu", quick=True, save=False, runtime=False)
    return {"base_rss": base, "peak_rss": peak, "load_peak_rss": after_load_hwm, "load_s": load_s,
            "prefill_s": t1, "decode_tok_s": decode,
            "calibration_now": now.to_json()}


def child_train(spec: dict) -> dict:
    """Runs in a fresh interpreter: ``ember tune``'s load, prepare and optimizer steps on random tokens.

    The same path as :func:`ember.train.tune.tune` minus tokenizing a JSONL file: ``load_model`` in
    the training dtype (NF4 while loading for QLoRA), ``prepare_model`` (LoRA r=16 on every
    projection), :class:`~ember.train.trainer.Trainer` steps (AdamW, clipping, checkpointing as asked).
    """
    import statistics

    import torch

    torch.set_num_threads(spec["threads"])
    from ember.calibrate import _matmul_flops, runtime_probe
    from ember.loading import load_model
    from ember.train.data import BatchPlan, Example
    from ember.train.trainer import TrainConfig, Trainer
    from ember.train.tune import prepare_model, training_dtypes

    runtime_probe("cpu")
    base = _vm("VmHWM")
    B, T, steps = spec["batch"], spec["prompt"], spec["steps"]
    cfg = TrainConfig(method=spec["task"], rank=16, alpha=32, dropout=0.05, steps=steps + 1, lr=2e-4, batch=B,
                      seq_len=T, grad_checkpoint=spec["grad_ckpt"], dtype=spec["dtype"], loss_on="all")
    dev = torch.device("cpu")
    wdt, autocast = training_dtypes(cfg.method, cfg.dtype, dev)
    t = time.perf_counter()
    model = load_model(spec["folder"], device=dev, dtype=wdt, quant="nf4" if cfg.method == "qlora" else None)
    prepare_model(model, cfg)
    load_s = time.perf_counter() - t
    after_load_hwm = _vm("VmHWM")
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    examples = [Example(torch.randint(3, V, (T,), generator=g).tolist(), [True] * T) for _ in range((steps + 1) * B)]
    tr = Trainer(model, BatchPlan(examples, B, T, shuffle=False), cfg, None, progress=False, autocast_dtype=autocast)
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        losses.append(tr.train_step().loss)
        times.append(time.perf_counter() - t0)
    peak = _vm("VmHWM")
    step_s = statistics.median(times[1:])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del tr, model
    # The machine as it is now: the bf16/fp32 matmul rate that the training speed model rests on.
    mm_now = _matmul_flops(dev, wdt if autocast is None else autocast, 2048, min_seconds=0.25)
    return {"base_rss": base, "peak_rss": peak, "load_peak_rss": after_load_hwm, "load_s": load_s,
            "step_s": times, "train_tok_s": B * T / step_s, "losses": losses, "trainable": n_train,
            "matmul_flops_now": mm_now}


# ====================================================================== parent


def _available(run: Run) -> str | None:
    """Why a run cannot happen on this checkout (None: it can)."""
    if run.quant != "none" or run.task == "qlora":
        try:
            import ember.quant  # noqa: F401
        except ImportError:
            return "ember.quant not available yet"
    if run.task != "infer":
        try:
            import ember.train  # noqa: F401
        except ImportError:
            return "ember.train not available yet"
    return None


def _busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over ``seconds`` (from /proc/stat), while this process sleeps."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Sleep until other processes use < ``threshold`` of the CPU (or ``limit_s`` passes); return the busy fraction."""
    start = time.perf_counter()
    busy = _busy_fraction()
    while busy > threshold and time.perf_counter() - start < limit_s:
        time.sleep(5)
        busy = _busy_fraction()
    return busy


def predict(run: Run, hw) -> dict:
    from ember.config import ModelConfig
    from ember.planner import Workload, decode_step_seconds, memory, prefill_seconds

    cfg = ModelConfig.from_dict({"model_type": "llama", **SIZES[run.size]})
    wl = Workload(task="infer", context=run.prompt + run.new, batch=run.batch, prompt=run.prompt, dtype=run.dtype,
                  quant=run.quant)
    m = memory(cfg, hw, wl, checkpoint_dtype=run.ckpt)
    t_step, step_bytes = decode_step_seconds(cfg, hw, wl, run.prompt + run.new // 2)
    return {"peak_rss": m.peak_rss, "delta": m.peak_rss - m.runtime, "runtime": m.runtime,
            "weights": m.weights, "kv_cache": m.kv_cache, "activations": m.activations,
            "load_transient": m.load_transient, "decode_tok_s": 1 / t_step, "step_bytes": step_bytes,
            "prefill_tok_s": run.batch * run.prompt / prefill_seconds(cfg, hw, wl), "params": cfg.num_parameters()}


def predict_train(run: Run, hw) -> dict:
    from ember.config import ModelConfig
    from ember.planner import Workload, memory, train_tokens_per_second

    cfg = ModelConfig.from_dict({"model_type": "llama", **SIZES[run.size]})
    wl = Workload(task="tune", method=run.task, context=run.prompt, batch=run.batch, dtype=run.dtype,
                  grad_checkpointing=run.grad_ckpt)
    m = memory(cfg, hw, wl, checkpoint_dtype=run.ckpt)
    return {"peak_rss": m.peak_rss, "delta": m.peak_rss - m.runtime, "runtime": m.runtime, "weights": m.weights,
            "activations": m.activations, "training": m.training, "load_transient": m.load_transient,
            "detail": m.detail, "train_tok_s": train_tokens_per_second(cfg, hw, wl), "params": cfg.num_parameters()}


def write_checkpoint(folder: Path, size: str, dtype: str) -> None:
    import torch

    from bench.decode import write_checkpoint as write

    write(folder, SIZES[size], {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])


def _matches(run: Run, only: set[str] | None) -> bool:
    """``--only`` picks runs by size (``small``), task (``infer``, ``lora``, ``qlora``), ``train`` or quant (``int4``)."""
    if only is None:
        return True
    return bool({run.size, run.task, "train" if run.training else "infer", run.quant} & only)


def _row(run: Run, meas: dict, hw, cal, busy: float) -> dict:
    """Predictions for one measured run and their errors (speed: decode tok/s, or training tok/s)."""
    from ember import hardware

    row = {"run": run.name, **run.__dict__, "training": run.training, "measured": meas, "cpu_busy_before": busy}
    if run.training:
        pred = predict_train(run, hw)
        dt = "fp32" if run.dtype == "fp32" else run.dtype
        now = replace(cal, matmul_flops={**cal.matmul_flops, dt: meas["matmul_flops_now"]})
        pred_now = predict_train(run, hardware.apply_calibration(replace(hw, calibration=None), now))
        row.update(speed="train", speed_pred=pred["train_tok_s"], speed_meas=meas["train_tok_s"],
                   speed_pred_now=pred_now["train_tok_s"], roofline_tok_s=None)
    else:
        pred = predict(run, hw)
        now = hardware.Calibration.from_json(meas.pop("calibration_now"))
        now = replace(now, runtime_bytes=cal.runtime_bytes, fingerprint=cal.fingerprint)
        pred_now = predict(run, hardware.apply_calibration(replace(hw, calibration=None), now))
        row.update(speed="decode", speed_pred=pred["decode_tok_s"], speed_meas=meas["decode_tok_s"],
                   speed_pred_now=pred_now["decode_tok_s"],
                   roofline_tok_s=cal.copy_bandwidth / 2 / pred["step_bytes"])
        # names kept for earlier readers of plan_accuracy.json
        row.update(decode_tok_s_pred_now=pred_now["decode_tok_s"],
                   decode_err=pred["decode_tok_s"] / meas["decode_tok_s"] - 1,
                   decode_err_now=pred_now["decode_tok_s"] / meas["decode_tok_s"] - 1)
    row["predicted"] = pred
    row["peak_err"] = pred["peak_rss"] / meas["peak_rss"] - 1
    row["delta_err"] = pred["delta"] / max(1, meas["peak_rss"] - meas["base_rss"]) - 1
    row["speed_err"] = row["speed_pred"] / row["speed_meas"] - 1
    row["speed_err_now"] = row["speed_pred_now"] / row["speed_meas"] - 1
    row["within_target"] = abs(row["peak_err"]) <= PEAK_TARGET and abs(row["speed_err"]) <= SPEED_TARGET
    return row


PEAK_TARGET = 0.10   # peak memory within +-10%
SPEED_TARGET = 0.25  # decode (and training) tok/s within +-25%


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None,
                    help="comma-separated sizes (tiny, small, ...), tasks (infer, train, lora, qlora) and/or quant modes "
                         "(int8, int4, nf4) to run "
                         "(default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time runs by wall clock, or by process CPU time (with --threads 1: robust to other "
                         "processes sharing the cores, which only take turns with this one)")
    ap.add_argument("--remeasure", action="store_true", help="run `ember hw --measure` first even if stored")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the CPU idle")
    ap.add_argument("--out", default="bench/results/plan_accuracy.json")
    ap.add_argument("--dir", default=None, help="where to keep the random checkpoints (default: a temp dir)")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child_train(spec) if spec.get("task", "infer") != "infer" else child(spec)))
        return

    import torch

    from ember import calibrate, hardware

    torch.set_num_threads(args.threads)
    hw = hardware.detect("cpu")
    if hw.calibration is not None and hw.calibration.threads != args.threads:
        print(f"[plan_accuracy] stored calibration used {hw.calibration.threads} threads; re-measuring with "
              f"{args.threads}", file=sys.stderr)
        args.remeasure = True
    if args.remeasure or hw.calibration is None:
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        print("[plan_accuracy] measuring this machine (ember hw --measure)...", file=sys.stderr)
        calibrate.measure("cpu", threads=args.threads)
        hw = hardware.detect("cpu")
    cal = hw.calibration
    only = set(args.only.split(",")) if args.only else None
    runs = [r for r in RUNS if _matches(r, only)]
    rows, skipped = [], []
    tmp = tempfile.TemporaryDirectory(prefix="ember-plan-") if args.dir is None else None
    root = Path(args.dir or tmp.name)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        for run in runs:
            why = _available(run)
            if why:
                skipped.append((run.name, why))
                print(f"[skip] {run.name}: {why}", file=sys.stderr)
                continue
            folder = root / f"{run.size}-{run.ckpt}"
            if not (folder / "model.safetensors").exists():
                t = time.perf_counter()
                write_checkpoint(folder, run.size, run.ckpt)
                print(f"[plan_accuracy] wrote {folder.name} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            spec = {"folder": str(folder), "dtype": run.dtype, "quant": run.quant, "batch": run.batch,
                    "prompt": run.prompt, "new": run.new, "repeats": args.repeats, "threads": args.threads,
                    "clock": args.clock, "task": run.task, "grad_ckpt": run.grad_ckpt, "steps": run.steps}
            busy = wait_for_quiet(args.wait_quiet) if args.wait_quiet else _busy_fraction(0.5)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, env=env, cwd=ROOT)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                skipped.append((run.name, f"failed: {tail}"))
                print(f"[fail] {run.name}: {tail}", file=sys.stderr)
                continue
            row = _row(run, json.loads(line[0][7:]), hw, cal, busy)
            row["wall_s"] = time.perf_counter() - t
            rows.append(row)
            m, p = row["measured"], row["predicted"]
            print(f"[{len(rows):2d}] {run.name}: peak {m['peak_rss'] / MiB:.0f} MiB (pred {p['peak_rss'] / MiB:.0f}, "
                  f"{100 * row['peak_err']:+.1f}%), {row['speed']} {row['speed_meas']:.1f} tok/s "
                  f"(pred {row['speed_pred']:.1f}, {100 * row['speed_err']:+.1f}%; with the machine re-timed "
                  f"after the run {row['speed_pred_now']:.1f}, {100 * row['speed_err_now']:+.1f}%) "
                  f"[{row['wall_s']:.0f}s]", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()

    from ember.hardware import cpu_name

    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
               f"{args.clock} clock")
    print(f"\nPlanner accuracy on this machine ({machine}); {date.today()}")
    print(f"calibration: {cal.measured_at}; mv-bf16 {cal.stream['mv-bf16'][-1][1] / 1e9:.1f} GB/s at "
          f"{cal.stream['mv-bf16'][-1][0] / 2**30:.0f} GiB; matmul "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in cal.matmul_flops.items())
          + f"; runtime {cal.runtime_bytes / MiB:.0f} MiB")
    print("peak = VmHWM of a fresh process (load + generate, or load + training steps); delta = peak - RSS after "
          "imports; tok/s = decode tok/s per sequence (infer) or training tok/s (median step); re-timed = the "
          "prediction with this machine's speed measured again right after the run; roofline = copy bandwidth "
          f"(read half) / bytes per step. Targets: peak within +-{100 * PEAK_TARGET:.0f}%, tok/s within "
          f"+-{100 * SPEED_TARGET:.0f}%\n")
    head = ("| run | task | params | peak MiB pred / meas | err | delta MiB pred / meas | err | tok/s pred / meas | err "
            "| pred (re-timed) | err | % roofline | prefill tok/s pred / meas | CPU busy before | within target |")
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        roof = f"{100 * r['speed_meas'] / r['roofline_tok_s']:.0f}%" if r["roofline_tok_s"] else "-"
        prefill = "-" if r["training"] else f"{p['prefill_tok_s']:.0f} / {r['batch'] * r['prompt'] / m['prefill_s']:.0f}"
        task = r["task"] + (" +ckpt" if r["grad_ckpt"] else "")
        miss = [k for k, e, lim in (("peak", r["peak_err"], PEAK_TARGET), ("tok/s", r["speed_err"], SPEED_TARGET))
                if abs(e) > lim]
        print(f"| {r['run']} | {task} | {p['params'] / 1e6:.0f}M | {p['peak_rss'] / MiB:.0f} / {m['peak_rss'] / MiB:.0f} | "
              f"{100 * r['peak_err']:+.1f}% | {p['delta'] / MiB:.0f} / {(m['peak_rss'] - m['base_rss']) / MiB:.0f} | "
              f"{100 * r['delta_err']:+.1f}% | {r['speed_pred']:.1f} / {r['speed_meas']:.1f} | "
              f"{100 * r['speed_err']:+.1f}% | {r['speed_pred_now']:.1f} | {100 * r['speed_err_now']:+.1f}% | "
              f"{roof} | {prefill} | {100 * r['cpu_busy_before']:.0f}% | "
              f"{'yes' if not miss else 'no (' + ', '.join(miss) + ')'} |")
    if rows:
        for label, sel in (("inference", [r for r in rows if not r["training"]]),
                           ("training", [r for r in rows if r["training"]])):
            if not sel:
                continue
            ok_p = sum(abs(r["peak_err"]) <= PEAK_TARGET for r in sel)
            ok_s = sum(abs(r["speed_err"]) <= SPEED_TARGET for r in sel)
            ok_n = sum(abs(r["speed_err_now"]) <= SPEED_TARGET for r in sel)
            print(f"\n{label}: peak memory within +-10%: {ok_p}/{len(sel)} (worst "
                  f"{100 * max(abs(r['peak_err']) for r in sel):.1f}%); tok/s within +-25%: {ok_s}/{len(sel)} with "
                  f"the stored calibration (worst {100 * max(abs(r['speed_err']) for r in sel):.1f}%), {ok_n}/{len(sel)} "
                  f"with the machine re-timed after each run (worst {100 * max(abs(r['speed_err_now']) for r in sel):.1f}%)")
    for name, why in skipped:
        print(f"skipped: {name}: {why}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "calibration": cal.to_json(),
                               "targets": {"peak": PEAK_TARGET, "tok_s": SPEED_TARGET},
                               "rows": rows, "skipped": skipped}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
