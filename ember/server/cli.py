"""The ``serve`` verb: ``ember serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...``.

``ember.cli`` registers it with :func:`add_parser`; ``python -m ember.server MODEL`` runs it alone.
SIGINT/SIGTERM stop accepting connections, let in-flight requests finish for up to
``--shutdown-timeout`` seconds, then end what is left as if it had reached its token limit (each
client still gets a complete answer: ``finish_reason: "length"``, streams their final event and
``[DONE]``), stop the scheduler and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve MODEL over the OpenAI HTTP API (/v1/chat/completions with tools, /v1/completions, "
                    "/v1/responses, /v1/embeddings, /v1/models), Anthropic's /v1/messages, /health and /metrics. "
                    "Binds 127.0.0.1 unless --host says otherwise; nothing leaves the machine.")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ember.cli import add_model_args

    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $EMBER_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="name clients use for the model (default: the folder name)")
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


def cmd_serve(args) -> int:
    """Load the model and serve it until SIGINT/SIGTERM."""
    _setup_logging(args.log_level)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"ember serve: warning: binding {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)
    engine = load_engine(args)
    serve(engine, server_settings(args), host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level)
    return 0


def load_engine(args):
    """``ember.load`` with the model options; the planner checks ``--max-batch`` x ``--context`` fits first.

    Raises:
        InsufficientMemoryError: before anything is allocated, with what would fit.
    """
    import ember
    from ember.quant.quantize import DEFAULT_LM_HEAD

    # getattr: the options come from ember.cli.add_model_args, which may not offer all of them
    return ember.load(args.model, device=args.device, dtype=args.dtype, quant=getattr(args, "quant", None),
                      group_size=getattr(args, "group_size", None), adapter=getattr(args, "adapter", None),
                      context=getattr(args, "context", None), batch=args.max_batch,
                      max_memory=getattr(args, "max_memory", None), lm_head=getattr(args, "lm_head", DEFAULT_LM_HEAD))


def server_settings(args):
    """The :class:`~ember.server.app.ServerSettings` for parsed ``serve`` arguments."""
    from ember.server.app import ServerSettings

    name = args.model_name or os.path.basename(os.path.normpath(str(args.model)))
    return ServerSettings(model_name=name, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, num_blocks=args.kv_blocks, block_size=args.block_size,
                          prefill_chunk=args.prefill_chunk, context=getattr(args, "context", None),
                          quant=getattr(args, "quant", None), max_memory=getattr(args, "max_memory", None),
                          model_dir=str(args.model), pooling=getattr(args, "pooling", None),
                          ui=not getattr(args, "no_ui", False))


def serve(engine, settings, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
          log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM: HTTP in a helper thread, the batch scheduler in this (main) thread.

    The scheduler gets the main thread because PyTorch's CPU kernels run faster there (see
    :meth:`ember.scheduler.BatchScheduler.run`). A first signal shuts down gracefully (in-flight
    requests get ``shutdown_timeout`` seconds), a second one forces the exit.
    """
    import uvicorn

    from ember.server.app import create_app

    app = create_app(engine, settings, scheduler_thread=False)
    # uvicorn's own limit comes after ours: by then every request has been ended (expire_all) and answered.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + _ANSWER_SECONDS, lifespan="on",
                            server_header=False)
    server = _Server(config)
    http = threading.Thread(target=server.run, name="ember-http", daemon=True)
    ember_server = app.state.ember

    def on_signal(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        loop = ember_server.loop
        if loop is not None and not ember_server.draining:
            try:
                loop.call_soon_threadsafe(begin_drain, ember_server, shutdown_timeout)
            except RuntimeError:  # the loop already closed
                pass

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        http.start()
        app.state.ember.scheduler.run(until=lambda: not http.is_alive())
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(1)  # uvicorn could not bind (it logged why)


# Seconds after --shutdown-timeout for the ended requests' answers to be written before uvicorn gives up.
_ANSWER_SECONDS = 5.0


def begin_drain(server, timeout: float) -> None:
    """On the event loop: refuse new requests (503) and, after ``timeout`` seconds, end the open ones."""
    server.draining = True
    server.loop.call_later(timeout, server.expire_all)


def _setup_logging(level: str) -> None:
    log = logging.getLogger("ember")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(h)
    log.setLevel(level.upper())


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"ember serve: listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
                if self.config.app.state.ember.settings.ui:
                    print(f"ember serve: chat page at http://{host}:{port}/", file=sys.stderr, flush=True)

    return Server


def _Server(config):  # noqa: N802 - a class made on demand so importing this module stays light
    return _server_class()(config)


def main(argv: list[str] | None = None) -> int:
    """``python -m ember.server``: the serve verb on its own."""
    from ember.errors import EmberError

    parser = argparse.ArgumentParser(prog="ember serve", description=add_parser.__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
