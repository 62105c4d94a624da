"""A loss-curve PNG with no plotting library: a small raster, a 5x7 pixel font, zlib + struct.

Ember's runtime does not depend on matplotlib; a training run still leaves a picture of its loss
(train in blue, eval in orange, axes with step and loss ticks) next to its metrics JSONL.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

from ember.checkpoint_io import atomic_write_bytes

# 5x7 glyphs, one string of 7 rows of 5 bits per character.
_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "e": "00000 00000 01110 10001 11111 10000 01110", "k": "10000 10000 10010 10100 11000 10100 10010",
    "s": "00000 00000 01111 10000 01110 00001 11110", "t": "01000 01000 11100 01000 01000 01001 00110",
    "p": "00000 00000 11110 10001 11110 10000 10000", "l": "01100 00100 00100 00100 00100 00100 01110",
    "o": "00000 00000 01110 10001 10001 10001 01110", "r": "00000 00000 10110 11001 10000 10000 10000",
    "a": "00000 00000 01110 00001 01111 10001 01111", "i": "00100 00000 01100 00100 00100 00100 01110",
    "n": "00000 00000 10110 11001 10001 10001 10001", "v": "00000 00000 10001 10001 10001 01010 00100",
    " ": "00000 00000 00000 00000 00000 00000 00000", ":": "00000 01100 01100 00000 01100 01100 00000",
}
WHITE, BLACK, GREY = (255, 255, 255), (40, 40, 40), (225, 225, 225)
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(WHITE * (w * h))

    def set(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c: tuple[int, int, int], width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            t = i / n
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(width):
                for dy in range(width):
                    self.set(x + dx - width // 2, y + dy - width // 2, c)

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = BLACK) -> None:
        for ch in s:
            rows = _FONT.get(ch, _FONT[" "]).split()
            for r, bits in enumerate(rows):
                for b, bit in enumerate(bits):
                    if bit == "1":
                        self.set(x + b, y + r, c)
            x += 6

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def loss_curve_png(train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]] = (),
                   width: int = 640, height: int = 400) -> bytes:
    """PNG bytes of the loss curves: ``train``/``evals`` are (step, loss) pairs."""
    c = _Canvas(width, height)
    left, right, top, bottom = 56, 16, 24, 36
    pw, ph = width - left - right, height - top - bottom
    pts = [(s, v) for s, v in list(train) + list(evals) if math.isfinite(v)]
    if pts:
        x0, x1 = min(s for s, _ in pts), max(s for s, _ in pts)
        y0, y1 = min(v for _, v in pts), max(v for _, v in pts)
    else:
        x0, x1, y0, y1 = 0, 1, 0, 1
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def X(s: float) -> float:
        return left + (s - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    for v in _ticks(y0, y1):
        c.line(left, Y(v), left + pw, Y(v), GREY)
        label = _fmt(v)
        c.text(left - 6 - 6 * len(label), round(Y(v)) - 3, label)
    for s in _ticks(x0, x1):
        c.line(X(s), top + ph, X(s), top + ph + 4, BLACK)
        label = _fmt(round(s)) if s == round(s) else _fmt(s)
        c.text(round(X(s)) - 3 * len(label), top + ph + 8, label)
    c.line(left, top, left, top + ph, BLACK)
    c.line(left, top + ph, left + pw, top + ph, BLACK)
    c.text(left + pw // 2 - 12, height - 12, "step")
    c.text(4, 8, "loss")
    for series, color in ((train, BLUE), (evals, ORANGE)):
        series = [(s, v) for s, v in series if math.isfinite(v)]
        for (sa, va), (sb, vb) in zip(series, series[1:]):
            c.line(X(sa), Y(va), X(sb), Y(vb), color, width=2 if color == ORANGE else 1)
        if len(series) == 1:
            c.line(X(series[0][0]), Y(series[0][1]), X(series[0][0]), Y(series[0][1]), color, width=3)
    c.line(width - 150, 12, width - 135, 12, BLUE, 2)
    c.text(width - 130, 9, "train")
    if evals:
        c.line(width - 80, 12, width - 65, 12, ORANGE, 2)
        c.text(width - 60, 9, "eval")
    return c.png()


def write_loss_curve(path: str | os.PathLike, train: Sequence[tuple[int, float]],
                     evals: Sequence[tuple[int, float]] = ()) -> Path:
    """Write :func:`loss_curve_png` to ``path`` atomically."""
    atomic_write_bytes(path, loss_curve_png(train, evals))
    return Path(path)
