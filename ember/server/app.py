"""The HTTP server: a FastAPI app over a :class:`~ember.scheduler.BatchScheduler`, one module per API.

Routes (each module's ``register`` adds its own; see :data:`API_MODULES`):

- :mod:`~ember.server.openai_api`: ``GET /v1/models``, ``POST /v1/chat/completions`` (tools, reasoning),
  ``POST /v1/completions``;
- :mod:`~ember.server.responses`: ``POST /v1/responses`` (OpenAI Responses API);
- :mod:`~ember.server.anthropic`: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``;
- :mod:`~ember.server.embeddings`: ``POST /v1/embeddings``;
- here: ``GET /health`` (JSON with queue and KV block gauges) and ``GET /metrics`` (Prometheus text).

Errors use the API's own shape (OpenAI's ``{"error": {"message", "type", "param", "code"}}``, Anthropic's
``{"type": "error", "error": {...}}`` on ``/v1/messages``): 400 for a bad field (named), 401 for a
missing/wrong API key, 404 for an unknown model, 429 with ``Retry-After`` when the queue is full for
now, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.engine import Engine
from ember.errors import EmberError
from ember.server import anthropic, embeddings, openai_api, responses
from ember.server.core import EmberServer, dispatch
from ember.server.errors import APIError, AuthMiddleware, error_response, validation_message
from ember.server.ui import mount_ui
from ember.server.settings import (MIN_SEQ_TOKENS, KVPoolPlan, ServerSettings, kv_block_bytes, kv_pool_blocks,
                                   plan_kv_pool)

log = logging.getLogger("ember.server")

# The modules whose routes the app serves; each has register(app, server).
API_MODULES = (openai_api, responses, anthropic, embeddings)

__all__ = ["API_MODULES", "MIN_SEQ_TOKENS", "EmberServer", "KVPoolPlan", "ServerSettings", "create_app",
           "kv_block_bytes", "kv_pool_blocks", "plan_kv_pool"]


def create_app(engine: Engine, settings: ServerSettings, scheduler_thread: bool = True) -> FastAPI:
    """The FastAPI app serving ``engine``; its scheduler runs between app startup and shutdown.

    Args:
        engine: a loaded model (:func:`ember.load`).
        settings: name, API key, batch/queue limits and KV cache size.
        scheduler_thread: start the scheduler loop in its own thread at startup. False when the caller
            runs ``app.state.ember.scheduler.run()`` itself (``ember serve`` does, in the main thread).
    """
    server = EmberServer(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = server.loop = asyncio.get_running_loop()

        def deliver(events) -> None:
            try:
                loop.call_soon_threadsafe(dispatch, events)
            except RuntimeError:  # the loop closed (shutdown) while the scheduler finished a step: nobody listens
                pass

        server.scheduler.deliver = deliver
        if scheduler_thread:
            server.scheduler.start()
        log.info("ember serve: model %s ready (max batch %d, queue %d, %d KV blocks x %d tokens)",
                 settings.model_name, settings.max_batch, settings.max_queue, server.scheduler.pool.capacity,
                 settings.block_size)
        try:
            yield
        finally:
            server.scheduler.stop()
            log.info("ember serve: scheduler stopped")

    app = FastAPI(title="Ember", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ember = server
    if settings.api_key:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    if settings.ui:
        mount_ui(app)  # after the API-key check: the page loads without the key, then asks for it
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        body = server.health()
        return JSONResponse(body, status_code=503) if body["status"] == "rank_lost" else body

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.prometheus())

    for module in API_MODULES:
        module.register(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        message, param = validation_message(errs[0]) if errs else ("invalid request", None)
        if len(errs) > 1:
            message += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error_response(400, message, param=param, code="invalid_value", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(EmberError)
    async def _ember(request: Request, exc: EmberError) -> JSONResponse:
        return error_response(400, str(exc), path=request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", path=request.url.path)
