"""``--speculate``, ``--draft`` and ``--num-speculative``: the speculative-decoding options of generate, chat, serve."""

from __future__ import annotations

import argparse

import ember
from ember import distributed
from ember.speculative import METHODS


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    """Register the speculation options (docs/speculative.md)."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculate", choices=METHODS, default=None,
                   help="propose tokens and verify several per weight pass: ngram (prompt lookup, no second "
                        "model), draft (--draft MODEL) or mtp (the checkpoint's MTP heads); greedy output is "
                        "unchanged, sampled output keeps its distribution")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model sharing MODEL's tokenizer that proposes tokens (implies --speculate draft)")
    g.add_argument("--num-speculative", type=int, default=None, metavar="K",
                   help="most proposed tokens per pass (default 4; adapted to the measured acceptance)")


def apply_speculation(args: argparse.Namespace, llm) -> None:
    """Turn on what the options ask for on the loaded engine ``llm`` (loading the draft like the model).

    Raises:
        GenerationError: a family that cannot speculate, or a draft with another vocabulary.
    """
    method, draft = args.speculate, None
    if (method is not None or args.draft is not None) and distributed.current() is not None:
        raise SystemExit("ember: speculative decoding runs in one process; drop --speculate/--draft, or run "
                         "without --pp/--tp")
    if args.draft is not None:
        if method not in (None, "draft"):
            raise SystemExit(f"ember: --draft goes with --speculate draft, not --speculate {method}")
        method = "draft"
        draft = ember.load(args.draft, device=args.device, dtype=args.dtype, check_memory=False)
    elif method == "draft":
        raise SystemExit("ember: --speculate draft needs --draft MODEL")
    if method is None:
        if args.num_speculative is not None:
            raise SystemExit("ember: --num-speculative needs --speculate or --draft")
        return
    llm.speculate(method, draft=draft, num_speculative=args.num_speculative)
