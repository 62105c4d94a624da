"""``ember generate MODEL PROMPT``: the completion on stdout as it is generated, a summary line on stderr."""

from __future__ import annotations

import argparse
import sys

from ember.commands.common import add_model_args, add_sampling_args, load_from_args, offload_summary, sampling_params
from ember.commands.speculation import add_speculation_args, apply_speculation


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate``; returns its parser."""
    p = sub.add_parser("generate", help="complete a prompt and print the text",
                       description="Complete PROMPT with MODEL; text to stdout (streamed), summary to stderr.")
    add_model_args(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    add_sampling_args(p)
    add_speculation_args(p)
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the completion of PROMPT to stdout as it is generated; a summary line to stderr."""
    params = sampling_params(args, default_temperature=0.0)
    # a token is at least one byte of text for every tokenizer we load, so this bounds the prompt's tokens;
    # without -n the planner's default context (the model's, at most 4096) covers prompt + reply
    context = None if args.max_new_tokens is None else len(args.prompt.encode()) + 64 + args.max_new_tokens
    llm = load_from_args(args, context=context)
    apply_speculation(args, llm)
    stats = None
    for chunk in llm.stream(args.prompt, params, chat=args.chat):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats or stats
    sys.stdout.write("\n")
    if stats is not None and not args.quiet:
        print(f"[ember] {stats.summary()}", file=sys.stderr)
        if offload_summary(llm):
            print(f"[ember] {offload_summary(llm)}", file=sys.stderr)
    return 0
