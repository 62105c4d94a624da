"""Constrained decoding for JSON: a token mask that lets the model write only valid JSON.

OpenAI's ``response_format`` ``json_object`` (any JSON object) and ``json_schema`` (a JSON Schema
subset) are compiled into a byte-level pushdown automaton. Each step, :meth:`JsonConstraint.mask`
walks the vocabulary (sorted token byte strings, so tokens that share a prefix share the walk and
a rejected prefix prunes every token below it) and keeps the tokens whose bytes the automaton
accepts. Plain string content, the bulk of a large vocabulary, is masked with one vectorised test.

The mask is also *budget-aware*: each automaton state knows the fewest characters that complete
the document, and a token is allowed only if what it leaves can still be closed within the tokens
left (``max_tokens``). So a finished generation always parses and validates, even from a model
that would ramble.

Supported schema subset (anything else is a clear :class:`~ember.errors.UnsupportedSchemaError`):
``type`` (object, array, string, number, integer, boolean, null, or a list of them), ``properties``,
``required``, ``additionalProperties`` (objects without ``properties`` take it as the value schema),
``items``, ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``enum``, ``const``, ``anyOf``/``oneOf``
whose alternatives start with different characters, and local ``$ref`` into ``$defs``/``definitions``
(not recursive). Annotations (``title``, ``description``, ``default``, ...) are ignored.
Objects are written with their properties in schema order; optional ones may be left out.

A forced tool call is one of several fixed texts around a JSON value (:func:`compile_tool_call_grammar`:
e.g. ``<tool_call>\n{"name": "f", "arguments": `` + the tool's parameter schema + ``}\n</tool_call>``).

Files: :mod:`~ember.json_constraint.grammar` (the automaton), :mod:`~ember.json_constraint.compiler`
(schemas to grammars), :mod:`~ember.json_constraint.vocab` (token bytes),
:mod:`~ember.json_constraint.constraint` (one sequence's mask).
"""

from ember.json_constraint.compiler import compile_json_schema, compile_tool_call_grammar
from ember.json_constraint.constraint import JsonConstraint
from ember.json_constraint.grammar import JsonGrammar
from ember.json_constraint.vocab import TokenVocab

__all__ = ["JsonConstraint", "JsonGrammar", "TokenVocab", "compile_json_schema", "compile_tool_call_grammar"]
