"""MiniMax-M2 calls: one section of ``<invoke>`` elements, each parameter a tag::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

As in GLM's format, a value that reads as JSON is taken as that JSON and anything else as a string. Reasoning comes
in ``<think>..</think>``; MiniMax's template opens the ``<think>`` in the prompt.
"""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import ToolFormat
from ember.chat_formats.glm import typed_value

_INVOKE = re.compile(r'<invoke name="([^"]+)">(.*?)</invoke>', re.DOTALL)
_PARAM = re.compile(r'<parameter name="([^"]+)">(.*?)</parameter>', re.DOTALL)


class MiniMaxM2(ToolFormat):
    name = "minimax_m2"
    start_markers = ("<minimax:tool_call>",)
    end_marker = "</minimax:tool_call>"
    forced_open = "<minimax:tool_call>\n"
    forced_close = "\n</minimax:tool_call>"

    def matches(self, template: str) -> bool:
        return "minimax:tool_call" in template

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        calls = []
        for name, inner in _INVOKE.findall(body):
            args = {k: typed_value(v.strip("\n")) for k, v in _PARAM.findall(inner)}
            if _PARAM.sub("", inner).strip():
                return None
            calls.append((name, json.dumps(args, ensure_ascii=False)))
        if not calls or _INVOKE.sub("", body).strip():
            return None
        return calls
