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
"""

from __future__ import annotations

import bisect
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ember.errors import UnsupportedSchemaError

WS = frozenset(b" \t\n\r")
WS_MAX = 16            # longest whitespace run allowed between tokens of the document
INT_DIGITS = 16        # digits allowed before the decimal point
FRAC_DIGITS = 8        # digits allowed after it (no exponents are generated)
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_INF = 1 << 30

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "strict", "$defs", "definitions"}
_SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
              "minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "$ref"} | _ANNOTATIONS

# node kinds
OBJ, FOBJ, ARR, STR, NUM, LIT, UNION = "obj", "fobj", "arr", "str", "num", "lit", "union"


@dataclass
class _Node:
    kind: str
    # obj: props = [(key literal bytes incl. quotes, node, required)]
    props: list = field(default_factory=list)
    value: int = -1               # fobj: value node; arr: item node
    min_items: int = 0
    max_items: int | None = None
    min_len: int = 0
    max_len: int | None = None
    integer: bool = False
    lits: tuple = ()              # lit: the JSON texts (bytes) allowed
    alts: dict = field(default_factory=dict)   # union: first byte -> node
    # derived
    req_from: list = field(default_factory=list)  # obj: chars to write the required props from index i on


class JsonGrammar:
    """A compiled schema: nodes of a byte-level pushdown automaton plus a cache of masks per state.

    Build with :func:`compile_json_schema`. Shared (read-only, plus its mask cache) by all
    sequences that use the same schema.
    """

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.root = -1
        self.key_node = -1   # the (unconstrained) string node of free-object keys
        self._minlen: dict[int, int] = {}
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = 2048

    def add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # ------------------------------------------------------------ sizes
    def minlen(self, n: int) -> int:
        """Fewest bytes of a complete value of node ``n``."""
        if n in self._minlen:
            return self._minlen[n]
        self._minlen[n] = _INF  # recursion guard (a self-referencing 'any' node)
        nd = self.nodes[n]
        if nd.kind == OBJ:
            v = 2 + (nd.req_from[0] - 1 if nd.req_from[0] else 0)
        elif nd.kind == FOBJ:
            v = 2
        elif nd.kind == ARR:
            v = 2 + (nd.min_items * self.minlen(nd.value) + nd.min_items - 1 if nd.min_items else 0)
        elif nd.kind == STR:
            v = 2 + nd.min_len
        elif nd.kind == NUM:
            v = 1
        elif nd.kind == LIT:
            v = min(len(x) for x in nd.lits)
        else:
            v = min(self.minlen(a) for a in set(nd.alts.values()))
        self._minlen[n] = v
        return v

    def finalize(self) -> None:
        for nd in self.nodes:
            if nd.kind == OBJ:
                nd.req_from = [0] * (len(nd.props) + 1)
        for nd in self.nodes:
            if nd.kind == OBJ:
                self._fill_req(nd)

    def _fill_req(self, nd: _Node) -> None:
        acc = 0
        for i in range(len(nd.props) - 1, -1, -1):
            key, node, req = nd.props[i]
            if req:
                acc += 1 + len(key) + 1 + self.minlen(node)
            nd.req_from[i] = acc

    # ------------------------------------------------------------ automaton
    def initial(self) -> tuple:
        return (("V", self.root, 0),)

    def feed(self, stack: tuple, b: int) -> tuple | None:
        """The state after byte ``b``, or None if ``b`` is not allowed."""
        while stack:
            top = stack[-1]
            res = _HANDLERS[top[0]](self, top, b)
            if res is None:
                return None
            if res is _END:  # the top value ended before b (a number, an ambiguous literal): b goes to its parent
                stack = stack[:-1]
                continue
            return stack[:-1] + res
        return None  # the document is complete: nothing more may follow

    def accepting(self, stack: tuple) -> bool:
        """True when the bytes so far form a complete document (EOS may follow)."""
        while stack and self._can_end(stack[-1]):
            stack = stack[:-1]
        return not stack

    def _can_end(self, f: tuple) -> bool:
        if f[0] == "N":
            return f[2] in (_N_ZERO, _N_INT, _N_FRAC)
        if f[0] == "L":
            return f[2] in self.nodes[f[1]].lits
        return False

    def min_remaining(self, stack: tuple) -> int:
        """Fewest bytes that complete the document from ``stack``."""
        return sum(self._frame_rem(f) for f in stack)

    def _candidates(self, nd: _Node, idx: int) -> range:
        """Property indices that may come next: from idx up to and including the next required one."""
        end = idx
        while end < len(nd.props):
            end += 1
            if nd.props[end - 1][2]:
                break
        return range(idx, end)

    def _key_cost(self, nd: _Node, p: int, typed: int) -> int:
        key, node, _ = nd.props[p]
        return len(key) - typed + 1 + self.minlen(node) + nd.req_from[p + 1] + 1

    def _frame_rem(self, f: tuple) -> int:
        tag = f[0]
        if tag == "V":
            return self.minlen(f[1])
        nd = self.nodes[f[1]]
        if tag == "O":
            phase, idx = f[2], f[3]
            if phase == _O_AFTER:
                return nd.req_from[idx] + 1
            if phase == _O_COLON:
                return 1 + self.minlen(f[4]) + nd.req_from[idx] + 1
            if phase == _O_OPEN and not nd.req_from[idx]:
                return 1
            typed = len(f[4]) if phase == _O_KEY else 0
            prefix = f[4] if phase == _O_KEY else b""
            return min((self._key_cost(nd, p, typed) for p in self._candidates(nd, idx)
                        if nd.props[p][0].startswith(prefix)), default=_INF)
        if tag == "F":
            phase = f[2]
            if phase == _F_COLON:
                return 2 + self.minlen(nd.value)
            if phase == _F_COMMA:
                return 4 + self.minlen(nd.value)
            return 1
        if tag == "A":
            phase, count = f[2], f[3]
            mi = self.minlen(nd.value)
            if phase == _A_OPEN:
                return nd.min_items * mi + nd.min_items if nd.min_items else 1
            if phase == _A_AFTER:
                return max(0, nd.min_items - count) * (1 + mi) + 1
            return mi + max(0, nd.min_items - count - 1) * (1 + mi) + 1
        if tag == "S":
            length, esc, pend = f[2], f[3], f[4]
            esc_rem = 1 if esc == 1 else (6 - esc if esc >= 2 else 0)
            return esc_rem + (pend & 3) + max(0, nd.min_len - length - (1 if esc else 0)) + 1
        if tag == "N":
            return 1 if f[2] in (_N_SIGN, _N_DOT) else 0
        if tag == "L":
            prefix = f[2]
            return min(len(x) - len(prefix) for x in nd.lits if x.startswith(prefix))
        raise AssertionError(tag)

    def start_value(self, n: int, b: int) -> tuple | None:
        """Frames to push when byte ``b`` starts a value of node ``n`` (() if that byte completes it)."""
        nd = self.nodes[n]
        k = nd.kind
        if k == OBJ:
            return (("O", n, _O_OPEN, 0, b"", 0),) if b == 0x7B else None
        if k == FOBJ:
            return (("F", n, _F_OPEN, 0),) if b == 0x7B else None
        if k == ARR:
            return (("A", n, _A_OPEN, 0, 0),) if b == 0x5B else None
        if k == STR:
            return (("S", n, 0, 0, 0),) if b == 0x22 else None
        if k == NUM:
            if b == 0x2D:
                return (("N", n, _N_SIGN, 0),)
            if b == 0x30:
                return (("N", n, _N_ZERO, 1),)
            if 0x31 <= b <= 0x39:
                return (("N", n, _N_INT, 1),)
            return None
        if k == LIT:
            return _lit_step(nd, n, b"", b)
        alt = nd.alts.get(b)
        return None if alt is None else self.start_value(alt, b)


_END = object()
# UTF-8 (RFC 3629): the byte after these leads has a narrower range (no overlongs, surrogates, > U+10FFFF).
_UTF8_NEXT = [(0x80, 0xBF), (0xA0, 0xBF), (0x80, 0x9F), (0x90, 0xBF), (0x80, 0x8F)]
_UTF8_LEAD_CODE = {0xE0: 1, 0xED: 2, 0xF0: 3, 0xF4: 4}
_O_OPEN, _O_KEY, _O_COLON, _O_AFTER, _O_COMMA = range(5)
_F_OPEN, _F_COLON, _F_AFTER, _F_COMMA = range(4)
_A_OPEN, _A_AFTER, _A_COMMA = range(3)
_N_SIGN, _N_ZERO, _N_INT, _N_DOT, _N_FRAC = range(5)


def _lit_step(nd: _Node, n: int, prefix: bytes, b: int):
    new = prefix + bytes((b,))
    longer = [x for x in nd.lits if x.startswith(new)]
    if not longer:
        return _END if prefix in nd.lits else None
    if longer == [new]:
        return ()  # complete, and nothing longer could follow
    return (("L", n, new),)


def _h_value(g: JsonGrammar, f: tuple, b: int):
    if b in WS:
        return (("V", f[1], f[2] + 1),) if f[2] < WS_MAX else None
    return g.start_value(f[1], b)


def _h_object(g: JsonGrammar, f: tuple, b: int):
    _, n, phase, idx, x, ws = f
    nd = g.nodes[n]
    if phase == _O_KEY:
        new = x + bytes((b,))
        hit = None
        any_prefix = False
        for p in g._candidates(nd, idx):
            key = nd.props[p][0]
            if key.startswith(new):
                any_prefix = True
                if key == new:
                    hit = p
        if hit is not None:
            return (("O", n, _O_COLON, hit + 1, nd.props[hit][1], 0),)
        return (("O", n, _O_KEY, idx, new, 0),) if any_prefix else None
    if b in WS:
        return (("O", n, phase, idx, x, ws + 1),) if ws < WS_MAX else None
    if phase in (_O_OPEN, _O_COMMA):
        if b == 0x22 and idx < len(nd.props):
            return (("O", n, _O_KEY, idx, b'"', 0),)
        if b == 0x7D and phase == _O_OPEN and not nd.req_from[idx]:
            return ()
        return None
    if phase == _O_COLON:
        return (("O", n, _O_AFTER, idx, b"", 0), ("V", x, 0)) if b == 0x3A else None
    # _O_AFTER
    if b == 0x2C and idx < len(nd.props):
        return (("O", n, _O_COMMA, idx, b"", 0),)
    if b == 0x7D and not nd.req_from[idx]:
        return ()
    return None


def _h_free_object(g: JsonGrammar, f: tuple, b: int):
    _, n, phase, ws = f
    if b in WS:
        return (("F", n, phase, ws + 1),) if ws < WS_MAX else None
    if phase in (_F_OPEN, _F_COMMA):
        if b == 0x22:
            return (("F", n, _F_COLON, 0), ("S", g.key_node, 0, 0, 0))
        if b == 0x7D and phase == _F_OPEN:
            return ()
        return None
    if phase == _F_COLON:
        return (("F", n, _F_AFTER, 0), ("V", g.nodes[n].value, 0)) if b == 0x3A else None
    if b == 0x2C:
        return (("F", n, _F_COMMA, 0),)
    return () if b == 0x7D else None


def _h_array(g: JsonGrammar, f: tuple, b: int):
    _, n, phase, count, ws = f
    nd = g.nodes[n]
    if b in WS:
        return (("A", n, phase, count, ws + 1),) if ws < WS_MAX else None
    if phase == _A_AFTER:
        if b == 0x2C and (nd.max_items is None or count < nd.max_items):
            return (("A", n, _A_COMMA, count, 0),)
        if b == 0x5D and count >= nd.min_items:
            return ()
        return None
    if phase == _A_OPEN and b == 0x5D:
        return () if nd.min_items == 0 else None
    if phase == _A_OPEN and nd.max_items == 0:
        return None
    item = g.start_value(nd.value, b)
    if item is None:
        return None
    return (("A", n, _A_AFTER, count + 1, 0),) + item


def _h_string(g: JsonGrammar, f: tuple, b: int):
    _, n, length, esc, pend = f
    nd = g.nodes[n]
    mx = nd.max_len

    def count(new_len: int) -> int:  # canonical length: beyond every bound, lengths are equivalent
        return new_len if mx is not None else min(new_len, nd.min_len)

    if pend:  # inside a multi-byte UTF-8 character: pend = bytes still due + 4 * (range code of the next one)
        lo, hi = _UTF8_NEXT[pend >> 2]
        return (("S", n, length, 0, (pend & 3) - 1),) if lo <= b <= hi else None
    if esc == 1:
        if b in _ESCAPES:
            return (("S", n, count(length + 1), 0, 0),)
        return (("S", n, length, 2, 0),) if b == 0x75 else None
    if esc >= 2:
        if b not in _HEX:
            return None
        return (("S", n, count(length + 1), 0, 0),) if esc == 5 else (("S", n, length, esc + 1, 0),)
    if b == 0x22:
        return () if length >= nd.min_len else None
    full = mx is not None and length >= mx
    if b == 0x5C:
        return None if full else (("S", n, length, 1, 0),)
    if b < 0x20 or full:
        return None
    if b < 0x80:
        return (("S", n, count(length + 1), 0, 0),)
    if 0xC2 <= b <= 0xDF:
        more = 1
    elif 0xE0 <= b <= 0xEF:
        more = 2
    elif 0xF0 <= b <= 0xF4:
        more = 3
    else:
        return None
    return (("S", n, count(length + 1), 0, more + 4 * _UTF8_LEAD_CODE.get(b, 0)),)


def _h_number(g: JsonGrammar, f: tuple, b: int):
    _, n, phase, digits = f
    integer = g.nodes[n].integer
    if phase == _N_SIGN:
        if b == 0x30:
            return (("N", n, _N_ZERO, 1),)
        return (("N", n, _N_INT, 1),) if 0x31 <= b <= 0x39 else None
    if phase == _N_DOT:
        return (("N", n, _N_FRAC, 1),) if b in _DIGITS else None
    if phase == _N_INT and b in _DIGITS:
        return (("N", n, _N_INT, digits + 1),) if digits < INT_DIGITS else None
    if phase in (_N_ZERO, _N_INT) and b == 0x2E and not integer:
        return (("N", n, _N_DOT, 0),)
    if phase == _N_FRAC and b in _DIGITS:
        return (("N", n, _N_FRAC, digits + 1),) if digits < FRAC_DIGITS else None
    if phase == _N_ZERO and b in _DIGITS:
        return None  # no leading zeros
    return _END


def _h_literal(g: JsonGrammar, f: tuple, b: int):
    return _lit_step(g.nodes[f[1]], f[1], f[2], b)


_HANDLERS = {"V": _h_value, "O": _h_object, "F": _h_free_object, "A": _h_array, "S": _h_string,
             "N": _h_number, "L": _h_literal}


# ---------------------------------------------------------------------------- schema compiler


def compile_json_schema(schema: dict | None, where: str = "response_format.json_schema.schema") -> JsonGrammar:
    """Compile a JSON Schema (subset, see the module docstring) into a :class:`JsonGrammar`.

    Args:
        schema: the schema object; None means "any JSON object" (``json_object`` mode).
        where: the request field, for error messages.
    Raises:
        UnsupportedSchemaError: naming the keyword and its JSON pointer.
    """
    g = JsonGrammar()
    g.key_node = g.add(_Node(STR))
    any_node = _any_node(g)
    if schema is None:
        g.root = g.add(_Node(FOBJ, value=any_node))
    else:
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(f"{where} must be a JSON object, got {type(schema).__name__}")
        defs = {}
        for k in ("$defs", "definitions"):
            if isinstance(schema.get(k), dict):
                defs.update({f"#/{k}/{name}": s for name, s in schema[k].items()})
        g.root = _Compiler(g, defs, any_node, where).node(schema, "#", ())
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


# ---------------------------------------------------------------------------- vocabulary


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table used by ByteLevel BPE (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenVocab:
    """The bytes each token id writes, sorted for prefix walks; built once per tokenizer.

    Args:
        token_bytes: per id, the bytes the token adds to the text, or None for special/unknown ids.
    """

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.size = len(token_bytes)
        self.token_bytes = list(token_bytes)
        pairs = sorted((b, i) for i, b in enumerate(token_bytes) if b)
        self.toks = [b for b, _ in pairs]
        self.ids = [i for _, i in pairs]
        # "Plain" tokens: string content with no quote, backslash or control byte, whole UTF-8 characters.
        plain, chars, special = [], [], []
        for b, i in pairs:
            n = _plain_chars(b)
            if n is None:
                special.append((b, i))
            else:
                plain.append(i)
                chars.append(n)
        self.plain_ids = torch.tensor(plain, dtype=torch.long)
        self.plain_chars = torch.tensor(chars, dtype=torch.long)
        self.special_toks = [b for b, _ in special]
        self.special_ids = [i for _, i in special]

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> TokenVocab:
        """Token bytes of an :class:`ember.tokenizer.Tokenizer` (ByteLevel BPE, SentencePiece-style, or plain)."""
        backend = tokenizer._backend
        n = vocab_size or tokenizer.vocab_size
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = _decoder_kinds(decoder)
        byte_level = "ByteLevel" in kinds
        table = _bytes_to_unicode() if byte_level else None
        special = tokenizer._special_ids
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        out: list[bytes | None] = []
        for i in range(n):
            tok = backend.id_to_token(i)
            if tok is None or i in special:
                out.append(None)
            elif i in added:
                out.append(added[i].encode())
            elif byte_level:
                try:
                    out.append(bytes(table[c] for c in tok))
                except KeyError:
                    out.append(tok.encode())
            elif (m := _BYTE_TOKEN.fullmatch(tok)) and "ByteFallback" in kinds:
                out.append(bytes((int(m.group(1), 16),)))
            else:
                out.append(tok.replace("\u2581", " ").encode())
        return cls(out)


def _decoder_kinds(decoder: dict) -> set[str]:
    kinds = {decoder.get("type", "")}
    for d in decoder.get("decoders", []) or []:
        kinds |= _decoder_kinds(d)
    return kinds


def _plain_chars(b: bytes) -> int | None:
    """Characters in ``b`` if it is plain JSON-string content (no quote, backslash, control), else None."""
    if any(x < 0x20 or x in (0x22, 0x5C) for x in b):
        return None
    try:
        return len(b.decode("utf-8"))
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------- per sequence


class JsonConstraint:
    """The state of one sequence under a :class:`JsonGrammar`; masks logits one token at a time.

    Args:
        grammar: the compiled schema.
        vocab: token bytes of the model's tokenizer.
        stop_ids: ids that end the sequence (EOS); allowed only where the document is complete.
    """

    def __init__(self, grammar: JsonGrammar, vocab: TokenVocab, stop_ids: Sequence[int] = ()) -> None:
        self.grammar, self.vocab = grammar, vocab
        self.stop_ids = [i for i in stop_ids if 0 <= i < vocab.size]
        self.state: tuple | None = grammar.initial()

    @property
    def done(self) -> bool:
        """True when the document is complete and nothing may follow it."""
        return self.state == ()

    def accepting(self) -> bool:
        return self.state is not None and self.grammar.accepting(self.state)

    def advance(self, token_id: int) -> None:
        """Move past a sampled token (a stop id leaves the state as it is)."""
        if self.state is None or token_id in self.stop_ids:
            return
        b = self.vocab.token_bytes[token_id] if 0 <= token_id < self.vocab.size else None
        st = self.state
        for x in b or b"":
            st = self.grammar.feed(st, x)
            if st is None:
                break
        self.state = st

    def mask(self, budget: int, vocab_size: int | None = None) -> torch.Tensor:
        """Allowed next tokens, (V,) bool on CPU.

        Args:
            budget: tokens this sequence may still generate, this one included.
            vocab_size: length of the mask (the model's vocab; default the tokenizer's).
        """
        V = vocab_size or self.vocab.size
        allowed = torch.zeros(V, dtype=torch.bool)
        st = self.state
        if st is None or st == ():
            allowed[self.stop_ids] = True
            return allowed
        ids, costs, plain = self._entry(st)
        if plain is not None:
            ids, costs = torch.cat([ids, plain[0]]), torch.cat([costs, plain[1]])
        left = budget - 1  # tokens left after this one
        keep = ids[costs <= left]
        if keep.numel() == 0 and ids.numel():
            # Too few tokens left to close the document one character per token: head for the end
            # by the shortest way (multi-character tokens may still make it).
            keep = ids[costs == costs.min()]
        allowed[keep[keep < V]] = True
        if self.grammar.accepting(st):
            allowed[self.stop_ids] = True
        return allowed

    def _entry(self, st: tuple):
        g, v = self.grammar, self.vocab
        top = st[-1]
        plain_state = top[0] == "S" and top[3] == 0 and top[4] == 0
        key = (id(v), st)
        entry = g.cache.get(key)
        if entry is None:
            toks, ids = (v.special_toks, v.special_ids) if plain_state else (v.toks, v.ids)
            out_ids: list[int] = []
            out_costs: list[int] = []
            _walk(g, st, toks, ids, out_ids, out_costs)
            entry = (torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_costs, dtype=torch.long))
            g.cache[key] = entry
            if len(g.cache) > g.cache_size:
                g.cache.popitem(last=False)
        else:
            g.cache.move_to_end(key)
        plain = None
        if plain_state:
            nd = g.nodes[top[1]]
            new_len = top[2] + v.plain_chars
            ok = torch.ones_like(new_len, dtype=torch.bool) if nd.max_len is None else new_len <= nd.max_len
            rest = g.min_remaining(st[:-1])
            costs = rest + 1 + (nd.min_len - new_len).clamp_min(0)
            plain = (v.plain_ids[ok], costs[ok])
        return entry[0], entry[1], plain


def _walk(g: JsonGrammar, st: tuple, toks: list[bytes], ids: list[int], out_ids: list[int], out_costs: list[int]) -> None:
    """Depth-first walk of the sorted tokens: a byte rejected at depth d rejects every token below it."""

    def rec(state: tuple, lo: int, hi: int, d: int) -> None:
        i = lo
        while i < hi and len(toks[i]) == d:
            out_ids.append(ids[i])
            out_costs.append(g.min_remaining(state))
            i += 1
        while i < hi:
            b = toks[i][d]
            j = bisect.bisect_right(toks, b, lo=i, hi=hi, key=lambda t: t[d])
            ns = g.feed(state, b)
            if ns is not None:
                rec(ns, i, j, d + 1)
            i = j

    rec(st, 0, len(toks), 0)
