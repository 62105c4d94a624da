"""gpt-oss's harmony format: the output is a sequence of messages, each with a header and a channel.

What a gpt-oss model writes after its prompt's ``<|start|>assistant``::

    <|channel|>analysis<|message|>...chain of thought...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>
    <|start|>assistant<|channel|>final<|message|>...the answer...<|return|>

A header runs up to ``<|message|>``; the body up to ``<|end|>`` (more messages follow), ``<|return|>`` (the
answer is complete) or ``<|call|>`` (a tool call waits for its result). The recipient ``to=functions.NAME`` may
stand before or after the channel. :class:`HarmonyParser` maps the ``analysis`` channel to reasoning, ``final``
(and any other message with no recipient) to content, and a message to ``functions.NAME`` to a tool call whose
arguments are the body. It gives :class:`~ember.chat_formats.base.Delta` s as
:class:`~ember.chat_formats.parser.OutputParser` does, streaming text as it comes.
"""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import Delta, StreamParser, ToolFormat, new_call_id

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", *ENDS)
_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_.\-]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


def _held(buf: str) -> int:
    """Length of the longest tail of ``buf`` that may be the start of an end marker (kept back while streaming)."""
    for k in range(min(len(buf), max(map(len, ENDS)) - 1), 0, -1):
        if any(m.startswith(buf[-k:]) for m in ENDS):
            return k
    return 0


