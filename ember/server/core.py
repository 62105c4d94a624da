"""State the routes share: the engine, the batch scheduler, compiled grammars, and each request's sequences.

The scheduler steps in its own thread; each request's sequences report their tokens through
``loop.call_soon_threadsafe`` into an asyncio queue, one hop per scheduler step. A client that
disconnects (streaming or not) cancels its sequences, which frees their KV blocks at once. At a
shutdown deadline, :meth:`EmberServer.expire_all` ends every open request as if it had reached its
token limit, so each client still gets a complete answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ember import __version__
from ember.chat_formats import detect_format, is_reasoning_template, template_has_tools
from ember.engine import Engine
from ember.errors import GenerationError, QueueFullError, SamplingError, UnsupportedSchemaError
from ember.json_constraint import JsonConstraint, JsonGrammar, TokenVocab, compile_json_schema
from ember.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from ember.scheduler import BatchScheduler, SeqEvent, SeqRequest
from ember.server.errors import APIError
from ember.server.protocol import PromptTokensDetails, TokenLogprob, TopLogprob, Usage
from ember.server.settings import ServerSettings, plan_kv_pool

log = logging.getLogger("ember.server")

FINGERPRINT = f"ember-{__version__}"


class Job:
    """The sequences of one API request (n choices x prompts) and the queue their events arrive on."""

    def __init__(self, server: EmberServer, reqs: list[SeqRequest]) -> None:
        self.server, self.scheduler = server, server.scheduler
        self.reqs = reqs
        self.queue: asyncio.Queue[tuple[int, SeqEvent]] = asyncio.Queue()
        self.open = set(range(len(reqs)))
        self.ids: list[int] = []
        self.last: dict[int, SeqEvent] = {}
        for i, r in enumerate(reqs):
            r.tag = (self, i)

    def submit(self) -> None:
        self.ids = self.scheduler.submit(self.reqs)
        self.server.jobs.add(self)

    def cancel(self) -> None:
        """Cancel the sequences that have not finished (client gone, request done)."""
        for i in self.open:
            self.scheduler.cancel(self.ids[i])
        self.open.clear()
        self.server.jobs.discard(self)

    def expire(self) -> None:
        """End every open sequence now with finish reason "length" (the shutdown deadline passed)."""
        for i in sorted(self.open):
            self.scheduler.cancel(self.ids[i])
            last = self.last.get(i)
            ev = SeqEvent(-1, -1, "", "length")
            if last is not None:
                ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens = \
                    last.prompt_tokens, last.completion_tokens, last.cached_tokens
            else:
                ev.prompt_tokens = len(self.reqs[i].prompt_ids)
            self.queue.put_nowait((i, ev))

    async def batches(self) -> AsyncIterator[list[tuple[int, SeqEvent]]]:
        """Events as they come, grouped by what has arrived together; ends when every sequence finished."""
        while self.open:
            got = [await self.queue.get()]
            while not self.queue.empty():
                got.append(self.queue.get_nowait())
            keep = []
            for i, ev in got:
                if i not in self.open:
                    continue  # a late event of a sequence already ended (cancelled, expired)
                self.last[i] = ev
                if ev.finish_reason is not None:
                    self.open.discard(i)
                keep.append((i, ev))
            if keep:
                yield keep


def dispatch(events: list[tuple[SeqRequest, SeqEvent]]) -> None:
    """Hand a scheduler step's events to their jobs (runs on the event loop)."""
    for req, ev in events:
        job, i = req.tag
        job.queue.put_nowait((i, ev))


@dataclass
class Choice:
    """What one sequence produced, accumulated from its events.

    ``markers`` maps special-token ids to their text: the detokenizer drops special tokens, but a
    tool-call parser needs to see a few of them (Mistral's ``[TOOL_CALLS]``).
    """

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[SeqEvent] = field(default_factory=list)
    markers: dict[int, str] = field(default_factory=dict)

    def add(self, ev: SeqEvent, keep_logprobs: bool) -> str:
        """Take one event; returns its text (markers included)."""
        text = ev.text + self.markers.get(ev.token_id, "") if self.markers else ev.text
        self.text += text
        self.completion_tokens = ev.completion_tokens
        self.cached_tokens = ev.cached_tokens
        self.prompt_tokens = ev.prompt_tokens
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            self.error = ev.error
        if keep_logprobs and ev.logprob is not None:
            self.logprobs.append(ev)
        return text


