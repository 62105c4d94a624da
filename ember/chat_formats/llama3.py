"""Llama 3.1+ JSON calls: the whole reply is ``{"name": .., "parameters": {..}}`` (optionally after ``<|python_tag|>``)."""

from __future__ import annotations

from ember.chat_formats.base import ToolFormat


class Llama3(ToolFormat):
    name = "llama3"
    start_markers = ("<|python_tag|>",)
    special_markers = ("<|python_tag|>",)
    json_at_start = True
    args_key = "parameters"

    def matches(self, template: str) -> bool:
        return "<|python_tag|>" in template or ("<|start_header_id|>" in template and "ipython" in template)

    def parse_body(self, body: str) -> list[tuple[str, str]] | None:
        # Several calls may be separated by ';' (the Llama 3.2 prompt format allows it).
        whole = super().parse_body(body)
        if whole is not None or ";" not in body:
            return whole
        out = []
        for part in body.split(";"):
            got = super().parse_body(part) if part.strip() else []
            if got is None:
                return None
            out += got
        return out or None
