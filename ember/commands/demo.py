"""``ember demo``: build a tiny model locally (no downloads), generate and chat with it, then teach it facts with LoRA."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ember


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo``; returns its parser."""
    p = sub.add_parser("demo", help="build a tiny demo model locally and run it (no downloads)",
                       description="Train a tiny model on a bundled text (about a minute on 2 CPU cores), save it as a "
                                   "normal HF checkpoint folder, generate from it, then teach it a few facts with a LoRA "
                                   "fine-tune (about a minute more) and show answers before and after.")
    p.add_argument("--dir", default=os.environ.get("EMBER_DEMO_DIR", "ember-demo"), help="where to write the demo model")
    p.add_argument("--device", default="cpu")
    p.add_argument("-n", "--max-new-tokens", type=int, default=40)
    p.add_argument("--prompt", action="append", help="prompt to complete (repeatable)")
    p.add_argument("--no-tune", action="store_true", help="skip the fine-tuning step")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a small demo checkpoint locally (no downloads) and generate from it."""
    from ember.demo import build_demo_checkpoint  # the tokenizer/model trainer loads only for this verb

    folder = Path(args.dir)
    print(f"[ember demo] building a demo model in {folder} (no downloads; reused if present)", file=sys.stderr)
    build_demo_checkpoint(folder, progress=True)
    llm = ember.load(folder, device=args.device, dtype="fp32")
    print(f"[ember demo] loaded {folder}: {llm.config.model_type}, "
          f"{llm.config.num_parameters() / 1e6:.2f}M parameters", file=sys.stderr)
    for prompt in args.prompt or ["The sea", "In the little town"]:
        print(f"\n$ ember generate {folder} {prompt!r} -n {args.max_new_tokens}", file=sys.stderr)
        stats = None
        sys.stdout.write(prompt)
        for chunk in llm.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=0.0):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            stats = chunk.stats or stats
        sys.stdout.write("\n")
        if stats:
            print(f"[ember] {stats.summary()}", file=sys.stderr)
    question = "What is the sea like?"
    print(f"\n$ ember chat {folder}   (one turn: {question!r})", file=sys.stderr)
    res = llm.generate([{"role": "user", "content": question}], max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(res.text)
    if not args.no_tune:
        from ember.train.demo import tune_demo  # the fine-tuning stack loads only when it is used

        print(f"\n$ ember tune {folder} --data <bundled facts.jsonl> -o {folder / 'facts-lora'}", file=sys.stderr)
        tune_demo(folder, device=args.device, max_new_tokens=args.max_new_tokens)
    print(f"\n[ember demo] done. Try: ember chat {folder}", file=sys.stderr)
    return 0