class HarmonyParser(StreamParser):
    """Streaming split of one gpt-oss output into reasoning, content and tool calls (module docstring).

    Args:
        tools: read ``to=functions.NAME`` messages as calls (False: their bodies are content).
    """

    def __init__(self, tools: bool = True) -> None:
        self.tools = tools
        self.buf = ""
        self.kind: str | None = None  # None: reading a header; "reasoning" / "content" / "call": a body
        self.name = ""
        self.calls = 0

    def finish(self) -> list[Delta]:
        """Everything still held back, at the end of the output (a cut-off body is kept as it is)."""
        out: list[Delta] = []
        while self._step(out, final=True):
            pass
        if self.kind == "call":
            self._call(self.buf, out)
        elif self.kind is not None:
            self._text(self.buf, out)
        elif self.buf.strip() and not any(m in self.buf for m in MARKERS):
            out.append(Delta("content", self.buf))  # plain text with no harmony structure at all
        self.buf = ""
        return out

    def _step(self, out: list[Delta], final: bool) -> bool:
        if self.kind is None:
            i = self.buf.find(MESSAGE)
            if i < 0:
                return False
            header, self.buf = self.buf[:i], self.buf[i + len(MESSAGE):]
            to = _RECIPIENT.search(header)
            channel = _CHANNEL.search(header)
            if to is not None and self.tools:
                self.kind, self.name = "call", to.group(1)
            elif channel is not None and channel.group(1) == "analysis":
                self.kind = "reasoning"
            else:
                self.kind = "content"
            return True
        ends = [(self.buf.find(m), m) for m in ENDS if m in self.buf]
        if ends:
            i, m = min(ends)
            body, self.buf = self.buf[:i], self.buf[i + len(m):]
            if self.kind == "call":
                self._call(body, out)
            else:
                self._text(body, out)
            self.kind = None
            return True
        if self.kind != "call" and not final:
            keep = _held(self.buf)
            self._text(self.buf[:len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _text(self, text: str, out: list[Delta]) -> None:
        if text:
            out.append(Delta(self.kind or "content", text))

    def _call(self, body: str, out: list[Delta]) -> None:
        try:
            args = json.loads(body.strip() or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):  # not a well-formed call: the model's text is kept as content
            out.append(Delta("content", body))
            return
        out += [Delta("call", index=self.calls, id=new_call_id(), name=self.name),
                Delta("args", json.dumps(args, ensure_ascii=False), self.calls)]
        self.calls += 1


class Harmony(ToolFormat):
    """gpt-oss (harmony): calls are messages to ``functions.NAME`` on the commentary channel; the server and
    ``ember chat`` read outputs with :meth:`output_parser` instead of the marker parser."""

    name = "harmony"
    start_markers = ()
    special_markers = MARKERS
    stop_markers = ("<|return|>", "<|call|>")  # the answer is complete, or a call waits for its result
    forced_open = "<|channel|>commentary to=functions."
    forced_close = "<|call|>"

    def matches(self, template: str) -> bool:
        return "<|channel|>" in template and "<|message|>" in template

    def forced_call(self, name: str) -> tuple[str, str]:
        """A forced call: the header naming the recipient, then the arguments object as the body."""
        return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>", "<|call|>"

    def output_parser(self, tools: bool) -> HarmonyParser:
        """The parser of one output (tools on or off)."""
        return HarmonyParser(tools)


# Ember's harmony chat template, written from the published format (OpenAI's harmony guide): a system message
# with the model identity, knowledge cutoff, date and ``Reasoning: {effort}``; the first system/developer turn
# becomes the developer message's ``# Instructions``, and tools are rendered there as a TypeScript-like
# ``functions`` namespace; earlier assistant turns keep only their final channel (their analysis is dropped),
# except the analysis before a tool call that has no final answer after it yet. Variables beyond HF's:
# ``reasoning_effort`` (default "medium"), ``model_identity``, ``current_date`` (default: today).
HARMONY_TEMPLATE = r"""
{%- macro ts_type(s) -%}
{%- if s.enum is defined -%}
{%- for v in s.enum %}{{ v | tojson }}{{ " | " if not loop.last }}{% endfor -%}
{%- elif s.type is defined and s.type is not string -%}
{%- for t in s.type %}{{ ts_type({"type": t}) }}{{ " | " if not loop.last }}{% endfor -%}
{%- elif s.type == "string" -%}string
{%- elif s.type in ("number", "integer") -%}number
{%- elif s.type == "boolean" -%}boolean
{%- elif s.type == "null" -%}null
{%- elif s.type == "array" -%}{{ ts_type(s["items"]) if s["items"] is defined else "any" }}[]
{%- elif s.type == "object" and s.properties is defined -%}
{ {%- for name, p in s.properties.items() %} {{ name }}{{ "" if name in (s.required or []) else "?" }}: {{ ts_type(p) }}{{ "," if not loop.last }}{% endfor %} }
{%- elif s.type == "object" -%}object
{%- else -%}any
{%- endif -%}
{%- endmacro -%}
{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort else "medium" -%}
{%- set today = current_date if current_date is defined else strftime_now("%Y-%m-%d") -%}
<|start|>system<|message|>{{ model_identity if model_identity is defined else "You are ChatGPT, a large language model trained by OpenAI." }}
Knowledge cutoff: 2024-06
Current date: {{ today }}

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{{- "\nCalls to these tools must go to the commentary channel: 'functions'." if tools }}<|end|>
{%- if messages and messages[0].role in ("system", "developer") -%}
{%- set instructions = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set instructions = "" -%}{%- set turns = messages -%}
{%- endif -%}
{%- if instructions or tools -%}
{{- "<|start|>developer<|message|>" -}}
{{- "# Instructions\n\n" + instructions + "\n\n" if instructions -}}
{%- if tools -%}
{{- "# Tools\n\n## functions\n\nnamespace functions {\n\n" -}}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{{- "// " + f.description + "\n" if f.description -}}
{{- "type " + f.name + " = " -}}
{%- if f.parameters and f.parameters.properties -%}
{{- "(_: {\n" -}}
{%- for name, p in f.parameters.properties.items() -%}
{{- "// " + p.description + "\n" if p.description -}}
{{- name + ("" if name in (f.parameters.required or []) else "?") + ": " + ts_type(p) + "," -}}
{%- if p.default is defined -%}
{{- " // default: " + (p.default | string if p.enum is defined else p.default | tojson) -}}
{%- endif -%}
{{- "\n" -}}
{%- endfor -%}
{{- "}) => any;\n\n" -}}
{%- else -%}
{{- "() => any;\n\n" -}}
{%- endif -%}
{%- endfor -%}
{{- "} // namespace functions" -}}
{%- endif -%}
{{- "<|end|>" -}}
{%- endif -%}
{%- set state = namespace(tool=none) -%}
{%- for m in turns -%}
{%- if m.role == "assistant" and m.tool_calls -%}
{%- set later = namespace(final=false) -%}
{%- for n in turns[loop.index:] %}{% if n.role == "assistant" and not n.tool_calls %}{% set later.final = true %}{% endif %}{% endfor -%}
{%- set thought = m.thinking if m.thinking is defined and m.thinking else (m.content or "") -%}
{%- if thought and not later.final -%}
<|start|>assistant<|channel|>analysis<|message|>{{ thought }}<|end|>
{%- endif -%}
{%- for tc in m.tool_calls %}{% set c = tc.function if tc.function is defined else tc -%}
<|start|>assistant to=functions.{{ c.name }}<|channel|>commentary json<|message|>
{{- c.arguments if c.arguments is string else c.arguments | tojson }}<|call|>
{%- set state.tool = c.name -%}
{%- endfor -%}
{%- elif m.role == "assistant" -%}
{%- if loop.last and not add_generation_prompt and m.thinking is defined and m.thinking -%}
<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>
{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content or "" }}{{ "<|return|>" if loop.last and not add_generation_prompt else "<|end|>" }}
{%- set state.tool = none -%}
{%- elif m.role == "tool" -%}
{%- if state.tool is none %}{{ raise_exception("a tool message must follow an assistant message with a tool call") }}{% endif -%}
<|start|>functions.{{ m.name if m.name is defined and m.name else state.tool }} to=assistant<|channel|>commentary<|message|>{{ m.content | tojson }}<|end|>
{%- elif m.role == "user" -%}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role in ("system", "developer") -%}
<|start|>developer<|message|># Instructions

{{ m.content }}

<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}
"""
