"""``ember serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...``: the OpenAI HTTP API.

``python -m ember.server MODEL`` runs the same verb alone (:func:`main`). The server process itself
(HTTP thread, scheduler, signals) is :func:`ember.server.cli.serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ember.commands.common import add_model_args, display_name, load_from_args, resolve_model_args
from ember.commands.speculation import add_speculation_args, apply_speculation
from ember.errors import EmberError
from ember.server.cli import serve

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve MODEL over the OpenAI HTTP API (/v1/chat/completions with tools, /v1/completions, "
                    "/v1/responses, /v1/embeddings, /v1/models), Anthropic's /v1/messages, /health and /metrics, "
                    "and a chat page at /. Binds 127.0.0.1 unless --host says otherwise; nothing leaves the machine.")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $EMBER_API_KEY, else none)")
    p.add_argument("--model-name", default=None,
                   help="name clients use for the model (default: the name given, or the folder/file name of a path)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences allowed to wait for a batch slot; more get 429 (default 64)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: from the planner: what memory is left after the weights and "
                        "activations, at most max-batch full contexts; startup fails if not even one sequence fits)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens read per step while others decode (default 256)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM; then they end with "
                        "finish_reason 'length' (default 10)")
    p.add_argument("--pooling", choices=["mean", "last"], default=None,
                   help="/v1/embeddings pooling (default: the checkpoint's sentence-transformers 1_Pooling config, "
                        "else mean)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the API only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_speculation_args(p)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGINT/SIGTERM."""
    _setup_logging(args.log_level)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"ember serve: warning: binding {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)
    engine = load_engine(args)
    settings = server_settings(args)
    off = getattr(engine.model, "offload", None)
    if off is not None and settings.num_blocks is None:  # the weights are not all in memory: the KV pool gets the
        settings.kv_memory_bytes = off.reserve_bytes or None  # share of the budget the offload plan kept for it
    serve(engine, settings, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level)
    return 0


def load_engine(args: argparse.Namespace):
    """The model, loaded as every verb loads one; the planner checks ``--max-batch`` x ``--context`` fits first.

    Raises:
        InsufficientMemoryError: before anything is allocated, with what would fit.
    """
    engine = load_from_args(args, batch=args.max_batch)
    apply_speculation(args, engine)
    return engine


def server_settings(args: argparse.Namespace):
    """The :class:`~ember.server.app.ServerSettings` for parsed ``serve`` arguments."""
    from ember.server.app import ServerSettings  # FastAPI loads only when a server is made

    resolve_model_args(args)
    return ServerSettings(model_name=args.model_name or display_name(args), api_key=args.api_key,
                          max_batch=args.max_batch, max_queue=args.max_queue, num_blocks=args.kv_blocks,
                          block_size=args.block_size, prefill_chunk=args.prefill_chunk, context=args.context,
                          quant=args.quant, max_memory=args.max_memory, model_dir=str(args.model),
                          pooling=args.pooling, ui=not args.no_ui)


def _setup_logging(level: str) -> None:
    log = logging.getLogger("ember")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(h)
    log.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    """``python -m ember.server``: the serve verb on its own."""
    parser = argparse.ArgumentParser(prog="ember serve", description="Serve MODEL over the OpenAI HTTP API.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
