"""``ember eval ppl MODEL --text FILE``: perplexity by sliding windows (:func:`ember.evaluate.perplexity`)."""

from __future__ import annotations

import argparse
import json
import sys

from ember.commands.common import add_model_args, load_from_args
from ember.errors import EvaluationError
from ember.evaluate import perplexity, read_text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` (with the ``ppl`` sub-verb) on the ``ember`` command's subparsers; returns ``eval``'s parser."""
    ev = subparsers.add_parser("eval", help="evaluate a model (ppl: perplexity on a text file)",
                               description="Evaluate MODEL. `ember eval ppl MODEL --text FILE` prints its perplexity.")
    verbs = ev.add_subparsers(dest="eval_verb", metavar="WHAT")
    ev.set_defaults(func=lambda args: (ev.print_help(sys.stderr), 2)[1])

    p = verbs.add_parser(
        "ppl", help="perplexity on a text file (sliding windows)",
        description="Perplexity of MODEL on the text of FILE, tokenized with the model's tokenizer (no chat "
                    "template; BOS as its post-processor adds). Windows of --window tokens start every --stride "
                    "tokens; each scores only the tokens the previous one did not, with the rest as context.")
    add_model_args(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=256,
                   help="tokens between window starts; each window scores its last STRIDE tokens (default 256)")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ppl)
    return ev


def cmd_ppl(args: argparse.Namespace) -> int:
    """Handler of ``ember eval ppl``: a progress bar on stderr, the result line (or JSON) on stdout."""
    text = read_text(args.text)  # before loading: a wrong path fails fast
    if args.max_tokens is not None and args.max_tokens < 2:
        raise EvaluationError(f"--max-tokens {args.max_tokens}: perplexity needs at least 2 tokens")
    llm = load_from_args(args, context=args.window, batch=max(1, args.batch))
    ids = llm.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    res = perplexity(llm.model, ids, window=args.window, stride=args.stride, batch=args.batch,
                     progress=not args.quiet)
    if args.json:
        print(json.dumps({"model": args.model_spec, "text": str(args.text), "quant": args.quant or "none",
                          "dtype": str(llm.dtype).removeprefix("torch."), **res}))
    else:
        print(f"perplexity {res['ppl']:.2f} over {res['tokens']} tokens "
              f"({res['windows']} windows of {res['window']}, stride {res['stride']})")
    return 0
