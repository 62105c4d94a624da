"""GLM-4.5/4.6 calls: the function name, then each argument as a key/value pair of tags::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

GLM's template writes a string value as is and any other value as JSON, so a value that reads as JSON is taken as
that JSON and anything else as a string. Reasoning comes in ``<think>..</think>`` (the parser's default).
"""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import ToolFormat

_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def typed_value(text: str) -> object:
    """A value written as text: its JSON meaning where it has one (numbers, booleans, objects), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class Glm45(ToolFormat):
    name = "glm45"
    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"
    forced_open = "<tool_call>\n"
    forced_close = "\n</tool_call>"

    def matches(self, template: str) -> bool:
        return "<arg_key>" in template

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        name, _, rest = body.strip().partition("<arg_key>")
        name = name.strip()
        if not name or any(c in name for c in "<>{}\n"):
            return None
        rest = "<arg_key>" + rest if rest else ""
        args = {k.strip(): typed_value(v) for k, v in _PAIR.findall(rest)}
        if _PAIR.sub("", rest).strip():  # text outside the pairs: not a call in this format
            return None
        return [(name, json.dumps(args, ensure_ascii=False))]
