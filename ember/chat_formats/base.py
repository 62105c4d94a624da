"""What a family's tool-call format is made of, and the pieces every format shares.

A :class:`ToolFormat` says how a model family writes tool calls in its output (the markers around
a call and how to read the call's body) and how a call is *forced* (the fixed text a constrained
decode writes around the arguments). :class:`~ember.chat_formats.parser.OutputParser` uses it to
split generated text into reasoning, content and tool calls, streaming or not.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

# The reasoning block most families write (Qwen3, DeepSeek-R1, GLM, MiniMax); a format names its own in ``think``.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())


def new_call_id() -> str:
    """An id for a tool call (``call_`` + 24 hex digits, the shape OpenAI uses)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Delta:
    """A piece of parsed output, in the order it was generated.

    kind: ``"reasoning"`` / ``"content"`` (``text``), ``"call"`` (a call starts: ``index``, ``id``,
    ``name``), ``"args"`` (a fragment of call ``index``'s arguments: ``text``).
    """

    kind: str
    text: str = ""
    index: int = -1
    name: str | None = None
    id: str | None = None


class StreamParser:
    """A streaming output parser: text arrives in pieces (``feed``); the subclass's ``_step(out, final)`` decides
    what it can from ``self.buf``, appends its deltas to ``out`` and returns whether it made progress."""

    buf: str

    def feed(self, text: str) -> list[Delta]:
        """Deltas decided by ``text`` (and what came before)."""
        self.buf += text
        out: list[Delta] = []
        while self._step(out, final=False):
            pass
        return out

    def _step(self, out: list[Delta], final: bool) -> bool:
        raise NotImplementedError


class ToolFormat:
    """A family's way of writing tool calls.

    Attributes:
        name: the registry key (``hermes``, ``llama3``, ``mistral``).
        start_markers: texts that open a call (or a section of calls).
        end_marker: text that closes one call; None when a call section runs to the end of the output.
        special_markers: markers that are special tokens (the server's detokenizer drops special tokens,
            so it writes these back into the text from their ids).
        json_at_start: a ``{`` as the first thing in the output also opens a call (Llama 3.1 writes bare JSON).
        args_key: the key of the arguments in a call's JSON object.
        forced_open, forced_close: text before ``{"name": ...`` and after the call's closing ``}`` when a
            call is forced (written by the constrained decoder, so they must be plain text, not special tokens).
        think: the markers that open and close the model's reasoning (``<think>``, ``</think>`` unless the family
            writes another pair).
        stop_markers: tokens that end the model's turn besides its EOS ids (a call waits for its result there),
            which ``generation_config.json`` may not list.
    """

    name = "base"
    start_markers: tuple[str, ...] = ()
    end_marker: str | None = None
    special_markers: tuple[str, ...] = ()
    json_at_start = False
    args_key = "arguments"
    forced_open = ""
    forced_close = ""
    think: tuple[str, str] = (THINK_OPEN, THINK_CLOSE)
    stop_markers: tuple[str, ...] = ()

    def stop_ids(self, token_to_id) -> list[int]:
        """Ids of :attr:`stop_markers` in a vocabulary (``token_to_id(text) -> int | None``; absent ones left out)."""
        return [i for i in map(token_to_id, self.stop_markers) if i is not None]

    def matches(self, template: str) -> bool:
        """True when a chat template's source shows this format."""
        return False

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        """The calls in the text between a start marker and the end marker (or the output's end).

        Returns:
            ``[(name, arguments JSON text), ...]``, or None when the text is not a call (it is then content).
        """
        return calls_from_json(body, self.args_key)

    def forced_call(self, name: str) -> tuple[str, str]:
        """``(prefix, suffix)`` of a forced call to ``name``: the constrained decoder writes prefix, the
        arguments (a JSON object valid for the tool's schema) and suffix."""
        head = json.dumps({"name": name}, ensure_ascii=False)[:-1]  # '{"name": "f"'
        return f'{self.forced_open}{head}, "{self.args_key}": ', "}" + self.forced_close


def calls_from_json(body: str, args_key: str = "arguments") -> list[tuple[str, str]] | None:
    """Calls written as a JSON object ``{"name": .., "arguments": {..}}`` or a list of them.

    ``parameters`` is accepted for ``arguments`` (and the reverse), as models mix them up. Arguments
    written as a JSON string holding an object are unwrapped.
    """
    try:
        value = json.loads(body.strip())
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = it.get(args_key, it.get("arguments", it.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        out.append((it["name"], json.dumps(args, ensure_ascii=False)))
    return out or None
