"""The OpenAI-compatible HTTP server: FastAPI routes over a :class:`~ember.scheduler.BatchScheduler`.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming
as server-sent events ending in ``data: [DONE]``, or not), ``GET /health`` (JSON with queue and KV
block gauges) and ``GET /metrics`` (the same, Prometheus text).

The scheduler steps in its own thread; each request's sequences report their tokens through
``loop.call_soon_threadsafe`` into an asyncio queue, one hop per scheduler step. A client that
disconnects (streaming or not) cancels its sequences, which frees their KV blocks at once.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field
(named in ``param``), 401 for a missing/wrong API key, 404 for an unknown model, 429 with
``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.config import ModelConfig
from ember.engine import Engine
from ember.errors import (ChatTemplateError, EmberError, GenerationError, InsufficientMemoryError, QueueFullError,
                          SamplingError, UnsupportedSchemaError)
from ember.hardware import GiB
from ember.json_constraint import JsonConstraint, JsonGrammar, TokenVocab, compile_json_schema
from ember.kv_cache import PagedKVCache
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqEvent, SeqRequest
from ember.server.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest,
                                   ChoiceLogprobs, Completion, CompletionChoice, CompletionLogprobs,
                                   CompletionRequest, ModelCard, ModelList, PromptTokensDetails, TokenLogprob,
                                   TopLogprob, Usage)
from ember.server.ui import mount_ui

log = logging.getLogger("ember.server")

FINGERPRINT = f"ember-{__version__}"

# The shortest sequence (prompt + completion, tokens) the KV pool must hold for a server to be worth starting;
# capped at the context. Below that, startup fails with what to change instead of serving 429s forever.
MIN_SEQ_TOKENS = 256


@dataclass
class ServerSettings:
    """How ``ember serve`` runs (see :func:`create_app`)."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    num_blocks: int | None = None       # KV blocks, scratch block included (default: sized by kv_pool_blocks)
    block_size: int = 16
    prefill_chunk: int = 256
    kv_memory_bytes: int | None = None  # KV pool budget in bytes (default: the planner's kv_budget_bytes)
    context: int | None = None          # tokens per sequence (--context; default the model's limit)
    quant: str | None = None            # what the model was loaded with (for the plan)
    max_memory: float | None = None     # GiB cap on the process (--max-memory)
    ui: bool = True                     # serve the chat page at / (--no-ui: off)


