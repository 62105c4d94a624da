"""The ``ember`` command: registers the verbs and runs one.

Each verb lives in its own module (:mod:`ember.commands` for generate, chat, demo, list, eval, serve, export;
:mod:`ember.plan_cli`, :mod:`ember.train.cli`, :mod:`ember.quant.cli` for the others) with an
``add_parser(subparsers)`` that sets ``args.func``. :func:`main` turns a model *name* into its path
for every verb (:func:`ember.commands.common.resolve_model_args`), runs the verb, and maps an
:class:`ember.errors.EmberError` to a one-line message on stderr and exit code 1 (no traceback for a
user's mistake).
"""

from __future__ import annotations

import argparse
import sys

from ember import __version__, catalog, distributed
from ember.commands import chat, demo, export, generate, list_models, serve
from ember.commands import eval as eval_cmd
from ember.commands.common import add_model_args, load_from_args, resolve_model_args
from ember.errors import EmberError, ModelNotFoundError
from ember.plan_cli import add_parser as add_plan_parser
from ember.quant.cli import add_parser as add_quantize_parser
from ember.train.cli import add_parser as add_tune_parser

__all__ = ["add_model_args", "build_parser", "load_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``ember`` argument parser with every verb."""
    parser = argparse.ArgumentParser(prog="ember", description="Run large language models locally. Nothing leaves the machine.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    generate.add_parser(sub)
    chat.add_parser(sub)
    list_models.add_parser(sub)
    demo.add_parser(sub)
    serve.add_parser(sub)
    add_tune_parser(sub)  # tune, merge
    add_quantize_parser(sub)
    export.add_parser(sub)  # export --gguf
    eval_cmd.add_parser(sub)  # eval ppl
    add_plan_parser(sub)  # plan, hw
    return parser


def _resolve(args: argparse.Namespace) -> None:
    """Model names to paths; ``plan`` also takes a catalog name that is not on this machine."""
    try:
        resolve_model_args(args)
    except ModelNotFoundError as e:
        if args.verb != "plan":
            raise
        if catalog.find(args.model) is None:
            names = ", ".join(catalog.names())
            raise ModelNotFoundError(f"{e}; `ember plan` also takes a catalog name: {names}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the ``ember`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _resolve(args)
        if distributed.requested(args):  # --pp/--tp, or one worker of torchrun
            return distributed.run(args, sys.argv[1:] if argv is None else list(argv), load_from_args)
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
