"""DeepSeek-V3/R1 calls: one section of calls, each a type, the function's name and its JSON arguments::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek-V3.1 drops the type and the code fence: ``<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}
<｜tool▁call▁end｜>``. Both read back the same; the template (whether it writes the fence) picks the forced
call's shape. Reasoning (R1, V3.1 thinking) comes in ``<think>..</think>``.
"""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import ToolFormat

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_FENCED = re.compile(r"([^\n`]+?)\s*\n\s*```(?:json)?\s*(.*?)\s*```\s*", re.DOTALL)


def _args(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


class DeepSeekV3(ToolFormat):
    name = "deepseek_v3"
    start_markers = (CALLS_BEGIN,)
    end_marker = CALLS_END
    special_markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

    def matches(self, template: str) -> bool:
        return CALLS_BEGIN in template and "```json" in template

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        pieces = body.split(CALL_BEGIN)
        if pieces[0].strip() or len(pieces) < 2:
            return None
        calls = []
        for piece in pieces[1:]:
            inner, end, rest = piece.partition(CALL_END)
            head, sep, tail = inner.partition(SEP)
            if not end or rest.strip() or not sep:
                return None
            if head.strip() == "function" and (m := _FENCED.fullmatch(tail)):  # V3: type, name, fenced JSON
                name, args = m.group(1).strip(), _args(m.group(2))
            else:  # V3.1: name, then the JSON
                name, args = head.strip(), _args(tail)
            if args is None or not name or any(c in name for c in "<>{}\n "):
                return None
            calls.append((name, args))
        return calls

    def forced_call(self, name: str) -> tuple[str, str]:
        return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n", f"\n```{CALL_END}{CALLS_END}"


class DeepSeekV31(DeepSeekV3):
    """DeepSeek-V3.1's template: the same section, calls written without the type and the code fence."""

    name = "deepseek_v31"

    def matches(self, template: str) -> bool:
        return CALLS_BEGIN in template

    def forced_call(self, name: str) -> tuple[str, str]:
        return f"{CALLS_BEGIN}{CALL_BEGIN}{name}{SEP}", f"{CALL_END}{CALLS_END}"
