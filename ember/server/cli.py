"""The server process: HTTP (uvicorn) in a helper thread, the batch scheduler in the main thread.

:func:`serve` runs until SIGINT/SIGTERM: it stops accepting connections, lets in-flight requests
finish for up to ``shutdown_timeout`` seconds, then ends what is left as if it had reached its token
limit (each client still gets a complete answer: ``finish_reason: "length"``, streams their final
event and ``[DONE]``), stops the scheduler and exits 0. A multi-process run that loses a rank cannot
generate again: every open and new request is answered 503 naming the rank, and the server exits with
that error (as vLLM's does when its engine dies), for a supervisor to restart it.
The ``serve`` verb that parses the command line and loads the model is :mod:`ember.commands.serve`.
"""

from __future__ import annotations

import signal
import sys
import threading


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
        scheduler = app.state.ember.scheduler
        scheduler.run(until=lambda: not http.is_alive())
        if scheduler.broken is not None:  # a rank is gone: answer what is open (503), then exit with its error
            server.should_exit = True
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(1)  # uvicorn could not bind (it logged why)
    if scheduler.broken is not None:
        raise scheduler.broken


# Seconds after --shutdown-timeout for the ended requests' answers to be written before uvicorn gives up.
_ANSWER_SECONDS = 5.0


def begin_drain(server, timeout: float) -> None:
    """On the event loop: refuse new requests (503) and, after ``timeout`` seconds, end the open ones."""
    server.draining = True
    server.loop.call_later(timeout, server.expire_all)


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
