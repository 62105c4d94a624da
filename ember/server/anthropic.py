"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Requests are translated into a :class:`~ember.server.chat.ChatSpec`: ``system`` (text or text
blocks) becomes the system message; ``tool_use`` blocks become assistant tool calls and
``tool_result`` blocks tool messages; ``thinking`` blocks the assistant's earlier reasoning; tools'
``input_schema`` is the function's ``parameters``; ``tool_choice`` ``auto``/``any``/``tool``/``none``
maps to auto/required/a named function/none; ``thinking: {"type": "enabled"|"disabled"}`` reaches the
template as ``enable_thinking``. Answers carry ``thinking``, ``text`` and ``tool_use`` blocks and a
``stop_reason`` (``end_turn``, ``max_tokens``, ``stop_sequence``, ``tool_use``); streams send
Anthropic's event sequence (``message_start``, ``content_block_start``/``_delta``/``_stop``,
``message_delta``, ``message_stop``). Errors come in Anthropic's shape (see :mod:`ember.server.errors`),
and the API key may come as ``x-api-key``.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ember.server.chat import ChatRun, ChatSpec, prepare_chat
from ember.server.core import EmberServer, sse, sse_json
from ember.server.errors import APIError, anthropic_error_body


class MessagesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)   # required for /v1/messages (checked there), not for count_tokens
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def register(app: FastAPI, server: EmberServer) -> None:
    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await create_message(server, body, request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: MessagesRequest) -> dict:
        server.check_model(body.model)
        prepared = await prepare_chat(server, to_spec(body))
        return {"input_tokens": len(prepared.ids)}


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content blocks", param=where)
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise APIError(400, f"{where}.{j} must be a content block with a 'type'", param=f"{where}.{j}")
    return content


def _text_of(content: Any, where: str) -> str:
    parts = []
    for j, b in enumerate(_blocks(content, where)):
        if b["type"] == "image" or b["type"] == "document":
            raise APIError(400, f"{where}.{j}: this model reads text only; {b['type']!r} blocks are not supported",
                           param=f"{where}.{j}")
        if b["type"] != "text":
            raise APIError(400, f"{where}.{j}: expected a text block here, got {b['type']!r}", param=f"{where}.{j}")
        parts.append(str(b.get("text", "")))
    return "".join(parts)


def to_spec(body: MessagesRequest) -> ChatSpec:
    """The request as OpenAI-style messages and tools."""
    msgs: list[dict] = []
    if body.system:
        msgs.append({"role": "system", "content": _text_of(body.system, "system")})
    for k, m in enumerate(body.messages):
        where = f"messages.{k}"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be 'user' or 'assistant', got {role!r}", param=f"{where}.role")
        text, calls, reasoning, results = [], [], [], []
        for j, b in enumerate(_blocks(m.get("content", ""), f"{where}.content")):
            t, w = b["type"], f"{where}.content.{j}"
            if t == "text":
                text.append(str(b.get("text", "")))
            elif t in ("image", "document"):
                raise APIError(400, f"{w}: this model reads text only; {t!r} blocks are not supported", param=w)
            elif t == "tool_use" and role == "assistant":
                if not isinstance(b.get("input", {}), dict) or not isinstance(b.get("name"), str):
                    raise APIError(400, f"{w}: tool_use needs a 'name' and an object 'input'", param=w)
                calls.append({"id": b.get("id") or f"toolu_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif t in ("thinking", "redacted_thinking") and role == "assistant":
                reasoning.append(str(b.get("thinking", "")))
            elif t == "tool_result" and role == "user":
                c = b.get("content", "")
                results.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                "content": c if isinstance(c, str) else _text_of(c, f"{w}.content")})
            else:
                raise APIError(400, f"{w}: a {t!r} block is not allowed in a {role} message", param=w)
        msgs += results
        if text or calls or reasoning or not results:
            msg: dict = {"role": role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            msgs.append(msg)
    tools = None
    if body.tools:
        tools = []
        for i, t in enumerate(body.tools):
            if not isinstance(t.get("name"), str):
                raise APIError(400, f"tools.{i}.name is required", param=f"tools.{i}.name")
            tools.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                           "parameters": t.get("input_schema", {"type": "object"})}})
    mode, forced, parallel = "auto", None, True
    tc = body.tool_choice
    if tc is not None:
        kind = tc.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise APIError(400, f"tool_choice.type must be auto, any, tool or none, got {kind!r}", param="tool_choice.type")
        mode = {"any": "required", "tool": "named"}.get(kind, kind)
        if kind == "tool":
            forced = tc.get("name")
            if not isinstance(forced, str):
                raise APIError(400, "tool_choice.name is required with type 'tool'", param="tool_choice.name")
        parallel = not tc.get("disable_parallel_tool_use", False)
    kwargs = {}
    if body.thinking is not None:
        kwargs["enable_thinking"] = body.thinking.get("type") in ("enabled", "adaptive")
    return ChatSpec(messages=msgs, tools=tools, tool_choice=mode, forced_name=forced, parallel_tool_calls=parallel,
                    template_kwargs=kwargs, fields={"messages": "messages", "tools": "tools", "tool_choice": "tool_choice"})


