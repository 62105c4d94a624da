"""Hermes-style calls (Qwen2.5/3/3.5, Hermes, many fine-tunes): ``<tool_call>{"name": .., "arguments": ..}</tool_call>``.

Also the fallback for templates that know no tools: the server describes the tools in a system
message (:func:`fallback_system_prompt`) and reads calls in this format.
"""

from __future__ import annotations

import json

from ember.chat_formats.base import ToolFormat


class Hermes(ToolFormat):
    name = "hermes"
    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"
    forced_open = "<tool_call>\n"
    forced_close = "\n</tool_call>"

    def matches(self, template: str) -> bool:
        return "<tool_call>" in template


def fallback_system_prompt(tools: list[dict]) -> str:
    """The tool description for a model whose chat template has no tool support (Qwen2.5's wording)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
