"""The ``ember`` command.

Each verb is a function ``cmd_<verb>(args)``; ``main`` maps :class:`ember.errors.EmberError`
to a one-line message on stderr and exit code 1 (no traceback for a user's mistake).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ember.errors import EmberError


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --device, --dtype, --quant, --adapter and memory limits: shared by every verb that loads a model."""
    from ember.quant.quantize import DEFAULT_LM_HEAD, LM_HEAD_CHOICES

    p.add_argument("model", help="HF checkpoint folder (config.json, *.safetensors, tokenizer.json) or a .gguf file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype; auto = checkpoint dtype, bf16 only where the device runs it natively")
    p.add_argument("--quant", default=None, choices=["none", "int8", "int4", "nf4", "mxfp4"],
                   help="weight-only quantization on load, layer by layer (a folder from `ember quantize` needs none)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128], help="int4 group size (default 128)")
    p.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=LM_HEAD_CHOICES,
                   help="with --quant: format of an untied LM head (default int8, as llama.cpp keeps its output "
                        "matrix at 6-8 bits; none keeps it in --dtype, as bitsandbytes does)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter folder (from `ember tune` or HF PEFT), applied without merging")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="refuse to load if the plan needs more than this many GiB (default: what is free)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence to plan memory for (default: prompt + new tokens, or min(model limit, 4096))")


def _add_sampling_args(p: argparse.ArgumentParser, default_max: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-new-tokens", type=int, default=default_max, help=f"tokens to generate (default {default_max})")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: 0 for generate, 0.7 for chat)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="extra stop token id (repeatable); EOS ids from the checkpoint always stop")


def _sampling(args, default_temperature: float):
    from ember.sampling import SamplingParams

    temperature = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        stop_token_ids=list(args.stop_token_id),
    )


def load_from_args(args, context: int | None = None, batch: int = 1):
    """``ember.load`` with the options of :func:`add_model_args`; the planner checks the fit first."""
    import ember

    return ember.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant, group_size=args.group_size,
                      adapter=args.adapter, context=args.context or context, batch=batch, max_memory=args.max_memory,
                      lm_head=args.lm_head)


def cmd_generate(args) -> int:
    """Print the completion of PROMPT to stdout as it is generated; a summary line to stderr."""
    # a token is at least one byte of text for every tokenizer we load, so this bounds the prompt's tokens
    llm = load_from_args(args, context=len(args.prompt.encode()) + 64 + args.max_new_tokens)
    params = _sampling(args, default_temperature=0.0)
    stats = None
    for chunk in llm.stream(args.prompt, params, chat=args.chat):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats or stats
    sys.stdout.write("\n")
    if stats is not None and not args.quiet:
        print(f"[ember] {stats.summary()}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Multi-turn chat with the model's own template; /reset clears history, /exit quits."""
    llm = load_from_args(args)
    params = _sampling(args, default_temperature=0.7)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    system = list(history)
    if interactive:
        print("Chat with the model. /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        stats = None
        for chunk in llm.stream(history, params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            reply += chunk.text
            stats = chunk.stats or stats
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
        if stats is not None and args.verbose:
            print(f"[ember] {stats.summary()}", file=sys.stderr)


def cmd_demo(args) -> int:
    """Build a small demo checkpoint locally (no downloads) and generate from it."""
    from ember.demo import build_demo_checkpoint

    folder = Path(args.dir)
    print(f"[ember demo] building a demo model in {folder} (no downloads; reused if present)", file=sys.stderr)
    build_demo_checkpoint(folder, progress=True)
    import ember

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
        from ember.train.demo import tune_demo

        print(f"\n$ ember tune {folder} --data <bundled facts.jsonl> -o {folder / 'facts-lora'}", file=sys.stderr)
        tune_demo(folder, device=args.device, max_new_tokens=args.max_new_tokens)
    print(f"\n[ember demo] done. Try: ember chat {folder}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ember import __version__

    parser = argparse.ArgumentParser(prog="ember", description="Run large language models locally. Nothing leaves the machine.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("generate", help="complete a prompt and print the text",
                       description="Complete PROMPT with MODEL; text to stdout (streamed), summary to stderr.")
    add_model_args(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    _add_sampling_args(p, default_max=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with MODEL using its chat template. Reads lines from a terminal or a pipe; "
                                   "/reset clears the history, /exit quits.")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed after each reply")
    _add_sampling_args(p, default_max=512)
    p.set_defaults(func=cmd_chat)

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

    from ember.evaluate import add_parser as add_eval_parser
    from ember.plan_cli import add_parser as add_plan_parser
    from ember.quant.cli import add_parser as add_quantize_parser
    from ember.server.cli import add_parser as add_serve_parser
    from ember.train.cli import add_parser as add_tune_parser

    add_serve_parser(sub)
    add_tune_parser(sub)  # tune, merge
    add_quantize_parser(sub)
    add_eval_parser(sub)  # eval ppl
    add_plan_parser(sub)  # plan, hw
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
