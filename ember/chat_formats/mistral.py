"""Mistral calls: ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]``, or ``[TOOL_CALLS]name[ARGS]{..}`` (v11+ tokenizers)."""

from __future__ import annotations

import json
import re

from ember.chat_formats.base import ToolFormat, calls_from_json

_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")


class Mistral(ToolFormat):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)
    special_markers = ("[TOOL_CALLS]", "[ARGS]")
    forced_open = "["
    forced_close = "]"

    def matches(self, template: str) -> bool:
        return "[TOOL_CALLS]" in template

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        if not _NAMED.match(body):
            return calls_from_json(body)
        out = []
        for part in body.split("[TOOL_CALLS]"):  # each call of the v11 form has its own marker
            m = _NAMED.match(part)
            if m is None:
                return None
            try:
                args = json.loads(part[m.end():].strip())
            except ValueError:
                return None
            if not isinstance(args, dict):
                return None
            out.append((m.group(1), json.dumps(args, ensure_ascii=False)))
        return out
