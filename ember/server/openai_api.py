"""OpenAI's classic routes: ``/v1/chat/completions`` (with tools and reasoning), ``/v1/completions``, ``/v1/models``.

Both generation routes stream as server-sent events ending in ``data: [DONE]``, or answer at once.
Chat tool calls stream as OpenAI streams them: a delta with the call's index, id and name, then
deltas with fragments of its arguments; reasoning streams as ``reasoning_content`` deltas.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ember.chat_formats import Delta
from ember.server.chat import ChatRun, ChatSpec, prepare_chat
from ember.server.core import FINGERPRINT, EmberServer, Job, sse, sse_json
from ember.server.errors import APIError, sse_error
from ember.server.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChoiceLogprobs,
                                   Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FunctionCall,
                                   ModelCard, ModelList, ToolCallOut)


def register(app: FastAPI, server: EmberServer) -> None:
    """Add the routes to ``app``."""

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(id=server.settings.model_name, created=server.created, max_model_len=server.context)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        server.check_model(name)
        return ModelCard(id=server.settings.model_name, created=server.created, max_model_len=server.context).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat(server, body, request)

    @app.post("/v1/completions")
    async def completions_route(body: CompletionRequest, request: Request) -> Response:
        return await completions(server, body, request)


def tool_choice_of(value: Any, param: str = "tool_choice") -> tuple[str, str | None]:
    """OpenAI's ``tool_choice`` as ``(mode, forced function name)``."""
    if value is None or value in ("auto", "none", "required"):
        return value or "auto", None
    if isinstance(value, dict):
        fn = value.get("function") if value.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else value.get("name") if value.get("type") == "function" else None
        if isinstance(name, str):
            return "named", name
    raise APIError(400, f"{param} must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {json.dumps(value)[:80]}", param=param)


def delta_json(d: Delta) -> dict:
    """A parsed delta as an OpenAI chat-chunk delta."""
    if d.kind == "content":
        return {"content": d.text}
    if d.kind == "reasoning":
        return {"reasoning_content": d.text}
    if d.kind == "call":
        return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                "function": {"name": d.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}


async def chat(server: EmberServer, body: ChatCompletionRequest, request: Request) -> Response:
    server.check_model(body.model)
    if body.functions:
        raise APIError(400, "functions (the deprecated form) is not supported: pass them as tools", param="functions")
    mode, forced = tool_choice_of(body.tool_choice)
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    spec = ChatSpec(messages=[m.model_dump(exclude_none=True) for m in body.messages], tools=body.tools,
                    tool_choice=mode, forced_name=forced, template_kwargs=kwargs,
                    parallel_tool_calls=body.parallel_tool_calls is not False)
    prepared = await prepare_chat(server, spec)
    rf = body.response_format
    if prepared.grammar is not None and rf is not None and rf.type != "text":
        raise APIError(400, "response_format cannot be combined with a forced tool call (tool_choice)",
                       param="response_format")
    grammar = prepared.grammar or await server.response_grammar(rf)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    seqs = await server.build_sequences([prepared.ids], body, max_tokens, None, logprobs, grammar)
    vocab = await server.vocab() if logprobs is not None else None
    job = server.start(seqs)
    run = ChatRun(server, job, prepared, logprobs is not None)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(_chat_stream(server, run, cid, created, usage, vocab, body.model))
    parsed = await run.collect(request)
    out = []
    for i, (c, p) in enumerate(zip(run.choices, parsed)):
        lp = None
        if logprobs is not None:
            lp = ChoiceLogprobs(content=server.token_logprobs(c.logprobs, seqs[i], vocab))
        calls = [ToolCallOut(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments)) for t in p.calls]
        msg = AssistantMessage(content=p.content if p.content or not calls else None, tool_calls=calls or None,
                               reasoning_content=p.reasoning or None)
        out.append(ChatChoice(index=i, message=msg, logprobs=lp, finish_reason=run.finish_reason(i)))
    resp = ChatCompletion(id=cid, created=created, model=server.settings.model_name, system_fingerprint=FINGERPRINT,
                          choices=out, usage=server.usage(run.choices, body.n))
    return JSONResponse(resp.model_dump())


