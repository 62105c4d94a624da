"""Gemma 4's thinking and calls, as its chat template renders them and the model writes them::

    <|channel>thought
    ...reasoning...<channel|>Checking.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>

Reasoning is the ``thought`` channel, after its ``<|channel>thought`` line up to ``<channel|>``. A call is ``call:NAME`` and its
arguments as one object in Gemma's relaxed JSON (:func:`relaxed_json`): keys bare, every string between two
``<|"|>`` tokens (so a string needs no escaping), numbers, booleans, null, objects and arrays as in JSON. All of
these markers are special tokens: the server writes them back into the text from their ids.
"""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import ToolFormat

STRING = '<|"|>'  # opens and closes a string value
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
THOUGHT_OPEN, CHANNEL_CLOSE = "<|channel>thought\n", "<channel|>"  # the channel's header line is not reasoning

_CALL = re.compile(r"\s*call:([A-Za-z0-9_.\-]+)\s*(\{.*\})\s*", re.DOTALL)
# in the text between strings: a JSON string literal (kept), or a bare key after ``{`` or ``,`` (quoted)
_KEY = re.compile(r'("(?:[^"\\]|\\.)*")|([{,]\s*)([A-Za-z_][A-Za-z0-9_\-]*)(\s*:)')


def relaxed_json(text: str) -> object:
    """The value of Gemma's relaxed JSON (bare keys, ``<|"|>`` strings); plain JSON reads the same.

    Raises:
        ValueError: the text is not a value in either form (an odd number of string markers included).
    """
    parts = text.split(STRING)
    if len(parts) % 2 == 0:
        raise ValueError("unbalanced string markers")
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append(json.dumps(part, ensure_ascii=False))
        else:
            out.append(_KEY.sub(lambda m: m.group(1) or f'{m.group(2)}"{m.group(3)}"{m.group(4)}', part))
    return json.loads("".join(out))


class Gemma4(ToolFormat):
    name = "gemma4"
    start_markers = (CALL_OPEN,)
    end_marker = CALL_CLOSE
    special_markers = (CALL_OPEN, CALL_CLOSE, STRING, "<|channel>", CHANNEL_CLOSE)
    think = (THOUGHT_OPEN, CHANNEL_CLOSE)
    stop_markers = ("<|tool_response>",)  # after its calls the model opens the response it waits for

    def matches(self, template: str) -> bool:
        return CALL_OPEN in template

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        m = _CALL.fullmatch(body)
        if m is None:
            return None
        try:
            args = relaxed_json(m.group(2))
        except ValueError:
            return None
        if not isinstance(args, dict):
            return None
        return [(m.group(1), json.dumps(args, ensure_ascii=False))]

    def forced_call(self, name: str) -> tuple[str, str]:
        """A forced call: ``<|tool_call>call:NAME``, the arguments as plain JSON (which :func:`relaxed_json` reads
        too), then ``<tool_call|>``."""
        return f"{CALL_OPEN}call:{name}", CALL_CLOSE
