"""Generated text to reasoning, content and tool calls, fed piece by piece as it is generated.

:class:`OutputParser` runs a small state machine over the text: *reasoning* (inside
``<think>..</think>``), *content*, and *call* (between a format's start and end markers). Text that
might be the beginning of a marker is held back until it is decided, so a marker is never split
across deltas and never shows up in ``content``. :class:`ForcedCallParser` reads the output of a
constrained decode (exactly one call in the format's forced shape) and streams its arguments as
they are written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.chat_formats.base import THINK_CLOSE, THINK_OPEN, Delta, StreamParser, ToolCall, ToolFormat, new_call_id

_REASON, _CONTENT, _CALL = range(3)


def _held(buf: str, markers: list[str]) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of a marker (kept back)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


class OutputParser(StreamParser):
    """Streaming split of one choice's output.

    Args:
        fmt: the tool-call format to look for; None when tools are off (everything is content).
        reasoning: look for ``<think>..</think>`` (a reasoning model).
        in_reasoning: the prompt ended inside an open ``<think>`` (templates that open it for the model).
        think: the reasoning block's (open, close) markers; default ``fmt.think`` (``<think>``, ``</think>``).
    """

    def __init__(self, fmt: ToolFormat | None, reasoning: bool = False, in_reasoning: bool = False,
                 think: tuple[str, str] | None = None) -> None:
        self.fmt, self.reasoning = fmt, reasoning
        self.think_open, self.think_close = think or (fmt.think if fmt is not None else (THINK_OPEN, THINK_CLOSE))
        self.state = _REASON if in_reasoning else _CONTENT
        self.buf = ""
        self.at_start = True       # nothing written yet (a <think> or a bare-JSON call may still open)
        # Leading whitespace of the next content is layout (before a call, after </think>); plain text is kept as is.
        self.strip = fmt is not None or reasoning
        self.marker = ""           # the marker that opened the current call
        self.calls = 0

    def finish(self) -> list[Delta]:
        """Everything still held back, at the end of the output."""
        out: list[Delta] = []
        while self._step(out, final=True):
            pass
        if self.state == _CALL:
            self._close_call(self.buf, out)
        elif self.state == _REASON:
            if self.buf:
                out.append(Delta("reasoning", self.buf))
        else:
            self._content(self.buf, out)
        self.buf = ""
        return out

    # ------------------------------------------------------------ states
    def _step(self, out: list[Delta], final: bool) -> bool:
        """Process the buffer once; True when the state changed and the rest needs another look."""
        if self.state == _REASON:
            i = self.buf.find(self.think_close)
            if i >= 0:
                if i:
                    out.append(Delta("reasoning", self.buf[:i]))
                self.buf = self.buf[i + len(self.think_close):]
                self.state, self.at_start, self.strip = _CONTENT, True, True
                return True
            if not final:
                keep = _held(self.buf, [self.think_close])
                if len(self.buf) > keep:
                    out.append(Delta("reasoning", self.buf[:len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
            return False
        if self.state == _CALL:
            end = self.fmt.end_marker
            i = self.buf.find(end) if end else -1
            if i < 0:
                return False
            self._close_call(self.buf[:i], out, end)
            self.buf = self.buf[i + len(end):]
            self.state = _CONTENT
            return True
        # content
        if self.strip and not self.buf.strip():
            return False  # leading whitespace waits for what follows it
        if self.at_start:
            body = self.buf.lstrip()
            if self.fmt is not None and self.fmt.json_at_start and body[0] == "{":
                self.state, self.marker, self.buf = _CALL, "", body
                return True
        markers = list(self.fmt.start_markers) if self.fmt is not None else []
        if self.reasoning and self.at_start:
            markers.append(self.think_open)
        hit, at = None, -1
        for m in markers:
            i = self.buf.find(m)
            if i >= 0 and (at < 0 or i < at):
                hit, at = m, i
        if hit is not None:
            self._content(self.buf[:at], out)
            self.buf = self.buf[at + len(hit):]
            if hit == self.think_open:
                self.state = _REASON
            else:
                self.state, self.marker = _CALL, hit
            return True
        keep = 0 if final else _held(self.buf, markers)
        if len(self.buf) > keep:
            self._content(self.buf[:len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _content(self, text: str, out: list[Delta]) -> None:
        if self.strip:
            text = text.lstrip()  # whitespace before a call or after </think> is layout, not content
        if text:
            out.append(Delta("content", text))
            self.at_start = self.strip = False

    def _close_call(self, body: str, out: list[Delta], end: str | None = None) -> None:
        calls = self.fmt.parse_body(body) if self.fmt is not None else None
        if calls is None:  # not a well-formed call: the model's text is kept as content
            self._content(self.marker + body + (end or ""), out)
            return
        self.at_start, self.strip = False, True
        for name, args in calls:
            out += [Delta("call", index=self.calls, id=new_call_id(), name=name), Delta("args", args, self.calls)]
            self.calls += 1


class ForcedCallParser:
    """The output of a forced (constrained) call: one of ``alternatives`` = ``[(prefix, suffix, name)]``.

    The call's name is known once its prefix is complete; the arguments stream as they are written,
    less a tail as long as the suffix (which the grammar writes last).
    """

    def __init__(self, alternatives: list[tuple[str, str, str]]) -> None:
        self.alts = alternatives
        self.buf = ""
        self.alt: tuple[str, str, str] | None = None
        self.sent = 0  # characters of buf already sent as arguments

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        if self.alt is None:
            for a in self.alts:
                if self.buf.startswith(a[0]):
                    self.alt, self.sent = a, len(a[0])
                    out.append(Delta("call", index=0, id=new_call_id(), name=a[2]))
                    break
        if self.alt is not None:
            self._args(len(self.buf) - len(self.alt[1]), out)
        return out

    def finish(self) -> list[Delta]:
        if self.alt is None:  # cut short before the name was complete (max_tokens)
            return [Delta("content", self.buf)] if self.buf else []
        out: list[Delta] = []
        suffix = self.alt[1]
        self._args(len(self.buf) - len(suffix) if self.buf.endswith(suffix) else len(self.buf), out)
        return out

    def _args(self, end: int, out: list[Delta]) -> None:
        if end > self.sent:
            out.append(Delta("args", self.buf[self.sent:end], 0))
            self.sent = end


@dataclass
class ParsedOutput:
    """A whole choice: reasoning, content and calls (what the non-streaming APIs return)."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if d.kind == "reasoning":
                self.reasoning += d.text
            elif d.kind == "content":
                self.content += d.text
            elif d.kind == "call":
                self.calls.append(ToolCall(d.name or "", "", d.id or new_call_id()))
            else:
                self.calls[d.index].arguments += d.text
