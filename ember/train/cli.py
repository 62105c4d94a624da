"""argparse wiring for ``ember tune`` and ``ember merge``; :func:`add_parser` registers both verbs."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tune`` and ``merge`` on the ``ember`` command's subparsers."""
    p = subparsers.add_parser(
        "tune", help="fine-tune a model on a JSONL file (LoRA, QLoRA or full)",
        description="Fine-tune MODEL on local JSONL data ({\"messages\": [...]}, {\"prompt\", \"completion\"} or "
                    "{\"text\"} per line). Writes a PEFT-format adapter (or a full checkpoint), metrics.jsonl, "
                    "loss.png and resumable checkpoints to OUT_DIR.")
    p.add_argument("model", help="model folder (HF checkpoint with tokenizer.json)")
    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("--eval", default=None, help="held-out data, JSONL: eval loss every --eval-every steps")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder (empty, or the run to --resume)")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"],
                   help="lora: adapters over the frozen model; qlora: adapters over an NF4-quantized model; "
                        "full: train every weight (default lora)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16, help="adapter rank r (default 16)")
    g.add_argument("--alpha", type=float, default=32.0, help="scaling numerator; scaling = alpha / r (default 32)")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    g.add_argument("--targets", default="all-linear",
                   help="all-linear (every projection but lm_head), or names: q_proj,v_proj,... (default all-linear)")
    g = p.add_argument_group("schedule")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    g.add_argument("--batch", type=int, default=1, help="rows per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seq-len", type=int, default=2048, help="longest row in tokens (default 2048)")
    g.add_argument("--warmup", type=float, default=0.0,
                   help="warmup steps, or a fraction of all steps when below 1 (default 0)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                   help="decay after warmup (default cosine)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    g.add_argument("--seed", type=int, default=0, help="adapter init, data order and dropout (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--pack", action="store_true", help="pack short examples into full rows (attention stays per example)")
    g.add_argument("--train-on-prompt", action="store_true",
                   help="loss on every token, not just assistant turns / completions")
    g.add_argument("--drop-long", action="store_true", help="drop examples longer than --seq-len (default: truncate)")
    g = p.add_argument_group("run")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (default: only at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: none)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its newest checkpoint")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto = bf16 where the device runs it natively, else fp32")
    g.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="refuse to start if the plan needs more than this many GiB (default: what is free)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser(
        "merge", help="merge a LoRA adapter into its base model",
        description="Write BASE + ADAPTER as one HF checkpoint folder (weights in the base's dtype).")
    p.add_argument("base", help="base model folder")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors; Ember or PEFT)")
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_merge)


def config_from_args(args: argparse.Namespace):
    """The :class:`~ember.train.trainer.TrainConfig` that ``ember tune``'s options describe."""
    from ember.train.trainer import TrainConfig

    return TrainConfig(
        method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
        steps=args.steps, epochs=args.epochs, lr=args.lr, batch=args.batch, grad_accum=args.grad_accum,
        seq_len=args.seq_len, warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, pack=args.pack, grad_checkpoint=args.grad_checkpoint,
        loss_on="all" if args.train_on_prompt else "assistant", overlong="drop" if args.drop_long else "truncate",
        eval_every=args.eval_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, dtype=args.dtype,
    )


def cmd_tune(args: argparse.Namespace) -> int:
    """Run ``ember tune``."""
    from ember.train.tune import tune

    tune(args.model, args.data, args.out, config_from_args(args), eval_data=args.eval, resume=args.resume,
         device=args.device, progress=not args.quiet, max_memory=args.max_memory)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Run ``ember merge``."""
    from ember.train.tune import merge_checkpoint

    out = merge_checkpoint(args.base, args.adapter, args.out, overwrite=args.overwrite)
    print(f"[ember merge] wrote {out}", file=sys.stderr)
    return 0
