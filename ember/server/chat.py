"""One chat turn, whichever API asked for it: messages and tools in, reasoning, content and tool calls out.

The OpenAI chat, Responses and Anthropic Messages routes all translate their request into a
:class:`ChatSpec` (OpenAI-style messages and function tools); :func:`prepare_chat` validates it,
renders the prompt through the checkpoint's own chat template (``tools=`` as HF passes them, plus
``chat_template_kwargs``), and picks how the output is read: :class:`~ember.chat_formats.OutputParser`
for the family's tool-call format and ``<think>`` reasoning, or, when a call is forced
(``tool_choice`` required or a named function), a grammar that makes the model write exactly one
call whose arguments validate against the tool's schema, read by
:class:`~ember.chat_formats.ForcedCallParser`.

A template that does not read ``tools`` gets the documented fallback: the tools are described in a
system message (Hermes wording), earlier calls and results are written into the conversation as
``<tool_call>``/``<tool_response>`` text, and calls are read in Hermes format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ember.chat_formats import (Delta, ForcedCallParser, OutputParser, ParsedOutput, fallback_system_prompt,
                                prompt_in_reasoning)
from ember.errors import ChatTemplateError, UnsupportedSchemaError
from ember.json_constraint import JsonGrammar, compile_tool_call_grammar
from ember.scheduler import SeqEvent
from ember.server.core import Choice, EmberServer, Job
from ember.server.errors import APIError


@dataclass
class ChatSpec:
    """A chat turn in OpenAI's terms (every API is translated into this).

    Attributes:
        messages: ``{"role", "content": str | parts, "tool_calls": [{"id", "function": {"name", "arguments"}}],
            "tool_call_id", "name", "reasoning_content"}`` dicts.
        tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]`` or None.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function name (str in ``forced_name``).
        fields: the request's own names for ``messages``/``tools``/``tool_choice`` (for 400s).
    """

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str = "auto"
    forced_name: str | None = None
    parallel_tool_calls: bool = True
    template_kwargs: dict = field(default_factory=dict)
    fields: dict = field(default_factory=lambda: {"messages": "messages", "tools": "tools",
                                                  "tool_choice": "tool_choice"})


@dataclass
class PreparedChat:
    ids: list[int]
    grammar: JsonGrammar | None
    make_parser: Callable[[], Any] | None   # None: plain text, no parsing
    tools_on: bool
    max_calls: int | None = None            # 1 with parallel_tool_calls false: later calls are dropped


def _name(spec: ChatSpec, key: str) -> str:
    return spec.fields.get(key, key)


def check_tools(spec: ChatSpec) -> list[str]:
    """Validate tools and tool_choice; returns the tool names."""
    names = []
    for i, t in enumerate(spec.tools or []):
        where = f"{_name(spec, 'tools')}.{i}"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"{where}: a tool must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}",
                           param=where)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise APIError(400, f"{where}.function.parameters must be a JSON Schema object with type 'object'",
                           param=f"{where}.function.parameters")
        if fn["name"] in names:
            raise APIError(400, f"{where}.function.name: tool {fn['name']!r} is given twice", param=f"{where}.function.name")
        names.append(fn["name"])
    where = _name(spec, "tool_choice")
    if spec.tool_choice in ("required",) or spec.forced_name is not None:
        if not names:
            raise APIError(400, f"{where} asks for a tool call but no tools are given", param=where)
    if spec.forced_name is not None and spec.forced_name not in names:
        raise APIError(400, f"{where}: no tool named {spec.forced_name!r} (tools: {', '.join(names)})", param=where)
    return names


def _arguments(value: Any, where: str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise APIError(400, f"{where} must be a JSON object (as text), got {str(value)[:60]!r}", param=where)
    return out


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else getattr(p, "type", None)
        text = p.get("text") if isinstance(p, dict) else getattr(p, "text", None)
        if kind in ("image_url", "image", "input_image", "input_audio", "file", "document"):
            raise APIError(400, f"{where}.{j}: this model reads text only; {kind!r} parts are not supported",
                           param=f"{where}.{j}")
        if kind not in ("text", "input_text", "output_text") or text is None:
            raise APIError(400, f"{where}.{j}: only text parts are supported, got type {kind!r}", param=f"{where}.{j}")
        parts.append(text)
    return "".join(parts)


def template_messages(spec: ChatSpec, fallback: bool) -> list[dict]:
    """The messages as the template reads them (HF's shape: arguments as dicts), checked; with ``fallback``,
    calls and results written out as Hermes text for a template that knows no tools."""
    where = _name(spec, "messages")
    out: list[dict] = []
    pending: set[str] = set()
    for k, m in enumerate(spec.messages):
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        msg: dict = {"role": role, "content": _text(m.get("content"), f"{where}.{k}.content")}
        if m.get("name"):
            msg["name"] = m["name"]
        if m.get("reasoning_content"):
            msg["reasoning_content"] = m["reasoning_content"]
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise APIError(400, f"{where}.{k}.tool_calls: only assistant messages carry tool calls",
                           param=f"{where}.{k}.tool_calls")
        if calls:
            msg["tool_calls"] = []
            for j, c in enumerate(calls):
                fn = c.get("function") or {}
                if not isinstance(fn.get("name"), str):
                    raise APIError(400, f"{where}.{k}.tool_calls.{j}.function.name is required",
                                   param=f"{where}.{k}.tool_calls.{j}.function.name")
                args = _arguments(fn.get("arguments", "{}"), f"{where}.{k}.tool_calls.{j}.function.arguments")
                msg["tool_calls"].append({"id": c.get("id"), "type": "function",
                                          "function": {"name": fn["name"], "arguments": args}})
                if c.get("id"):
                    pending.add(c["id"])
        if role == "tool":
            cid = m.get("tool_call_id")
            if not cid or cid not in pending:
                raise APIError(400, f"{where}.{k}.tool_call_id: {cid!r} answers no earlier assistant tool call"
                                    + (f" (open calls: {', '.join(sorted(pending))})" if pending else ""),
                               param=f"{where}.{k}.tool_call_id")
            pending.discard(cid)
            msg["tool_call_id"] = cid
        out.append(msg)
    if not fallback:
        return out
    conv: list[dict] = []
    for m in out:
        if m.get("tool_calls"):
            text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                             + "\n</tool_call>" for c in m["tool_calls"])
            conv.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text})
        elif m["role"] == "tool":
            body = f"<tool_response>\n{m['content']}\n</tool_response>"
            if conv and conv[-1]["role"] == "user" and conv[-1].get("_tool"):
                conv[-1]["content"] += "\n" + body  # consecutive results in one turn
            else:
                conv.append({"role": "user", "content": body, "_tool": True})
        else:
            conv.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in conv]


async def prepare_chat(server: EmberServer, spec: ChatSpec) -> PreparedChat:
    """Validate, render and tokenize a chat turn; choose its grammar and output parser."""
    names = check_tools(spec)
    # With tool_choice "none" the model still sees the tools (as OpenAI's and vLLM's do) but no call is read.
    tools_on = bool(names) and spec.tool_choice != "none"
    has_history_tools = any(m.get("tool_calls") or m.get("role") == "tool" for m in spec.messages)
    fallback = not server.template_tools and (bool(names) or has_history_tools)
    messages = template_messages(spec, fallback)
    tools = None
    if names and fallback:
        desc = fallback_system_prompt(spec.tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + desc}
        else:
            messages.insert(0, {"role": "system", "content": desc})
    elif names:
        tools = spec.tools
    tok = server.tokenizer
    try:
        prompt = tok.apply_chat_template(messages, tools=tools, **spec.template_kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param=_name(spec, "messages")) from None
    ids = tok.encode(prompt, add_special_tokens=False)

    fmt = server.tool_format
    grammar, make_parser = None, None
    if tools_on and (spec.tool_choice == "required" or spec.forced_name is not None):
        chosen = [spec.forced_name] if spec.forced_name is not None else names
        alts, schemas, where = [], [], []
        for i, t in enumerate(spec.tools):
            name = t["function"]["name"]
            if name in chosen:
                prefix, suffix = fmt.forced_call(name)
                alts.append((prefix, suffix, name))
                schemas.append(t["function"].get("parameters"))
                where.append(f"{_name(spec, 'tools')}.{i}.function.parameters")
        grammar = await _tool_grammar(server, alts, schemas, where)
        make_parser = lambda: ForcedCallParser(alts)  # noqa: E731
    elif tools_on or server.reasoning:
        in_reasoning = server.reasoning and prompt_in_reasoning(prompt, fmt.think)
        make_parser = lambda: OutputParser(fmt if tools_on else None, server.reasoning, in_reasoning,  # noqa: E731
                                           fmt.think)
        if hasattr(fmt, "output_parser"):  # a format with its own output structure (gpt-oss harmony)
            make_parser = lambda: fmt.output_parser(tools_on)  # noqa: E731
    return PreparedChat(ids, grammar, make_parser, tools_on, None if spec.parallel_tool_calls else 1)


async def _tool_grammar(server: EmberServer, alts: list, schemas: list, where: list[str]) -> JsonGrammar:
    key = "tools:" + json.dumps([[p, s, x] for (p, x, _), s in zip(alts, schemas)], sort_keys=True)
    g = server.cached_grammar(key)
    if g is None:
        try:
            g = compile_tool_call_grammar([(p, s, x) for (p, x, _), s in zip(alts, schemas)], where)
        except UnsupportedSchemaError as e:
            bad = next((w for w in where if str(e).startswith(w)), where[0])
            raise APIError(400, f"{e} (a forced tool call constrains decoding to the tool's schema)", param=bad) from None
        server.remember_grammar(key, g)
    await server.check_grammar(g, "tool_choice")
    return g


class ChatRun:
    """The running choices of one chat turn: events in, parsed deltas out (streaming or collected)."""

    def __init__(self, server: EmberServer, job: Job, prepared: PreparedChat, keep_logprobs: bool = False) -> None:
        self.server, self.job, self.prepared = server, job, prepared
        self.keep_logprobs = keep_logprobs
        self.choices: list[Choice] = server.choices(job)
        self.parsers = [prepared.make_parser() if prepared.make_parser else None for _ in job.reqs]
        self.parsed = [ParsedOutput() for _ in job.reqs]

    def _deltas(self, i: int, text: str, final: bool) -> list[Delta]:
        p = self.parsers[i]
        if p is None:
            ds = [Delta("content", text)] if text else []
        else:
            ds = p.feed(text) if text else []
            if final:
                ds += p.finish()
        cap = self.prepared.max_calls
        if cap is not None:
            ds = [d for d in ds if d.kind not in ("call", "args") or d.index < cap]
        self.parsed[i].add(ds)
        return ds

    async def stream(self) -> AsyncIterator[list[tuple[int, list[Delta], SeqEvent]]]:
        """Per scheduler step: ``(choice, deltas, event)`` of every choice that moved."""
        async for batch in self.job.batches():
            out = []
            for i, ev in batch:
                text = self.choices[i].add(ev, self.keep_logprobs)
                out.append((i, self._deltas(i, text, ev.finish_reason is not None), ev))
            yield out

    async def collect(self, request) -> list[ParsedOutput]:
        """Wait for every choice (non-streaming); the parsed outputs, in choice order."""
        self.choices = await self.server.collect(self.job, request, self.keep_logprobs)
        for i, c in enumerate(self.choices):
            self._deltas(i, c.text, True)
        return self.parsed

    def finish_reason(self, i: int) -> str | None:
        """The choice's finish reason in OpenAI's terms: "tool_calls" when it ended by making calls."""
        r = self.choices[i].finish_reason
        return "tool_calls" if r == "stop" and self.parsed[i].calls else r