class EmberServer:
    """State shared by the routes: engine, scheduler, compiled JSON grammars, token bytes, the chat format."""

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
        self.jobs: set[Job] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.extensions: dict = {}  # per-API state (stored responses, embedding pooling), keyed by module

        # The chat format: how this checkpoint's template renders tools and how its model writes calls.
        tool_src = self.tokenizer.chat_template_source(tools=[]) or ""
        self.template_tools = template_has_tools(tool_src)
        self.tool_format = detect_format(tool_src) if self.template_tools else detect_format("<tool_call>")
        self.reasoning = is_reasoning_template(self.tokenizer.chat_template_source() or "")
        # tokens the format ends a turn with besides EOS (harmony's <|call|>, Gemma 4's <|tool_response>)
        self.format_stops = self.tool_format.stop_ids(self.tokenizer.token_to_id) if self.template_tools else []
        self.markers: dict[int, str] = {}
        for text in self.tool_format.special_markers:
            tid = self.tokenizer.token_to_id(text)
            if tid is not None and self.tokenizer.decode([tid], skip_special_tokens=True) == "":
                self.markers[tid] = text

    # ------------------------------------------------------------ helpers
    async def vocab(self) -> TokenVocab:
        """Token bytes of the vocabulary (built once, off the event loop)."""
        async with self._vocab_lock:
            if self._vocab is None:
                self._vocab = await asyncio.to_thread(TokenVocab.from_tokenizer, self.tokenizer,
                                                      self.engine.config.vocab_size)
            return self._vocab

    def check_model(self, name: str, param: str = "model") -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           param=param, code="model_not_found")

    def check_open(self) -> None:
        """503 once shutdown has begun (requests already running still finish) or a rank of the run is gone."""
        self.check_ranks()
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", type="server_error",
                           code="shutting_down")

    def check_ranks(self) -> None:
        """503 naming the rank once a multi-process run has lost one (the server then exits; see serve())."""
        if self.scheduler.broken is not None:
            raise APIError(503, f"this server's multi-process run lost a rank, so it cannot generate and is "
                                f"shutting down; retry on another instance. {self.scheduler.broken}",
                           type="server_error", code="rank_lost")

    def grammar(self, schema: dict | None, where: str) -> JsonGrammar:
        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            try:
                g = compile_json_schema(schema, where)
            except UnsupportedSchemaError as e:
                raise APIError(400, str(e), param=where) from None
            self.remember_grammar(key, g)
        return g

    def remember_grammar(self, key: str, g: JsonGrammar) -> None:
        self._grammars[key] = g
        if len(self._grammars) > 64:
            self._grammars.popitem(last=False)

    def cached_grammar(self, key: str) -> JsonGrammar | None:
        return self._grammars.get(key)

    async def response_grammar(self, response_format) -> JsonGrammar | None:
        """The grammar of an OpenAI ``response_format`` (None for text)."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            grammar = self.grammar(None, "response_format")
        else:
            js = response_format.json_schema
            if js is None or js.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                               param="response_format.json_schema.schema")
            grammar = self.grammar(js.schema_, "response_format.json_schema.schema")
        await self.check_grammar(grammar, "response_format")
        return grammar

    async def check_grammar(self, grammar: JsonGrammar, param: str) -> None:
        vocab = await self.vocab()
        start = grammar.initial()
        if not any(grammar.feed(start, t[0]) is not None for t in vocab.toks):
            raise APIError(400, f"this model's vocabulary has no token that can start the text {param} requires, "
                                f"so it cannot be honoured", param=param)

    def default_max(self, prompt_len: int) -> int:
        """max_tokens when a request gives none: what is left of the context for this prompt, at most
        :data:`ember.sampling.DEFAULT_MAX_NEW_TOKENS` (as for ``generate`` and ``chat``)."""
        return max(1, min(DEFAULT_MAX_NEW_TOKENS, min(self.context, self.scheduler.max_seq_tokens) - prompt_len))

    async def build_sequences(self, prompts: list[list[int]], req, max_tokens: int | None, default_max: int | None,
                              logprobs: int | None, grammar: JsonGrammar | None,
                              max_param: str = "max_tokens") -> list[SeqRequest]:
        """Validate limits and sampling fields; n sequences per prompt, choice index = prompt * n + j.

        ``req`` has the sampling fields of an OpenAI request (n, temperature, top_p, stop, seed, ...).
        """
        limit = self.scheduler.max_seq_tokens
        n = getattr(req, "n", 1)
        if len(prompts) * n > self.settings.max_batch + self.settings.max_queue:
            raise APIError(400, f"this request asks for {len(prompts) * n} sequences but the server runs at most "
                                f"{self.settings.max_batch} and queues {self.settings.max_queue} (--max-batch, "
                                "--max-queue); ask for fewer choices or prompts", param="n")
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty: give at least one token of text", param="prompt")
            want = max_tokens if max_tokens is not None else (default_max or self.default_max(len(ids)))
            if len(ids) + want > self.context:
                whose = "model's" if self.context == self.engine.config.max_position_embeddings else "server's (--context)"
                raise APIError(400, f"prompt ({len(ids)} tokens) + {max_param} ({want}) = {len(ids) + want} exceeds the "
                                    f"{whose} context of {self.context} tokens; shorten the prompt or lower {max_param}",
                               param=max_param, code="context_length_exceeded")
            if len(ids) + want > limit:
                raise APIError(400, f"prompt ({len(ids)} tokens) + {max_param} ({want}) = {len(ids) + want} exceeds the "
                                    f"{limit} tokens the KV cache can give one request ({self.scheduler.pool.capacity} "
                                    f"blocks x {self.scheduler.block_size} tokens); lower {max_param}",
                               param=max_param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, f"stop: at most 16 stop strings, got {len(stop)}", param="stop")
        bias = None
        if getattr(req, "logit_bias", None):
            bias = {}
            V = self.engine.config.vocab_size
            for k, v in req.logit_bias.items():
                if not k.lstrip("-").isdigit() or not 0 <= int(k) < V:
                    raise APIError(400, f"logit_bias: key {k!r} is not a token id in [0, {V})", param="logit_bias")
                if not -100 <= v <= 100:
                    raise APIError(400, f"logit_bias: value for {k} must be in [-100, 100], got {v}", param="logit_bias")
                bias[int(k)] = float(v)
        g = lambda name, default: default if getattr(req, name, None) is None else getattr(req, name)  # noqa: E731
        seqs = []
        for ids in prompts:
            want = max_tokens if max_tokens is not None else (default_max or self.default_max(len(ids)))
            for j in range(n):
                seed = getattr(req, "seed", None)
                params = SamplingParams(
                    max_new_tokens=want, temperature=g("temperature", 1.0), top_p=g("top_p", 1.0), top_k=g("top_k", 0),
                    min_p=g("min_p", 0.0), repetition_penalty=g("repetition_penalty", 1.0),
                    presence_penalty=g("presence_penalty", 0.0), frequency_penalty=g("frequency_penalty", 0.0),
                    seed=None if seed is None else seed + j, stop=[s for s in stop if s],
                    stop_token_ids=list(self.format_stops), ignore_eos=bool(getattr(req, "ignore_eos", False)))
                try:
                    params.validate()
                except SamplingError as e:
                    name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
                    name = {"max_new_tokens": max_param}.get(name, name)
                    raise APIError(400, str(e).replace("SamplingParams.", ""), param=name) from None
                constraint = None
                if grammar is not None:
                    stop_ids = sorted(params.stop_token_set(self.tokenizer.eos_token_ids))
                    constraint = JsonConstraint(grammar, await self.vocab(), stop_ids)
                seqs.append(SeqRequest(list(ids), params, logprobs=logprobs, constraint=constraint, logit_bias=bias))
        return seqs

    def start(self, reqs: list[SeqRequest]) -> Job:
        """Submit a request's sequences: 429 with Retry-After when the queue is full for now, 400 when they never fit."""
        self.check_open()
        job = Job(self, reqs)
        try:
            job.submit()
        except QueueFullError as e:
            waiting = self.scheduler.metrics()["waiting"]
            retry = max(1, math.ceil(waiting / max(1, self.settings.max_batch)))
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        except GenerationError as e:
            raise APIError(400, str(e), param="max_tokens" if "max tokens" in str(e) else None) from None
        return job

    def choices(self, job: Job) -> list[Choice]:
        return [Choice(markers=self.markers) for _ in job.reqs]

    async def collect(self, job: Job, request: Request, keep_logprobs: bool) -> list[Choice]:
        """Wait for every sequence of a non-streaming request; cancel them if the client goes away."""
        choices = self.choices(job)

        async def consume() -> None:
            async for batch in job.batches():
                for i, ev in batch:
                    choices[i].add(ev, keep_logprobs)

        work = asyncio.create_task(consume())
        gone = asyncio.create_task(wait_disconnect(request))
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
                self.check_ranks()
                raise APIError(500, f"generation failed: {c.error}", type="server_error")
        return choices

    def expire_all(self) -> None:
        """End every open request now (finish reason "length"): the shutdown deadline has passed."""
        n = len(self.jobs)
        for job in list(self.jobs):
            job.expire()
        if n:
            log.warning("ember serve: shutdown timeout: ended %d open request%s with finish_reason 'length'",
                        n, "" if n == 1 else "s")

    def token_str(self, vocab: TokenVocab | None, tid: int) -> tuple[str, list[int]]:
        b = vocab.token_bytes[tid] if vocab is not None and 0 <= tid < vocab.size else None
        if b is None:
            t = self.tokenizer.id_to_token(tid) or ""
            b = t.encode()
        return b.decode("utf-8", errors="replace"), list(b)

    def token_logprobs(self, events: list[SeqEvent], req: SeqRequest, vocab) -> list[TokenLogprob]:
        """The chosen and top tokens' logprobs of events (the end-of-turn token left out)."""
        stop = req.params.stop_token_set(self.tokenizer.eos_token_ids)
        out = []
        for ev in events:
            if ev.finish_reason == "stop" and ev.token_id in stop:
                continue
            tok, b = self.token_str(vocab, ev.token_id)
            tops = []
            for tid, lp in ev.top_logprobs or []:
                t, tb = self.token_str(vocab, tid)
                tops.append(TopLogprob(token=t, logprob=lp, bytes=tb))
            out.append(TokenLogprob(token=tok, logprob=ev.logprob, bytes=b, top_logprobs=tops))
        return out

    def usage(self, choices: list[Choice], n: int) -> Usage:
        prompt = sum(choices[k].prompt_tokens for k in range(0, len(choices), n))
        cached = sum(max(c.cached_tokens for c in choices[k:k + n]) for k in range(0, len(choices), n))
        completion = sum(c.completion_tokens for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # ------------------------------------------------------------ status
    def kv_gauges(self) -> dict:
        """KV pool size in bytes and the planner's budget for it (absent when --kv-blocks fixed the size)."""
        out = {"kv_pool_bytes": self.kv_plan.nbytes}
        if self.kv_plan.budget_bytes is not None:
            out["kv_budget_bytes"] = self.kv_plan.budget_bytes
        return out

    def health(self) -> dict:
        status = "rank_lost" if self.scheduler.broken is not None else "shutting_down" if self.draining else "ok"
        return {"status": status, "model": self.settings.model_name, **self.scheduler.metrics(), **self.kv_gauges()}

    def prometheus(self) -> str:
        m = {**self.scheduler.metrics(), **self.kv_gauges()}
        lines = []
        for k, v in m.items():
            kind = "counter" if k in ("steps", "prompt_tokens", "generated_tokens", "prefix_hit_tokens", "finished",
                                      "cancelled", "errors") else "gauge"
            name = f"ember_{k}_total" if kind == "counter" else f"ember_{k}"
            lines += [f"# TYPE {name} {kind}", f"{name} {v}"]
        return "\n".join(lines) + "\n"


def sse(gen: AsyncIterator[str]) -> StreamingResponse:
    """A server-sent-events response of ``gen``'s lines."""
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse_json(obj: dict, event: str | None = None) -> str:
    """One event: ``data: {json}`` (with ``event: name`` first for the typed streams of Anthropic and Responses)."""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


async def wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