async def _chat_stream(server: EmberServer, run: ChatRun, cid: str, created: int, include_usage: bool, vocab,
                       model: str) -> AsyncIterator[str]:
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.settings.model_name,
            "system_fingerprint": FINGERPRINT}
    if include_usage:
        head["usage"] = None

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
        return sse_json({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    job = run.job
    try:
        yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(job.reqs)))
        async for batch in run.stream():
            out = []
            for i, deltas, ev in batch:
                if ev.finish_reason == "error":
                    out.append(sse_error(f"generation failed: {ev.error}"))
                    continue
                lp = None
                if ev.logprob is not None:
                    items = server.token_logprobs([ev], job.reqs[i], vocab)
                    lp = {"content": [t.model_dump() for t in items], "refusal": None} if items else None
                for d in deltas:
                    out.append(chunk(i, delta_json(d), None, lp))
                    lp = None
                if lp is not None:
                    out.append(chunk(i, {}, None, lp))
                if ev.finish_reason is not None:
                    out.append(chunk(i, {}, run.finish_reason(i)))
            if out:
                yield "".join(out)
        if include_usage:
            u = server.usage(run.choices, len(job.reqs))  # chat: one prompt, n choices
            yield sse_json({**head, "choices": [], "usage": u.model_dump()})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ----------------------------------------------------------------------------- completions


async def completions(server: EmberServer, body: CompletionRequest, request: Request) -> Response:
    server.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    tok = server.tokenizer
    p = body.prompt
    V = server.engine.config.vocab_size
    if isinstance(p, str):
        texts, prompts = [p], [tok.encode(p)]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(p[0], str):
        texts, prompts = list(p), [tok.encode(t) for t in p]
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
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in prompts]
    grammar = await server.response_grammar(body.response_format)
    seqs = await server.build_sequences(prompts, body, body.max_tokens, 16, body.logprobs, grammar)
    vocab = await server.vocab() if body.logprobs is not None else None
    job = server.start(seqs)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo = [texts[k // body.n] if body.echo else "" for k in range(len(seqs))]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(_completion_stream(server, job, cid, created, usage, vocab, echo, body.n))
    choices = await server.collect(job, request, body.logprobs is not None)
    out = []
    for i, c in enumerate(choices):
        lp = _completion_logprobs(server, c.logprobs, seqs[i], vocab, len(echo[i])) if body.logprobs is not None else None
        out.append(CompletionChoice(index=i, text=echo[i] + c.text, logprobs=lp, finish_reason=c.finish_reason))
    resp = Completion(id=cid, created=created, model=server.settings.model_name, system_fingerprint=FINGERPRINT,
                      choices=out, usage=server.usage(choices, body.n))
    return JSONResponse(resp.model_dump())


def _completion_logprobs(server: EmberServer, events, req, vocab, offset: int) -> CompletionLogprobs:
    tokens, lps, tops, offs = [], [], [], []
    for t in server.token_logprobs(events, req, vocab):
        tokens.append(t.token)
        lps.append(t.logprob)
        tops.append({x.token: x.logprob for x in t.top_logprobs})
        offs.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops if req.logprobs else None,
                              text_offset=offs)


async def _completion_stream(server: EmberServer, job: Job, cid: str, created: int, include_usage: bool, vocab,
                             echo: list[str], n: int) -> AsyncIterator[str]:
    head = {"id": cid, "object": "text_completion", "created": created, "model": server.settings.model_name,
            "system_fingerprint": FINGERPRINT}
    if include_usage:
        head["usage"] = None

    def chunk(i: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
        return sse_json({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    choices = server.choices(job)
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
                    out.append(sse_error(f"generation failed: {ev.error}"))
                    continue
                lp = None
                if ev.logprob is not None:
                    lp = _completion_logprobs(server, [ev], job.reqs[i], vocab, offsets[i])
                    lp = lp.model_dump() if lp.tokens else None
                offsets[i] += len(ev.text)
                if ev.text or lp is not None or ev.finish_reason is not None:
                    out.append(chunk(i, ev.text, ev.finish_reason, lp))
            if out:
                yield "".join(out)
        if include_usage:
            u = server.usage(choices, n)
            yield sse_json({**head, "choices": [], "usage": u.model_dump()})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
