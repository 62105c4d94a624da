"""JSON Schema (a subset, see :mod:`ember.json_constraint`) to :class:`~ember.json_constraint.grammar.JsonGrammar`."""

from __future__ import annotations

import json
from typing import Any

from ember.errors import UnsupportedSchemaError
from ember.json_constraint.grammar import _INF, ARR, FOBJ, LIT, NUM, OBJ, STR, TPL, UNION, JsonGrammar, _Node

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "strict", "$defs", "definitions"}
_SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
              "minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "$ref"} | _ANNOTATIONS


def compile_json_schema(schema: dict | None, where: str = "response_format.json_schema.schema") -> JsonGrammar:
    """Compile a JSON Schema (subset, see :mod:`ember.json_constraint`) into a :class:`JsonGrammar`.

    Args:
        schema: the schema object; None means "any JSON object" (``json_object`` mode).
        where: the request field, for error messages.
    Raises:
        UnsupportedSchemaError: naming the keyword and its JSON pointer.
    """
    g = JsonGrammar()
    g.key_node = g.add(_Node(STR))
    any_node = _any_node(g)
    g.root = g.add(_Node(FOBJ, value=any_node)) if schema is None else _compile_into(g, any_node, schema, where)
    return _finish(g, where)


def compile_tool_call_grammar(calls: list[tuple[str, dict | None, str]], where: list[str]) -> JsonGrammar:
    """A grammar for exactly one of several fixed texts, each around one JSON value: a forced tool call.

    Args:
        calls: per alternative ``(prefix, schema, suffix)``, e.g. ``('<tool_call>\\n{"name": "f", "arguments": ',
            {...}, '}\\n</tool_call>')``; no prefix may be a prefix of another (quoted names end in '"', so
            alternatives that differ in a quoted name qualify) and suffixes are not empty. A None schema is
            any JSON object.
        where: per alternative, the request field of its schema (for errors).
    Raises:
        UnsupportedSchemaError: a schema outside the supported subset, naming its field and keyword.
    """
    g = JsonGrammar()
    g.key_node = g.add(_Node(STR))
    any_node = _any_node(g)
    alts = []
    for (prefix, schema, suffix), w in zip(calls, where):
        if not suffix:
            raise ValueError("a tool-call template needs a non-empty suffix")
        node = g.add(_Node(FOBJ, value=any_node)) if schema is None else _compile_into(g, any_node, schema, w)
        alts.append((prefix.encode(), node, suffix.encode()))
    prefixes = [a[0] for a in alts]
    for i, p in enumerate(prefixes):
        if any(j != i and q.startswith(p) for j, q in enumerate(prefixes)):
            raise ValueError(f"tool-call prefix {p!r} is a prefix of another alternative")
    g.root = g.add(_Node(TPL, props=alts))
    g.leading_ws = False
    return _finish(g, where[0] if where else "tools")


def _compile_into(g: JsonGrammar, any_node: int, schema: Any, where: str) -> int:
    if not isinstance(schema, dict):
        raise UnsupportedSchemaError(f"{where} must be a JSON object, got {type(schema).__name__}")
    defs = {}
    for k in ("$defs", "definitions"):
        if isinstance(schema.get(k), dict):
            defs.update({f"#/{k}/{name}": s for name, s in schema[k].items()})
    return _Compiler(g, defs, any_node, where).node(schema, "#", ())


def _finish(g: JsonGrammar, where: str) -> JsonGrammar:
    g.finalize()
    if g.minlen(g.root) >= _INF:
        raise UnsupportedSchemaError(f"{where}: the schema has no finite value (a required property refers back to itself)")
    return g


def _any_node(g: JsonGrammar) -> int:
    """A union of every JSON value, nested values again of any kind."""
    any_n = g.add(_Node(UNION))
    obj = g.add(_Node(FOBJ, value=any_n))
    arr = g.add(_Node(ARR, value=any_n))
    s = g.add(_Node(STR))
    num = g.add(_Node(NUM))
    lit = g.add(_Node(LIT, lits=(b"true", b"false", b"null")))
    alts = {0x7B: obj, 0x5B: arr, 0x22: s, 0x74: lit, 0x66: lit, 0x6E: lit, 0x2D: num}
    alts.update({d: num for d in range(0x30, 0x3A)})
    g.nodes[any_n].alts = alts
    return any_n


def _first_bytes(g: JsonGrammar, n: int) -> set[int]:
    nd = g.nodes[n]
    if nd.kind == TPL:
        return {p[0] for p, _, _ in nd.props}
    return {OBJ: {0x7B}, FOBJ: {0x7B}, ARR: {0x5B}, STR: {0x22}, NUM: {0x2D, *range(0x30, 0x3A)}}.get(nd.kind) \
        or ({x[0] for x in nd.lits} if nd.kind == LIT else set(nd.alts))


