"""``ember chat MODEL``: a multi-turn chat with the model's own template, from a terminal or a pipe.

A conversation never ends on the model's limits: when the history no longer fits the context (with
room left for a reply), the oldest turns are dropped (system messages are kept) and one line on
stderr says so; a turn that fails anyway (a single message longer than the context) is reported on
stderr and forgotten, and the chat goes on. ``/reset`` clears the history, ``/exit`` quits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ember.commands.common import add_model_args, add_sampling_args, load_from_args, sampling_params
from ember.commands.speculation import add_speculation_args, apply_speculation
from ember.errors import EmberError
from ember.sampling import DEFAULT_MAX_NEW_TOKENS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``chat``; returns its parser."""
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with MODEL using its chat template. Reads lines from a terminal or a pipe; "
                                   "/reset clears the history, /exit quits. When the conversation outgrows the "
                                   "model's context the oldest turns are dropped (the system message is kept).")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed after each reply")
    add_sampling_args(p)
    add_speculation_args(p)
    p.set_defaults(func=cmd_chat)
    return p


def reply_reserve(context: int, max_new_tokens: int | None) -> int:
    """Tokens of the context kept free for a reply: ``-n`` when given, else a quarter of the context (at most 4096)."""
    return max_new_tokens if max_new_tokens is not None else min(context // 4, DEFAULT_MAX_NEW_TOKENS)


def fit_history(history: list[dict], keep: int, count: Callable[[list[dict]], int], budget: int) -> int:
    """Drop the oldest turns of ``history`` (in place) until ``count(history) <= budget``.

    The first ``keep`` messages (the system prompt) and the last one (the new user message) are never
    dropped; a turn is a user message with the replies after it, so roles keep alternating.

    Returns:
        how many turns were dropped.
    """
    turns = 0
    while len(history) - keep > 1 and count(history) > budget:
        del history[keep]
        while len(history) - keep > 1 and history[keep]["role"] != "user":
            del history[keep]
        turns += 1
    return turns


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat until EOF or /exit; exit status 1 if any turn failed (each failure was reported on stderr)."""
    params = sampling_params(args, default_temperature=0.7)
    llm = load_from_args(args)
    apply_speculation(args, llm)
    context = llm.config.max_position_embeddings
    budget = context - reply_reserve(context, args.max_new_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    llm.encode_prompt(system + [{"role": "user", "content": "hi"}])  # no chat template: fail now, not per turn
    history = list(system)
    interactive = sys.stdin.isatty()
    failed = False
    if interactive:
        print("Chat with the model. /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() in ("/exit", "/quit", "/bye"):
            return 1 if failed else 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        dropped = fit_history(history, len(system), lambda h: len(llm.encode_prompt(h)), budget)
        if dropped:
            print(f"[ember] the conversation outgrew the model's context of {context} tokens: dropped the oldest "
                  f"{dropped} turn{'s' if dropped > 1 else ''}", file=sys.stderr)
        try:
            reply = _answer(llm, history, params, args.verbose, interactive)
        except EmberError as e:
            print(f"ember: error: {e}", file=sys.stderr)
            history.pop()  # forget the turn that failed; the session goes on
            failed = True
            continue
        history.append({"role": "assistant", "content": reply})


def _read_line(interactive: bool) -> str | None:
    """The next input line without its newline, or None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _answer(llm, history: list[dict], params, verbose: bool, interactive: bool) -> str:
    """Stream one reply to stdout; Ctrl-C in a terminal stops the reply (what was said is kept)."""
    reply, stats = "", None
    try:
        for chunk in llm.stream(history, params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            reply += chunk.text
            stats = chunk.stats or stats
    except KeyboardInterrupt:
        if not interactive:
            raise
        print("\n[reply interrupted]", file=sys.stderr)
    finally:
        if reply:
            sys.stdout.write("\n")
            sys.stdout.flush()
    if not reply:
        sys.stdout.write("\n")  # one stdout line per answered turn, even an empty reply
        sys.stdout.flush()
    if stats is not None and verbose:
        print(f"[ember] {stats.summary()}", file=sys.stderr)
    return reply
