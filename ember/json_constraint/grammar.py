"""The byte-level pushdown automaton behind JSON-constrained decoding.

A :class:`JsonGrammar` is a list of nodes (object, free object, array, string, number, literal set,
union by first byte, and *template*: fixed text around one value, used for tool calls). A decoding
state is a tuple of frames, innermost last; :meth:`JsonGrammar.feed` moves it past one byte and
:meth:`JsonGrammar.min_remaining` says how many bytes at least complete the document from it.
Schemas are compiled into grammars by :mod:`ember.json_constraint.compiler`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

WS = frozenset(b" \t\n\r")
WS_MAX = 16            # longest whitespace run allowed between tokens of the document
INT_DIGITS = 16        # digits allowed before the decimal point
FRAC_DIGITS = 8        # digits allowed after it (no exponents are generated)
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_INF = 1 << 30

# node kinds
OBJ, FOBJ, ARR, STR, NUM, LIT, UNION, TPL = "obj", "fobj", "arr", "str", "num", "lit", "union", "tpl"


@dataclass
class _Node:
    kind: str
    # obj: props = [(key literal bytes incl. quotes, node, required)]
    # tpl: props = [(prefix bytes, value node, suffix bytes)]; no prefix is a prefix of another
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
        self.leading_ws = True  # whitespace may come before the document (not before a tool call's fixed text)
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
        elif nd.kind == TPL:
            v = min(len(p) + self.minlen(x) + len(s) for p, x, s in nd.props)
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
        return (("V", self.root, 0 if self.leading_ws else WS_MAX),)  # a full whitespace count allows none

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
        if tag == "T":
            if f[2] == _T_PREFIX:
                typed = f[3]
                return min(len(p) - len(typed) + self.minlen(x) + len(s) for p, x, s in nd.props if p.startswith(typed))
            return len(nd.props[f[3]][2]) - f[4]
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
        if k == TPL:
            return _tpl_step(nd, n, b"", b)
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
_T_PREFIX, _T_SUFFIX = range(2)


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


def _tpl_step(nd: _Node, n: int, typed: bytes, b: int):
    """Template prefix: frame ("T", n, _T_PREFIX, typed) until one alternative's prefix is complete, then
    ("T", n, _T_SUFFIX, alt, suffix bytes written) under the value's own frame."""
    new = typed + bytes((b,))
    hit, any_prefix = -1, False
    for k, (p, _, _) in enumerate(nd.props):
        if p.startswith(new):
            any_prefix = True
            if p == new:
                hit = k
    if hit >= 0:
        return (("T", n, _T_SUFFIX, hit, 0), ("V", nd.props[hit][1], 0))
    return (("T", n, _T_PREFIX, new),) if any_prefix else None


def _h_template(g: JsonGrammar, f: tuple, b: int):
    nd = g.nodes[f[1]]
    if f[2] == _T_PREFIX:
        return _tpl_step(nd, f[1], f[3], b)
    suffix, pos = nd.props[f[3]][2], f[4]
    if pos >= len(suffix) or suffix[pos] != b:
        return None
    return () if pos + 1 == len(suffix) else (("T", f[1], _T_SUFFIX, f[3], pos + 1),)


_HANDLERS = {"V": _h_value, "O": _h_object, "F": _h_free_object, "A": _h_array, "S": _h_string,
             "N": _h_number, "L": _h_literal, "T": _h_template}

