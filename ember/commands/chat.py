"""``ember chat MODEL``: a multi-turn chat with the model's own template, from a terminal or a pipe.

A conversation never ends on the model's limits: when the history no longer fits the context (with
room left for a reply), the oldest turns are dropped (system messages are kept) and one line on
stderr says so; a turn that fails anyway (a single message longer than the context) is reported on
stderr and forgotten, and the chat goes on. ``/reset`` clears the history, ``/exit`` quits.

A reasoning model's thinking (gpt-oss's harmony ``analysis`` channel, or ``<think>`` blocks) is hidden unless
``--show-reasoning`` is given, then printed dimmed on a terminal and with a ``[reasoning]`` prefix per line
elsewhere; only the answer is kept in the history. ``--reasoning-effort`` is passed to the template as
``reasoning_effort`` (harmony's ``Reasoning: low|medium|high`` line).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ember.chat_formats import Delta, Harmony, OutputParser, detect_format, is_reasoning_template, prompt_in_reasoning
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
    p.add_argument("--show-reasoning", action="store_true",
                   help="print the model's reasoning (harmony analysis channel, <think> blocks), dimmed; "
                        "hidden by default")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                   help="reasoning_effort for the chat template (gpt-oss: how long it thinks; default: the template's)")
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
    turn = ChatTurn(llm, args.reasoning_effort)
    turn.render(system + [{"role": "user", "content": "hi"}])  # no chat template: fail now, not per turn
    # stop where the format ends a turn (harmony: the answer or a call), whatever generation_config.json says
    params.stop_token_ids = list(dict.fromkeys([*params.stop_token_ids, *turn.stop_ids]))
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
        dropped = fit_history(history, len(system), lambda h: len(turn.encode(h)[1]), budget)
        if dropped:
            print(f"[ember] the conversation outgrew the model's context of {context} tokens: dropped the oldest "
                  f"{dropped} turn{'s' if dropped > 1 else ''}", file=sys.stderr)
        try:
            reply = _answer(turn, history, params, args.verbose, interactive, args.show_reasoning)
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


class ChatTurn:
    """How one model's turns are rendered and read: template variables, and the parser of its output.

    Args:
        llm: the loaded engine.
        reasoning_effort: ``reasoning_effort`` for the template (None: not passed).
    """

    def __init__(self, llm, reasoning_effort: str | None = None) -> None:
        self.llm = llm
        tok = llm.tokenizer
        source = tok.chat_template_source() or ""
        self.harmony = Harmony().matches(source)
        self.reasoning = is_reasoning_template(source)
        self.kwargs = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
        if reasoning_effort is not None and "reasoning_effort" not in source:
            print("[ember] this model's chat template does not read reasoning_effort: --reasoning-effort has no "
                  "effect", file=sys.stderr)
        # the reasoning markers (Gemma 4 writes its own pair); they and harmony's are special tokens the
        # detokenizer drops, and the parser needs them back (tool-call markers stay dropped: chat runs no tools)
        fmt = detect_format(source)
        self.think, self.stop_ids = fmt.think, fmt.stop_ids(tok.token_to_id)
        wanted = fmt.special_markers if self.harmony else [m for m in fmt.special_markers if any(m in t for t in self.think)]
        self.markers = {}
        for text in wanted:
            tid = tok.token_to_id(text)
            if tid is not None and tok.decode([tid], skip_special_tokens=True) == "":
                self.markers[tid] = text

    def render(self, history: list[dict]) -> str:
        """The prompt text of ``history`` with the generation prompt."""
        return self.llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, **self.kwargs)

    def encode(self, history: list[dict]) -> tuple[str, list[int]]:
        """The prompt text and its token ids."""
        text = self.render(history)
        return text, self.llm.tokenizer.encode(text, add_special_tokens=False)

    def parser(self, prompt: str):
        """A fresh parser of one reply (None: every token is answer text)."""
        if self.harmony:
            return Harmony().output_parser(False)
        if self.reasoning:
            return OutputParser(None, True, prompt_in_reasoning(prompt, self.think), self.think)
        return None


class _Printer:
    """Writes a reply's answer to stdout; its reasoning only when shown, dimmed (terminal) or prefixed."""

    PREFIX = "[reasoning] "

    def __init__(self, show_reasoning: bool) -> None:
        self.show = show_reasoning
        self.tty = sys.stdout.isatty()
        self.kind = None        # the kind of the last text written ("reasoning" / "content")
        self.line_start = True  # the next character starts a line
        self.wrote = False

    def write(self, kind: str, text: str) -> None:
        if not text or (kind == "reasoning" and not self.show):
            return
        if kind != self.kind:
            text = text.lstrip()  # a block's leading whitespace is layout (detokenizers put a space after markers)
            if not text:
                return
            if self.kind == "reasoning" and self.tty:
                sys.stdout.write("\x1b[0m")
            if self.wrote and not self.line_start:
                sys.stdout.write("\n")
                self.line_start = True
            if kind == "reasoning" and self.tty:
                sys.stdout.write("\x1b[2m")
            self.kind = kind
        if kind == "reasoning" and not self.tty:
            lines = text.split("\n")
            text = "\n".join((self.PREFIX if (j or self.line_start) and (line or j < len(lines) - 1) else "") + line
                              for j, line in enumerate(lines))
        sys.stdout.write(text)
        sys.stdout.flush()
        self.wrote = True
        self.line_start = text.endswith("\n")

    def close(self) -> None:
        if self.kind == "reasoning" and self.tty:
            sys.stdout.write("\x1b[0m")


def _answer(turn: ChatTurn, history: list[dict], params, verbose: bool, interactive: bool,
            show_reasoning: bool = False) -> str:
    """Stream one reply to stdout; Ctrl-C in a terminal stops the reply (what was said is kept).

    Returns:
        the answer text (reasoning and tool-call markup left out), for the history.
    """
    prompt, ids = turn.encode(history)
    parser = turn.parser(prompt)
    out = _Printer(show_reasoning)
    reply, stats = "", None

    def emit(deltas) -> None:
        nonlocal reply
        for d in deltas:
            if d.kind in ("content", "reasoning"):
                out.write(d.kind, d.text)
                if d.kind == "content":
                    reply += d.text

    try:
        for chunk in turn.llm.stream(ids, params):
            text = turn.markers.get(chunk.token_id, chunk.text)
            emit(parser.feed(text) if parser is not None else [Delta("content", text)])
            stats = chunk.stats or stats
        if parser is not None:
            emit(parser.finish())
    except KeyboardInterrupt:
        if not interactive:
            raise
        print("\n[reply interrupted]", file=sys.stderr)
    finally:
        out.close()
        if out.wrote:
            sys.stdout.write("\n")
            sys.stdout.flush()
    if not out.wrote:
        sys.stdout.write("\n")  # one stdout line per answered turn, even an empty reply
        sys.stdout.flush()
    if stats is not None and verbose:
        print(f"[ember] {stats.summary()}", file=sys.stderr)
    return reply