@dataclass(frozen=True)
class KVPoolPlan:
    """The paged KV pool the server allocates.

    Attributes:
        num_blocks: blocks allocated, the scratch block included (``capacity + 1``).
        block_size: tokens per block.
        block_bytes: bytes of one block over all layers, keys and values.
        budget_bytes: what the planner allowed for the pool; None when ``--kv-blocks`` fixed it.
    """

    num_blocks: int
    block_size: int
    block_bytes: int
    budget_bytes: int | None = None

    @property
    def capacity(self) -> int:
        """Blocks sequences can own (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        """The startup log line: ``KV pool: N blocks x 16 tokens = X GiB (from the plan: budget Y GiB)``."""
        src = "--kv-blocks" if self.budget_bytes is None else f"from the plan: budget {_gib(self.budget_bytes)}"
        return f"KV pool: {self.capacity} blocks x {self.block_size} tokens = {_gib(self.nbytes)} ({src})"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 2**20:.2f} MiB"  # tiny test models: MiB


def kv_block_bytes(cfg: ModelConfig, dtype, block_size: int) -> int:
    """Bytes of one KV block: 2 (K and V) x layers x kv_heads x head_dim x block_size x dtype bytes."""
    return PagedKVCache.bytes_per_token(cfg, dtype) * block_size


def kv_pool_blocks(cfg: ModelConfig, dtype, budget_bytes: int, max_batch: int, block_size: int,
                   context: int | None = None, min_tokens: int = MIN_SEQ_TOKENS) -> int:
    """Blocks to allocate for the paged KV pool from a byte budget (scratch block included).

    ``min(budget // block_bytes - 1, max_batch x ceil(context / block_size)) + 1``: as many blocks as
    the budget holds, but no more than ``max_batch`` full-context sequences can use.

    Args:
        cfg: the model.
        dtype: the cache's torch dtype (the server's :class:`PagedKVCache` uses the model's compute dtype).
        budget_bytes: bytes the pool may take (:func:`ember.planner.kv_budget_bytes`).
        max_batch: sequences decoded together.
        block_size: tokens per block.
        context: tokens per sequence (default the model's ``max_position_embeddings``).
        min_tokens: the pool must hold one sequence of ``min(context, min_tokens)`` tokens.
    Returns:
        ``num_blocks`` for :class:`PagedKVCache` (>= 2).
    Raises:
        InsufficientMemoryError: the budget does not hold even one minimal sequence.
    """
    ctx = context or cfg.max_position_embeddings
    per_block = kv_block_bytes(cfg, dtype, block_size)
    fit = budget_bytes // per_block - 1  # the scratch block is allocated too
    want = max_batch * math.ceil(ctx / block_size)
    need_tokens = min(ctx, min_tokens)
    need = math.ceil(need_tokens / block_size)
    if fit < need:
        raise InsufficientMemoryError(
            f"the KV cache needs at least {(need + 1) * per_block / 2**20:.1f} MiB ({need} blocks x {block_size} "
            f"tokens + 1 scratch block, for one {need_tokens}-token sequence) but the plan leaves "
            f"{max(0, budget_bytes) / 2**20:.1f} MiB after the weights and activations; free memory, raise "
            f"--max-memory, lower --max-batch or --prefill-chunk, use --quant, or set --kv-blocks")
    return min(fit, want) + 1


def plan_kv_pool(engine: Engine, settings: ServerSettings) -> KVPoolPlan:
    """The server's KV pool: ``--kv-blocks`` if given, else sized from the planner's budget.

    The model is already loaded, so the memory free now excludes its weights (``loaded=True``); with
    ``--max-memory`` the budget is also capped at that cap less the planned weights.
    """
    cfg, dtype, bs = engine.config, engine.dtype, settings.block_size
    per_block = kv_block_bytes(cfg, dtype, bs)
    if settings.num_blocks is not None:
        return KVPoolPlan(settings.num_blocks, bs, per_block)
    budget = settings.kv_memory_bytes
    if budget is None:
        from ember.planner import kv_budget_bytes

        kw = dict(quant=settings.quant, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk,
                  max_memory=settings.max_memory)
        budget = kv_budget_bytes(cfg, engine.device, dtype, loaded=True, **kw)
        if settings.max_memory is not None:  # the cap counts the weights too, free memory already excludes them
            budget = min(budget, kv_budget_bytes(cfg, engine.device, dtype, loaded=False, **kw))
    n = kv_pool_blocks(cfg, dtype, budget, settings.max_batch, bs, settings.context)
    return KVPoolPlan(n, bs, per_block, budget)


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------- per request


class _Job:
    """The sequences of one API request (n choices x prompts) and the queue their events arrive on."""

    def __init__(self, scheduler: BatchScheduler, reqs: list[SeqRequest]) -> None:
        self.scheduler = scheduler
        self.reqs = reqs
        self.queue: asyncio.Queue[tuple[int, SeqEvent]] = asyncio.Queue()
        self.open = set(range(len(reqs)))
        self.ids: list[int] = []
        for i, r in enumerate(reqs):
            r.tag = (self, i)

    def submit(self) -> None:
        self.ids = self.scheduler.submit(self.reqs)

    def cancel(self) -> None:
        """Cancel the sequences that have not finished (client gone, shutdown)."""
        for i in self.open:
            self.scheduler.cancel(self.ids[i])
        self.open.clear()

    async def batches(self) -> AsyncIterator[list[tuple[int, SeqEvent]]]:
        """Events as they come, grouped by what has arrived together; ends when every sequence finished."""
        while self.open:
            got = [await self.queue.get()]
            while not self.queue.empty():
                got.append(self.queue.get_nowait())
            for i, ev in got:
                if ev.finish_reason is not None:
                    self.open.discard(i)
            yield got


def _dispatch(events: list[tuple[SeqRequest, SeqEvent]]) -> None:
    for req, ev in events:
        job, i = req.tag
        job.queue.put_nowait((i, ev))


@dataclass
class _Choice:
    """What one sequence produced, accumulated from its events."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[SeqEvent] = field(default_factory=list)

    def add(self, ev: SeqEvent, keep_logprobs: bool) -> None:
        self.text += ev.text
        self.completion_tokens = ev.completion_tokens
        self.cached_tokens = ev.cached_tokens
        self.prompt_tokens = ev.prompt_tokens
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            self.error = ev.error
        if keep_logprobs and ev.logprob is not None:
            self.logprobs.append(ev)


# ----------------------------------------------------------------------------- the server


class EmberServer:
    """State shared by the routes: engine, scheduler, compiled JSON grammars, token bytes."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        limit = engine.config.max_position_embeddings
        self.context = min(settings.context, limit) if settings.context else limit
        self.kv_plan = plan_kv_pool(engine, settings)
        log.info("%s", self.kv_plan.describe())
        self.scheduler = BatchScheduler(engine, max_batch=settings.max_batch, max_queue=settings.max_queue,
                                        num_blocks=self.kv_plan.num_blocks, block_size=settings.block_size,
                                        prefill_chunk=settings.prefill_chunk)
        self.created = int(time.time())
        self._grammars: OrderedDict[str, JsonGrammar] = OrderedDict()
        self._vocab: TokenVocab | None = None
        self._vocab_lock = asyncio.Lock()

    # ------------------------------------------------------------ helpers
    async def vocab(self) -> TokenVocab:
        """Token bytes of the vocabulary (built once, off the event loop)."""
        async with self._vocab_lock:
            if self._vocab is None:
                self._vocab = await asyncio.to_thread(TokenVocab.from_tokenizer, self.tokenizer,
                                                      self.engine.config.vocab_size)
            return self._vocab

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           param="model", code="model_not_found")

    def grammar(self, schema: dict | None, where: str) -> JsonGrammar:
        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            try:
                g = compile_json_schema(schema, where)
            except UnsupportedSchemaError as e:
                raise APIError(400, str(e), param=where) from None
            self._grammars[key] = g
            if len(self._grammars) > 64:
                self._grammars.popitem(last=False)
        return g

    async def build_sequences(self, prompts: list[list[int]], req, max_tokens: int | None, default_max: int | None,
                              logprobs: int | None, response_format) -> list[SeqRequest]:
        """Validate limits and sampling fields; n sequences per prompt, choice index = prompt * n + j."""
        limit = self.scheduler.max_seq_tokens
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty: give at least one token of text", param="prompt")
            want = max_tokens if max_tokens is not None else (default_max or max(1, limit - len(ids)))
            if len(ids) + want > self.context:
                whose = "model's" if self.context == self.engine.config.max_position_embeddings else "server's (--context)"
                raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({want}) = {len(ids) + want} exceeds the "
                                    f"{whose} context of {self.context} tokens; shorten the prompt or lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")
            if len(ids) + want > limit:
                raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({want}) = {len(ids) + want} exceeds the "
                                    f"{limit} tokens the KV cache can give one request; lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, f"stop: at most 16 stop strings, got {len(stop)}", param="stop")
        bias = None
        if req.logit_bias:
            bias = {}
            V = self.engine.config.vocab_size
            for k, v in req.logit_bias.items():
                if not k.lstrip("-").isdigit() or not 0 <= int(k) < V:
                    raise APIError(400, f"logit_bias: key {k!r} is not a token id in [0, {V})", param="logit_bias")
                if not -100 <= v <= 100:
                    raise APIError(400, f"logit_bias: value for {k} must be in [-100, 100], got {v}", param="logit_bias")
                bias[int(k)] = float(v)
        grammar = None
        if response_format is not None and response_format.type != "text":
            if response_format.type == "json_object":
                grammar = self.grammar(None, "response_format")
            else:
                js = response_format.json_schema
                if js is None or js.schema_ is None:
                    raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                                   param="response_format.json_schema.schema")
                grammar = self.grammar(js.schema_, "response_format.json_schema.schema")
            vocab = await self.vocab()
            start = grammar.initial()
            if not any(grammar.feed(start, t[0]) is not None for t in vocab.toks):
                raise APIError(400, "this model's vocabulary has no token that can start a JSON value, so "
                                    "response_format cannot be honoured", param="response_format")
        seqs = []
        for ids in prompts:
            want = max_tokens if max_tokens is not None else (default_max or max(1, limit - len(ids)))
            for j in range(req.n):
                params = SamplingParams(
                    max_new_tokens=want, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                    repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    seed=None if req.seed is None else req.seed + j, stop=[s for s in stop if s],
                    ignore_eos=req.ignore_eos)
                try:
                    params.validate()
                except SamplingError as e:
                    name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
                    name = {"max_new_tokens": "max_tokens"}.get(name, name)
                    raise APIError(400, str(e).replace("SamplingParams.", ""), param=name) from None
                constraint = None
                if grammar is not None:
                    stop_ids = sorted(params.stop_token_set(self.tokenizer.eos_token_ids))
                    constraint = JsonConstraint(grammar, await self.vocab(), stop_ids)
                seqs.append(SeqRequest(list(ids), params, logprobs=logprobs, constraint=constraint, logit_bias=bias))
        return seqs

    def start(self, reqs: list[SeqRequest]) -> _Job:
        job = _Job(self.scheduler, reqs)
        try:
            job.submit()
        except QueueFullError as e:
            waiting = self.scheduler.metrics()["waiting"]
            retry = max(1, math.ceil(waiting / max(1, self.settings.max_batch)))
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        except GenerationError as e:
            raise APIError(400, str(e), param="max_tokens") from None
        return job

    async def collect(self, job: _Job, request: Request, keep_logprobs: bool) -> list[_Choice]:
        """Wait for every sequence of a non-streaming request; cancel them if the client goes away."""
        choices = [_Choice() for _ in job.reqs]

        async def consume() -> None:
            async for batch in job.batches():
                for i, ev in batch:
                    choices[i].add(ev, keep_logprobs)

        work = asyncio.create_task(consume())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client left: its sequences are cancelled below; nobody reads this
                raise APIError(499, "client closed the request", code="client_closed_request")
            work.result()
        finally:
            gone.cancel()
            work.cancel()
            job.cancel()
        for c in choices:
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.error}", type="server_error")
        return choices

    def token_str(self, vocab: TokenVocab | None, tid: int) -> tuple[str, list[int]]:
        b = vocab.token_bytes[tid] if vocab is not None and 0 <= tid < vocab.size else None
        if b is None:
            t = self.tokenizer.id_to_token(tid) or ""
            b = t.encode()
        return b.decode("utf-8", errors="replace"), list(b)

    def usage(self, choices: list[_Choice], n: int) -> Usage:
        prompt = sum(choices[k].prompt_tokens for k in range(0, len(choices), n))
        cached = sum(max(c.cached_tokens for c in choices[k:k + n]) for k in range(0, len(choices), n))
        completion = sum(c.completion_tokens for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def stop_ids(self, req: SeqRequest) -> set[int]:
        return req.params.stop_token_set(self.tokenizer.eos_token_ids)

    # ------------------------------------------------------------ chat
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.tools or body.functions:
            raise APIError(400, "tools/function calling is not supported by ember serve yet", param="tools")
        messages = []
        for k, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p.type != "text" or p.text is None:
                        raise APIError(400, f"messages[{k}].content: only text parts are supported, got type {p.type!r}",
                                       param=f"messages.{k}.content")
                    parts.append(p.text)
                content = "".join(parts)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            ids = self.tokenizer.encode_chat(messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        seqs = await self.build_sequences([ids], body, max_tokens, None, logprobs, body.response_format)
        vocab = await self.vocab() if logprobs is not None else None
        job = self.start(seqs)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._chat_stream(job, cid, created, usage, vocab))
        choices = await self.collect(job, request, logprobs is not None)
        out = []
        for i, c in enumerate(choices):
            lp = None
            if logprobs is not None:
                lp = ChoiceLogprobs(content=self._chat_logprobs(c.logprobs, seqs[i], vocab))
            out.append(ChatChoice(index=i, message=AssistantMessage(content=c.text), logprobs=lp,
                                  finish_reason=c.finish_reason))
        resp = ChatCompletion(id=cid, created=created, model=self.settings.model_name, system_fingerprint=FINGERPRINT,
                              choices=out, usage=self.usage(choices, body.n))
        return JSONResponse(resp.model_dump())

    def _chat_logprobs(self, events: list[SeqEvent], req: SeqRequest, vocab) -> list[TokenLogprob]:
        stop = self.stop_ids(req)
        out = []
        for ev in events:
            if ev.finish_reason == "stop" and ev.token_id in stop:
                continue  # the end-of-turn token is not part of the content
            tok, b = self.token_str(vocab, ev.token_id)
            tops = []
            for tid, lp in ev.top_logprobs or []:
                t, tb = self.token_str(vocab, tid)
                tops.append(TopLogprob(token=t, logprob=lp, bytes=tb))
            out.append(TokenLogprob(token=tok, logprob=ev.logprob, bytes=b, top_logprobs=tops))
        return out

    async def _chat_stream(self, job: _Job, cid: str, created: int, include_usage: bool, vocab) -> AsyncIterator[str]:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.settings.model_name,
                "system_fingerprint": FINGERPRINT}
        if include_usage:
            head["usage"] = None

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
            c = {**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            return f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"

        choices = [_Choice() for _ in job.reqs]
        try:
            yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(job.reqs)))
            async for batch in job.batches():
                out = []
                for i, ev in batch:
                    c = choices[i]
                    c.add(ev, False)
                    if ev.finish_reason == "error":
                        out.append(_sse_error(f"generation failed: {ev.error}"))
                        continue
                    lp = None
                    if ev.logprob is not None:
                        items = self._chat_logprobs([ev], job.reqs[i], vocab)
                        lp = {"content": [t.model_dump() for t in items], "refusal": None} if items else None
                    if ev.text or lp is not None:
                        out.append(chunk(i, {"content": ev.text}, None, lp))
                    if ev.finish_reason is not None:
                        out.append(chunk(i, {}, ev.finish_reason))
                if out:
                    yield "".join(out)
            if include_usage:
                u = self.usage(choices, len(job.reqs))  # chat: one prompt, n choices
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': u.model_dump()}, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    # ------------------------------------------------------------ completions
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        p = body.prompt
        V = self.engine.config.vocab_size
        if isinstance(p, str):
            texts, prompts = [p], [self.tokenizer.encode(p)]
        elif not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        elif isinstance(p[0], str):
            texts, prompts = list(p), [self.tokenizer.encode(t) for t in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
            texts = None
        else:
            prompts = [list(x) for x in p]
            texts = None
        for ids in prompts:
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is out of range [0, {V})", param="prompt")
        if texts is None:
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        seqs = await self.build_sequences(prompts, body, body.max_tokens, 16, body.logprobs, body.response_format)
        vocab = await self.vocab() if body.logprobs is not None else None
        job = self.start(seqs)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = [texts[k // body.n] if body.echo else "" for k in range(len(seqs))]
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._completion_stream(job, cid, created, usage, vocab, echo, body.n))
        choices = await self.collect(job, request, body.logprobs is not None)
        out = []
        for i, c in enumerate(choices):
            lp = self._completion_logprobs(c.logprobs, seqs[i], vocab, len(echo[i])) if body.logprobs is not None else None
            out.append(CompletionChoice(index=i, text=echo[i] + c.text, logprobs=lp, finish_reason=c.finish_reason))
        resp = Completion(id=cid, created=created, model=self.settings.model_name, system_fingerprint=FINGERPRINT,
                          choices=out, usage=self.usage(choices, body.n))
        return JSONResponse(resp.model_dump())

    def _completion_logprobs(self, events: list[SeqEvent], req: SeqRequest, vocab, offset: int) -> CompletionLogprobs:
        tokens, lps, tops, offs = [], [], [], []
        for t in self._chat_logprobs(events, req, vocab):
            tokens.append(t.token)
            lps.append(t.logprob)
            tops.append({x.token: x.logprob for x in t.top_logprobs})
            offs.append(offset)
            offset += len(t.token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops if req.logprobs else None,
                                  text_offset=offs)

    async def _completion_stream(self, job: _Job, cid: str, created: int, include_usage: bool, vocab,
                                 echo: list[str], n: int) -> AsyncIterator[str]:
        head = {"id": cid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                "system_fingerprint": FINGERPRINT}
        if include_usage:
            head["usage"] = None

        def chunk(i: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
            c = {**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            return f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"

        choices = [_Choice() for _ in job.reqs]
        offsets = [len(e) for e in echo]
        try:
            first = "".join(chunk(i, e) for i, e in enumerate(echo) if e)
            if first:
                yield first
            async for batch in job.batches():
                out = []
                for i, ev in batch:
                    choices[i].add(ev, False)
                    if ev.finish_reason == "error":
                        out.append(_sse_error(f"generation failed: {ev.error}"))
                        continue
                    lp = None
                    if ev.logprob is not None:
                        lp = self._completion_logprobs([ev], job.reqs[i], vocab, offsets[i])
                        lp = lp.model_dump() if lp.tokens else None
                    offsets[i] += len(ev.text)
                    if ev.text or lp is not None or ev.finish_reason is not None:
                        out.append(chunk(i, ev.text, ev.finish_reason, lp))
                if out:
                    yield "".join(out)
            if include_usage:
                u = self.usage(choices, n)
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': u.model_dump()}, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    # ------------------------------------------------------------ status
    def kv_gauges(self) -> dict:
        """KV pool size in bytes and the planner's budget for it (absent when --kv-blocks fixed the size)."""
        out = {"kv_pool_bytes": self.kv_plan.nbytes}
        if self.kv_plan.budget_bytes is not None:
            out["kv_budget_bytes"] = self.kv_plan.budget_bytes
        return out

    def health(self) -> dict:
        return {"status": "ok", "model": self.settings.model_name, **self.scheduler.metrics(), **self.kv_gauges()}

    def prometheus(self) -> str:
        m = {**self.scheduler.metrics(), **self.kv_gauges()}
        lines = []
        for k, v in m.items():
            kind = "counter" if k in ("steps", "prompt_tokens", "generated_tokens", "prefix_hit_tokens", "finished",
                                      "cancelled", "errors") else "gauge"
            name = f"ember_{k}_total" if kind == "counter" else f"ember_{k}"
            lines += [f"# TYPE {name} {kind}", f"{name} {v}"]
        return "\n".join(lines) + "\n"


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse_error(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


# ----------------------------------------------------------------------------- errors, auth


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}


def _param_of(loc: tuple) -> str | None:
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p or p[:1].isupper()):
            break  # a union member tag (e.g. 'str', 'list[int]'), not a field
        parts.append(str(p))
    return ".".join(parts) or None


def _validation_message(err: dict) -> tuple[str, str | None]:
    param = _param_of(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    if err.get("type") == "missing" and param is None:
        return "the request body is missing: send a JSON object", None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"'{param}' is a required field", param
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return f"'{param}': {msg} (got {shown})", param


class _AuthMiddleware:
    """Rejects every request without ``Authorization: Bearer <key>`` (before the body is read)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                body = error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                  "with the key given to ember serve --api-key", code="invalid_api_key")
                await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- app


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
        loop = asyncio.get_running_loop()
        server.scheduler.deliver = lambda events: loop.call_soon_threadsafe(_dispatch, events)
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
        app.add_middleware(_AuthMiddleware, api_key=settings.api_key)
    if settings.ui:
        mount_ui(app)  # after the API-key check: the page loads without the key, then asks for it

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        message, param = _validation_message(errs[0]) if errs else ("invalid request", None)
        if len(errs) > 1:
            message += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return JSONResponse(error_body(message, param=param, code="invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(EmberError)
    async def _ember(request: Request, exc: EmberError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), 400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.prometheus())

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(id=settings.model_name, created=server.created, max_model_len=server.context)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        server.check_model(name)
        return ModelCard(id=settings.model_name, created=server.created, max_model_len=server.context).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    return app
