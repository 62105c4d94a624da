"""How model families write tool calls and reasoning, and the parsers that read them back.

- :mod:`~ember.chat_formats.base`: :class:`ToolFormat` (markers, body reader, forced-call text) and
  :class:`ToolCall`/:class:`Delta`.
- :mod:`~ember.chat_formats.parser`: :class:`OutputParser` (streaming split into reasoning, content
  and calls) and :class:`ForcedCallParser` (the output of a constrained call).
- One small module per family: :mod:`~ember.chat_formats.hermes` (Qwen2.5/3, Hermes; also the
  fallback for templates without tools), :mod:`~ember.chat_formats.llama3`, :mod:`~ember.chat_formats.mistral`,
  :mod:`~ember.chat_formats.glm` (GLM-4.5/4.6), :mod:`~ember.chat_formats.minimax` (MiniMax-M2),
  :mod:`~ember.chat_formats.gemma4` (Gemma 4, its own thinking markers too), :mod:`~ember.chat_formats.deepseek`
  (DeepSeek-V3/R1, V3.1), :mod:`~ember.chat_formats.harmony` (gpt-oss).

Adding a family: a module with a :class:`ToolFormat` subclass (its markers, ``matches`` on the chat template,
``parse_body`` if its call body is not ``{"name", "arguments"}`` JSON, ``think`` if its reasoning is not in
``<think>``) and one line in :data:`FORMATS` below.
"""

from __future__ import annotations

from ember.chat_formats.base import THINK_CLOSE, THINK_OPEN, Delta, ToolCall, ToolFormat, new_call_id
from ember.chat_formats.deepseek import DeepSeekV3, DeepSeekV31
from ember.chat_formats.gemma4 import Gemma4
from ember.chat_formats.glm import Glm45
from ember.chat_formats.harmony import Harmony, HarmonyParser
from ember.chat_formats.hermes import Hermes, fallback_system_prompt
from ember.chat_formats.llama3 import Llama3
from ember.chat_formats.minimax import MiniMaxM2
from ember.chat_formats.mistral import Mistral
from ember.chat_formats.parser import ForcedCallParser, OutputParser, ParsedOutput

# Checked in order against the chat template's source (GLM's before Hermes': both open calls with <tool_call>);
# Hermes is also the default.
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Harmony(), Gemma4(), DeepSeekV3(), DeepSeekV31(), MiniMaxM2(),
                                                      Glm45(), Mistral(), Llama3(), Hermes())}


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
    """True when a chat template writes a reasoning block (``<think>``: Qwen3, DeepSeek-R1 distills, GLM; Gemma 4's
    thought channel) or harmony's analysis channel (gpt-oss)."""
    # a template's source may spell a marker's newline as a Jinja escape: look for the marker without it
    return (any(f.think[0].strip() in template for f in FORMATS.values()) or "enable_thinking" in template
            or Harmony().matches(template))


def prompt_in_reasoning(prompt: str, think: tuple[str, str] = (THINK_OPEN, THINK_CLOSE)) -> bool:
    """True when a rendered prompt ends inside an open reasoning block (the template opened it for the model);
    ``think`` is the format's (open, close) pair."""
    return prompt.rfind(think[0]) > prompt.rfind(think[1])


__all__ = ["FORMATS", "THINK_CLOSE", "THINK_OPEN", "DeepSeekV3", "DeepSeekV31", "Delta", "ForcedCallParser", "Gemma4", "Harmony", "HarmonyParser", "OutputParser", "ParsedOutput", "ToolCall", "ToolFormat",
           "detect_format", "fallback_system_prompt", "is_reasoning_template", "new_call_id", "prompt_in_reasoning",
           "template_has_tools"]
