"""The bytes each token writes (:class:`TokenVocab`), read from a tokenizer once and sorted for prefix walks."""

from __future__ import annotations

import json
import re
from typing import Sequence

import torch

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

