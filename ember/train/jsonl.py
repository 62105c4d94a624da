"""Reading a JSONL training-data file: lines, JSON, and the shape of each record.

Every line is validated before anything is tokenized, and all problems are reported together with
their line numbers (:class:`~ember.errors.DataError`). The three record shapes are described in
:mod:`ember.train.data`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ember.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_REPORTED_ERRORS = 20
MAX_LINE_BYTES = 16 << 20  # one record; a line past this is an error, not an example
MAX_DEPTH = 64             # JSON nesting of one record (a chat record needs 4)


def read_jsonl(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> list[tuple[int, dict]]:
    """Parse and validate every line of a JSONL data file.

    Lines are split on ``\n`` only (a ``\r`` before it is dropped): JSON strings may hold U+2028 or
    U+0085, which ``str.splitlines`` would wrongly treat as line breaks. Each line is decoded on its
    own, so bytes that are not UTF-8 are reported by line number. A line longer than
    ``max_line_bytes`` is refused without being read whole.

    Returns:
        (line number, record) for each non-blank line.
    Raises:
        DataError: listing every malformed line (up to 20 shown) as ``file:line: what is wrong``.
    """
    path = Path(path)
    records: list[tuple[int, dict]] = []
    errors: list[str] = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(_lines(f, max_line_bytes), 1):
                if raw is None:
                    errors.append(f"{path}:{n}: line is longer than {max_line_bytes:,} bytes; no training "
                                  "example needs that much text (split or shorten it)")
                    continue
                problem, obj = _parse_line(raw, first=n == 1)
                if problem is None and obj is not None:
                    problem = validate_record(obj)
                if problem:
                    errors.append(f"{path}:{n}: {problem}")
                elif obj is not None:
                    records.append((n, obj))
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSONL data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if errors:
        raise _data_error(errors)
    if not records:
        raise DataError(f"{path}: no records (the file is empty); expected one JSON object per line")
    return records


def _lines(f: Any, max_line_bytes: int) -> Iterator[bytes | None]:
    """The file's lines split on b"\\n" only, without it (and a "\\r" before it); None for a line over the limit,
    whose bytes are skipped in bounded reads rather than held."""
    while True:
        line = f.readline(max_line_bytes + 2)
        if not line:
            return
        if len(line) > max_line_bytes + 1 and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                line = f.readline(1 << 20)
            yield None
            continue
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > max_line_bytes:
            yield None
            continue
        yield line


def _parse_line(raw: bytes, first: bool) -> tuple[str | None, Any]:
    """(problem, object) for one line's bytes; (None, None) for a blank line."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start + 1} of the line); save the data file as UTF-8", None
    if not text.strip():
        return None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})", None
    except RecursionError:
        return "not valid JSON (nested too deeply)", None
    except ValueError as e:  # an integer literal past Python's digit limit
        return f"not valid JSON ({str(e).splitlines()[0]})", None
    problem = _check_values(obj)
    return problem, (obj if problem is None else None)


def _check_values(obj: Any, depth: int = 0) -> str | None:
    """Refuse what JSON allows but text cannot hold: lone surrogates (\\ud800), and absurd nesting."""
    stack = [(obj, 0)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"string {v[:40]!r} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), not text"
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, d + 1))
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return None


def _data_error(errors: list[str]) -> DataError:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    head = f"{len(errors)} malformed line{'s' if len(errors) > 1 else ''} in the training data:\n  " \
        if len(errors) > 1 else ""
    return DataError(head + "\n  ".join(shown) + more)


def record_format(obj: dict) -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"`` for a validated record."""
    if "messages" in obj:
        return "messages"
    if "prompt" in obj:
        return "prompt_completion"
    return "text"


def validate_record(obj: Any) -> str | None:
    """What is wrong with one decoded JSONL record, or None when it is usable."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}"
    shapes = [k for k in ("messages", "text") if k in obj] + (["prompt/completion"] if "prompt" in obj or "completion" in obj else [])
    if not shapes:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        return f"unknown record shape (keys: {keys}); expected \"messages\", \"prompt\"+\"completion\" or \"text\""
    if len(shapes) > 1:
        return f"record has both {shapes[0]!r} and {shapes[1]!r}; use one shape per line"
    if "messages" in obj:
        return _validate_messages(obj["messages"], "messages", need_assistant=True)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            return f"\"text\" must be a string, got {_json_type(obj['text'])}"
        if not obj["text"].strip():
            return "\"text\" is empty"
        return None
    for key in ("prompt", "completion"):
        if key not in obj:
            return f"has \"{'prompt' if key == 'completion' else 'completion'}\" but no \"{key}\""
    p, c = obj["prompt"], obj["completion"]
    if isinstance(p, str) and isinstance(c, str):
        if not c:
            return "\"completion\" is empty"
        return None
    if isinstance(p, list) and isinstance(c, list):
        return (_validate_messages(p, "prompt", need_assistant=False)
                or _validate_messages(c, "completion", need_assistant=True))
    return ("\"prompt\" and \"completion\" must both be strings or both be lists of messages, got "
            f"{_json_type(p)} and {_json_type(c)}")


def _validate_messages(msgs: Any, key: str, need_assistant: bool) -> str | None:
    if not isinstance(msgs, list):
        return f"\"{key}\" must be a list of messages, got {_json_type(msgs)}"
    if not msgs:
        return f"\"{key}\" is empty"
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            return f"{where} must be an object with \"role\" and \"content\", got {_json_type(m)}"
        role = m.get("role")
        if role is None:
            return f"{where} has no \"role\""
        if role not in ROLES:
            return f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}"
        if "content" not in m and not m.get("tool_calls"):
            return f"{where} has no \"content\""
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            if not (isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                       for p in content)):
                return f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"{where}.weight must be 0 or 1, got {m['weight']!r}"
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        return f"\"{key}\" has no assistant message to learn from"
    return None


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)
