"""How model families write tool calls and reasoning, and the parsers that read them back.

- :mod:`~ember.chat_formats.base`: :class:`ToolFormat` (markers, body reader, forced-call text) and
  :class:`ToolCall`/:class:`Delta`.
- :mod:`~ember.chat_formats.parser`: :class:`OutputParser` (streaming split into reasoning, content
  and calls) and :class:`ForcedCallParser` (the output of a constrained call).
- One small module per family: :mod:`~ember.chat_formats.hermes` (Qwen2.5/3, Hermes; also the
  fallback for templates without tools), :mod:`~ember.chat_formats.llama3`, :mod:`~ember.chat_formats.mistral`,
  :mod:`~ember.chat_formats.glm` (GLM-4.5/4.6), :mod:`~ember.chat_formats.minimax` (MiniMax-M2).

Adding a family (gpt-oss harmony, GLM, MiniMax, DeepSeek): a module with a :class:`ToolFormat`
subclass (its markers, ``matches`` on the chat template, ``parse_body`` if its call body is not
``{"name", "arguments"}`` JSON) and one line in :data:`FORMATS` below.
"""

from __future__ import annotations

from ember.chat_formats.base import Delta, ToolCall, ToolFormat, new_call_id
from ember.chat_formats.glm import Glm45
from ember.chat_formats.harmony import Harmony, HarmonyParser
from ember.chat_formats.hermes import Hermes, fallback_system_prompt
from ember.chat_formats.llama3 import Llama3
from ember.chat_formats.minimax import MiniMaxM2
from ember.chat_formats.mistral import Mistral
from ember.chat_formats.parser import THINK_CLOSE, THINK_OPEN, ForcedCallParser, OutputParser, ParsedOutput

# Checked in order against the chat template's source (GLM's before Hermes': both open calls with <tool_call>);
# Hermes is also the default.
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Harmony(), MiniMaxM2(), Glm45(), Mistral(), Llama3(), Hermes())}


def detect_format(template: str) -> ToolFormat:
    """The tool-call format a chat template's source shows (Hermes when it shows none of them)."""
    for fmt in FORMATS.values():
        if fmt.matches(template):
            return fmt
    return FORMATS["hermes"]


def template_has_tools(template: str) -> bool:
    """True when a chat template reads the ``tools`` variable (so tools can be rendered through it)."""
    return "tools" in template


def is_reasoning_template(template: str) -> bool:
    """True when a chat template writes ``<think>`` (a reasoning model: Qwen3, DeepSeek-R1 distills, GLM) or
    harmony's analysis channel (gpt-oss)."""
    return THINK_OPEN in template or "enable_thinking" in template or Harmony().matches(template)


def prompt_in_reasoning(prompt: str) -> bool:
    """True when a rendered prompt ends inside an open ``<think>`` (the template opened it for the model)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


__all__ = ["FORMATS", "Delta", "ForcedCallParser", "Harmony", "HarmonyParser", "OutputParser", "ParsedOutput", "ToolCall", "ToolFormat",
           "detect_format", "fallback_system_prompt", "is_reasoning_template", "new_call_id", "prompt_in_reasoning",
           "template_has_tools"]