def _stop(run: ChatRun, stops: list[str]) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)``: a stop that was not the end-of-turn token was a stop sequence."""
    reason = run.finish_reason(0)
    if reason == "stop":
        last = run.job.last.get(0)
        eos = run.job.reqs[0].params.stop_token_set(run.server.tokenizer.eos_token_ids)
        if stops and (last is None or last.token_id not in eos):
            return "stop_sequence", stops[0] if len(stops) == 1 else None
        return "end_turn", None
    return STOP_REASONS.get(reason, "end_turn"), None


async def create_message(server: EmberServer, body: MessagesRequest, request: Request) -> Response:
    server.check_model(body.model)
    if body.max_tokens is None:
        raise APIError(400, "max_tokens is required", param="max_tokens")
    prepared = await prepare_chat(server, to_spec(body))
    fields = SimpleNamespace(n=1, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             stop=body.stop_sequences or None)
    seqs = await server.build_sequences([prepared.ids], fields, body.max_tokens, None, None, prepared.grammar)
    job = server.start(seqs)
    run = ChatRun(server, job, prepared)
    mid = f"msg_{uuid.uuid4().hex}"
    stops = body.stop_sequences or []
    if body.stream:
        return sse(_stream(server, run, mid, stops))
    parsed = (await run.collect(request))[0]
    content: list[dict] = []
    if parsed.reasoning:
        content.append({"type": "thinking", "thinking": parsed.reasoning, "signature": ""})
    if parsed.content or not parsed.calls:
        content.append({"type": "text", "text": parsed.content})
    for c in parsed.calls:
        content.append({"type": "tool_use", "id": c.id.replace("call_", "toolu_"), "name": c.name,
                        "input": _input(c.arguments)})
    reason, seq = _stop(run, stops)
    ch = run.choices[0]
    return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": server.settings.model_name,
                         "content": content, "stop_reason": reason, "stop_sequence": seq,
                         "usage": {"input_tokens": ch.prompt_tokens, "output_tokens": ch.completion_tokens,
                                   "cache_read_input_tokens": ch.cached_tokens}})


def _input(arguments: str) -> dict:
    try:
        v = json.loads(arguments)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


async def _stream(server: EmberServer, run: ChatRun, mid: str, stops: list[str]) -> AsyncIterator[str]:
    kinds = {"reasoning": "thinking", "content": "text"}
    n_prompt = len(run.job.reqs[0].prompt_ids)
    msg = {"id": mid, "type": "message", "role": "assistant", "model": server.settings.model_name, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}
    index, open_kind, open_call = -1, None, -1
    try:
        yield sse_json({"type": "message_start", "message": msg}, "message_start")
        async for batch in run.stream():
            out = []
            for _, deltas, ev in batch:
                if ev.finish_reason == "error":
                    out.append(sse_json(anthropic_error_body(500, f"generation failed: {ev.error}"), "error"))
                    continue
                for d in deltas:
                    kind = "tool_use" if d.kind in ("call", "args") else kinds[d.kind]
                    if d.kind == "call" or kind != open_kind or (kind == "tool_use" and d.index != open_call):
                        if open_kind is not None:
                            out.append(sse_json({"type": "content_block_stop", "index": index}, "content_block_stop"))
                        index += 1
                        open_kind, open_call = kind, d.index
                        block = {"type": "thinking", "thinking": ""} if kind == "thinking" else \
                            {"type": "text", "text": ""} if kind == "text" else \
                            {"type": "tool_use", "id": (d.id or "").replace("call_", "toolu_"), "name": d.name, "input": {}}
                        out.append(sse_json({"type": "content_block_start", "index": index, "content_block": block},
                                            "content_block_start"))
                    if d.kind == "call":
                        continue
                    delta = {"type": "thinking_delta", "thinking": d.text} if kind == "thinking" else \
                        {"type": "text_delta", "text": d.text} if kind == "text" else \
                        {"type": "input_json_delta", "partial_json": d.text}
                    out.append(sse_json({"type": "content_block_delta", "index": index, "delta": delta},
                                        "content_block_delta"))
                if ev.finish_reason is not None:
                    if open_kind is None:  # nothing was written: one empty text block, as Anthropic sends
                        index += 1
                        out.append(sse_json({"type": "content_block_start", "index": index,
                                             "content_block": {"type": "text", "text": ""}}, "content_block_start"))
                        open_kind = "text"
                    out.append(sse_json({"type": "content_block_stop", "index": index}, "content_block_stop"))
                    open_kind = None
                    reason, seq = _stop(run, stops)
                    out.append(sse_json({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                         "usage": {"output_tokens": run.choices[0].completion_tokens}},
                                        "message_delta"))
                    out.append(sse_json({"type": "message_stop"}, "message_stop"))
            if out:
                yield "".join(out)
    finally:
        run.job.cancel()