class _Compiler:
    def __init__(self, g: JsonGrammar, defs: dict, any_node: int, where: str) -> None:
        self.g, self.defs, self.any_node, self.where = g, defs, any_node, where

    def err(self, ptr: str, msg: str) -> UnsupportedSchemaError:
        return UnsupportedSchemaError(f"{self.where} at {ptr}: {msg}")

    def node(self, s: Any, ptr: str, refs: tuple) -> int:
        g = self.g
        if s is True or s == {}:
            return self.any_node
        if not isinstance(s, dict):
            raise self.err(ptr, f"a schema must be an object, got {json.dumps(s)}")
        for k in s:
            if k not in _SUPPORTED:
                raise self.err(ptr, f"keyword '{k}' is not supported (supported: {', '.join(sorted(_SUPPORTED - _ANNOTATIONS))})")
        if "$ref" in s:
            ref = s["$ref"]
            if ref not in self.defs:
                raise self.err(ptr, f"$ref {ref!r} is not a local #/$defs/... reference in this schema")
            if ref in refs:
                raise self.err(ptr, f"$ref {ref!r} is recursive; recursive schemas are not supported")
            if len(s.keys() - _ANNOTATIONS - {"$ref"}):
                raise self.err(ptr, "$ref next to other keywords is not supported")
            return self.node(self.defs[ref], ref, refs + (ref,))
        if "const" in s:
            return self.literals([s["const"]], ptr)
        if "enum" in s:
            vals = s["enum"]
            if not isinstance(vals, list) or not vals:
                raise self.err(ptr, "enum must be a non-empty list")
            return self.literals(vals, ptr)
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise self.err(ptr, f"{key} must be a non-empty list")
                nodes = [self.node(a, f"{ptr}/{key}/{i}", refs) for i, a in enumerate(alts)]
                return self.union(nodes, ptr, key)
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise self.err(ptr, "type must not be an empty list")
            nodes = [self.node({**s, "type": x}, ptr, refs) for x in t]
            return self.union(nodes, ptr, "type")
        if t is None:
            t = "object" if "properties" in s else "array" if "items" in s else None
            if t is None:
                return self.any_node
        if t == "object":
            return self.obj(s, ptr, refs)
        if t == "array":
            items = s.get("items", True)
            lo, hi = self.bounds(s, "minItems", "maxItems", ptr)
            item = self.node(items, f"{ptr}/items", refs)
            return g.add(_Node(ARR, value=item, min_items=lo, max_items=hi))
        if t == "string":
            lo, hi = self.bounds(s, "minLength", "maxLength", ptr)
            return g.add(_Node(STR, min_len=lo, max_len=hi))
        if t in ("number", "integer"):
            return g.add(_Node(NUM, integer=t == "integer"))
        if t == "boolean":
            return g.add(_Node(LIT, lits=(b"true", b"false")))
        if t == "null":
            return g.add(_Node(LIT, lits=(b"null",)))
        raise self.err(ptr, f"type {t!r} is not a JSON Schema type")

    def bounds(self, s: dict, lo_key: str, hi_key: str, ptr: str) -> tuple[int, int | None]:
        lo, hi = s.get(lo_key, 0), s.get(hi_key)
        for k, v in ((lo_key, lo), (hi_key, hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise self.err(ptr, f"{k} must be an integer >= 0, got {json.dumps(v)}")
        if hi is not None and hi < lo:
            raise self.err(ptr, f"{hi_key} ({hi}) is below {lo_key} ({lo})")
        return lo, hi

    def obj(self, s: dict, ptr: str, refs: tuple) -> int:
        g = self.g
        props = s.get("properties")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.err(ptr, "required must be a list of property names")
        extra = s.get("additionalProperties", True)
        if props is None:
            if required:
                raise self.err(ptr, "required without properties is not supported")
            value = self.any_node if extra in (True, None) else (
                None if extra is False else self.node(extra, f"{ptr}/additionalProperties", refs))
            if value is None:
                return g.add(_Node(OBJ, props=[]))  # {} only
            return g.add(_Node(FOBJ, value=value))
        if not isinstance(props, dict):
            raise self.err(ptr, "properties must be an object")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.err(ptr, f"required names {missing} that are not in properties")
        items = []
        for name, sub in props.items():
            key = json.dumps(name, ensure_ascii=False).encode()
            items.append((key, self.node(sub, f"{ptr}/properties/{name}", refs), name in required))
        return g.add(_Node(OBJ, props=items))

    def literals(self, values: list, ptr: str) -> int:
        lits = []
        for v in values:
            try:
                text = json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise self.err(ptr, f"enum/const value {v!r} is not JSON: {e}") from None
            lits.append(text.encode())
        return self.g.add(_Node(LIT, lits=tuple(dict.fromkeys(lits))))

    def union(self, nodes: list[int], ptr: str, key: str) -> int:
        g = self.g
        if len(set(nodes)) == 1:
            return nodes[0]
        alts: dict[int, int] = {}
        for n in nodes:
            if n == self.any_node:
                raise self.err(ptr, f"{key} with an unconstrained alternative is not supported")
            for b in _first_bytes(g, n):
                if b in alts and alts[b] != n:
                    raise self.err(ptr, f"{key} alternatives must start with different characters "
                                        f"(e.g. string | number | null); two can start with {chr(b)!r}")
                alts[b] = n
        return g.add(_Node(UNION, alts=alts))

