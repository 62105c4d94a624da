"""OpenAI's Responses API: ``POST /v1/responses``.

``input`` is text or a list of items (messages with text parts, ``function_call`` and
``function_call_output`` items); ``instructions`` becomes the system message; function tools,
``tool_choice``, ``parallel_tool_calls``, ``max_output_tokens``, ``temperature``/``top_p``,
``reasoning.effort`` and ``text.format`` (``json_object``/``json_schema``) are honoured. The answer's
``output`` holds ``reasoning``, ``message`` and ``function_call`` items, with ``usage``; streams send
the typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.function_call_arguments.delta`` ... ``response.completed``).

Responses are kept in memory for ``previous_response_id`` (the conversation so far, without that
request's ``instructions``, as OpenAI does), the oldest dropped beyond ``max_stored_responses``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ember.chat_formats import ParsedOutput
from ember.server.chat import ChatRun, ChatSpec, prepare_chat
from ember.server.core import EmberServer, sse, sse_json
from ember.server.errors import APIError
from ember.server.openai_api import tool_choice_of


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = True
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


def register(app: FastAPI, server: EmberServer) -> None:
    store: OrderedDict[str, list[dict]] = OrderedDict()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(server, store, body, request)


def _text(content: Any, where: str) -> Any:
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be text or a list of content parts", param=where)
    return content  # parts are checked (text only) where the prompt is built


def input_messages(items: str | list[dict]) -> list[dict]:
    """Responses input items as OpenAI chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for k, it in enumerate(items):
        where = f"input.{k}"
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant, got {role!r}",
                               param=f"{where}.role")
            out.append({"role": role, "content": _text(it.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str) or not isinstance(it.get("call_id"), str):
                raise APIError(400, f"{where}: a function_call item needs 'name' and 'call_id'", param=where)
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = it.get("output")
            out.append({"role": "tool", "tool_call_id": it.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise APIError(400, f"{where}.type {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning)", param=f"{where}.type")
    return out


def _tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise APIError(400, f"tools.{i}.type {t.get('type')!r} is not supported: only function tools",
                           param=f"tools.{i}.type")
        out.append({"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                     "parameters": t.get("parameters") or {"type": "object"}}})
    return out


async def create_response(server: EmberServer, store: OrderedDict, body: ResponsesRequest, request: Request) -> Response:
    server.check_model(body.model)
    history: list[dict] = []
    if body.previous_response_id is not None:
        if body.previous_response_id not in store:
            raise APIError(404 if body.previous_response_id.startswith("resp_") else 400,
                           f"previous_response_id {body.previous_response_id!r} is not stored on this server (it keeps "
                           f"the last {server.settings.max_stored_responses})", param="previous_response_id")
        history = list(store[body.previous_response_id])
    conversation = history + input_messages(body.input)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    tc = body.tool_choice
    if isinstance(tc, dict) and tc.get("type") == "function" and "name" in tc:
        tc = {"type": "function", "function": {"name": tc["name"]}}
    mode, forced = tool_choice_of(tc)
    kwargs = {}
    if body.reasoning and body.reasoning.get("effort"):
        kwargs["reasoning_effort"] = body.reasoning["effort"]
    spec = ChatSpec(messages=messages, tools=_tools(body.tools), tool_choice=mode, forced_name=forced,
                    parallel_tool_calls=body.parallel_tool_calls is not False, template_kwargs=kwargs,
                    fields={"messages": "input", "tools": "tools", "tool_choice": "tool_choice"})
    prepared = await prepare_chat(server, spec)
    grammar = prepared.grammar or _text_format_grammar(server, body.text)
    if grammar is not None:
        await server.check_grammar(grammar, "text.format")
    fields = SimpleNamespace(n=1, temperature=body.temperature, top_p=body.top_p, stop=None)
    seqs = await server.build_sequences([prepared.ids], fields, body.max_output_tokens, None, None, grammar,
                                        max_param="max_output_tokens")
    job = server.start(seqs)
    run = ChatRun(server, job, prepared)
    rid = f"resp_{uuid.uuid4().hex}"
    base = _skeleton(server, body, rid)
    keep = body.store is not False
    if body.stream:
        return sse(_stream(server, store if keep else None, conversation, run, base))
    parsed = (await run.collect(request))[0]
    items = _output_items(parsed)
    resp = _final(base, run, items)
    if keep:
        _store(server, store, rid, conversation, items)
    return JSONResponse(resp)


def _text_format_grammar(server: EmberServer, text: dict | None):
    fmt = (text or {}).get("format") or {}
    if fmt.get("type") == "json_object":
        return server.grammar(None, "text.format")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "text.format.schema is required for type json_schema", param="text.format.schema")
        return server.grammar(fmt["schema"], "text.format.schema")
    return None


def _skeleton(server: EmberServer, body: ResponsesRequest, rid: str) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress", "error": None,
            "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": server.settings.model_name, "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": body.reasoning or {"effort": None},
            "store": body.store is not False, "temperature": body.temperature, "top_p": body.top_p,
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "truncation": "disabled", "metadata": body.metadata or {}, "usage": None}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _output_items(p: ParsedOutput) -> list[dict]:
    items = []
    if p.reasoning:
        items.append(_reasoning_item(p.reasoning))
    if p.content or not p.calls:
        items.append(_message_item(p.content))
    items += [_call_item(c.id, c.name, c.arguments) for c in p.calls]
    return items


def _final(base: dict, run: ChatRun, items: list[dict]) -> dict:
    c = run.choices[0]
    length = c.finish_reason == "length"
    return {**base, "status": "incomplete" if length else "completed", "output": items,
            "incomplete_details": {"reason": "max_output_tokens"} if length else None,
            "usage": {"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": c.cached_tokens},
                      "output_tokens": c.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": c.prompt_tokens + c.completion_tokens}}


def _store(server: EmberServer, store: OrderedDict, rid: str, conversation: list[dict], items: list[dict]) -> None:
    turn: dict = {"role": "assistant", "content": ""}
    for it in items:
        if it["type"] == "message":
            turn["content"] = it["content"][0]["text"]
        elif it["type"] == "function_call":
            turn.setdefault("tool_calls", []).append({"id": it["call_id"], "type": "function",
                                                      "function": {"name": it["name"], "arguments": it["arguments"]}})
    store[rid] = conversation + [turn]
    while len(store) > server.settings.max_stored_responses:
        store.popitem(last=False)


async def _stream(server: EmberServer, store: OrderedDict | None, conversation: list[dict], run: ChatRun,
                  base: dict) -> AsyncIterator[str]:
    seq = 0

    def ev(kind: str, **data) -> str:
        nonlocal seq
        seq += 1
        return sse_json({"type": kind, "sequence_number": seq - 1, **data}, kind)

    items: list[dict] = []
    cur: dict | None = None  # the open item
    calls: dict[int, dict] = {}

    def close() -> list[str]:
        nonlocal cur
        if cur is None:
            return []
        i, out = len(items) - 1, []
        if cur["type"] == "message":
            part = cur["content"][0]
            out += [ev("response.output_text.done", item_id=cur["id"], output_index=i, content_index=0,
                       text=part["text"], logprobs=[]),
                    ev("response.content_part.done", item_id=cur["id"], output_index=i, content_index=0, part=part)]
        elif cur["type"] == "reasoning":
            out.append(ev("response.reasoning_text.done", item_id=cur["id"], output_index=i, content_index=0,
                          text=cur["content"][0]["text"]))
        else:
            out.append(ev("response.function_call_arguments.done", item_id=cur["id"], output_index=i,
                          name=cur["name"], arguments=cur["arguments"]))
        cur["status"] = "completed"
        out.append(ev("response.output_item.done", output_index=i, item=cur))
        cur = None
        return out

    def open_item(item: dict) -> list[str]:
        nonlocal cur
        out = close()
        items.append(item)
        cur = item
        added = {**item, "status": "in_progress"}
        out.append(ev("response.output_item.added", output_index=len(items) - 1, item=added))
        if item["type"] == "message":
            out.append(ev("response.content_part.added", item_id=item["id"], output_index=len(items) - 1,
                          content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        return out

    try:
        yield ev("response.created", response=base) + ev("response.in_progress", response=base)
        async for batch in run.stream():
            out: list[str] = []
            for _, deltas, e in batch:
                if e.finish_reason == "error":
                    out.append(ev("error", code="server_error", message=f"generation failed: {e.error}", param=None))
                    continue
                for d in deltas:
                    i = len(items) - 1
                    if d.kind == "content":
                        if cur is None or cur["type"] != "message":
                            out += open_item(_message_item("", "in_progress"))
                            i = len(items) - 1
                        cur["content"][0]["text"] += d.text
                        out.append(ev("response.output_text.delta", item_id=cur["id"], output_index=i, content_index=0,
                                      delta=d.text, logprobs=[]))
                    elif d.kind == "reasoning":
                        if cur is None or cur["type"] != "reasoning":
                            out += open_item(_reasoning_item(""))
                            i = len(items) - 1
                        cur["content"][0]["text"] += d.text
                        out.append(ev("response.reasoning_text.delta", item_id=cur["id"], output_index=i,
                                      content_index=0, delta=d.text))
                    elif d.kind == "call":
                        calls[d.index] = _call_item(d.id or "", d.name or "", "", "in_progress")
                        out += open_item(calls[d.index])
                    else:
                        item = calls[d.index]
                        item["arguments"] += d.text
                        out.append(ev("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=items.index(item), delta=d.text))
            if out:
                yield "".join(out)
        tail = close()
        if not items:  # nothing written: one empty message, as the non-streaming answer has
            tail += open_item(_message_item("", "in_progress")) + close()
        final = _final(base, run, items)
        if store is not None:
            _store(server, store, base["id"], conversation, items)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield "".join(tail) + ev(kind, response=final)
    finally:
        run.job.cancel()
