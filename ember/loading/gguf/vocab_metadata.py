"""An Ember :class:`~ember.tokenizer.Tokenizer` -> ``tokenizer.ggml.*`` metadata, as llama.cpp reads it.

The inverse of :func:`ember.loading.gguf.tokenizer.tokenizer_spec`, for the two BPE kinds llama.cpp runs:

- ``gpt2``: byte-level BPE (a ``ByteLevel`` pre-tokenizer). Tokens are written in GPT-2's byte alphabet
  with the merges as ``"left right"`` strings; ``tokenizer.ggml.pre`` names the split regex (llama.cpp
  selects its pre-tokenizer by that name, not by the regex), found by matching the tokenizer's
  ``Split`` pattern against :data:`~ember.loading.gguf.tokenizer.PRE_TOKENIZER_SPLITS`;
- ``llama``: SentencePiece-style BPE (``byte_fallback``, spaces as U+2581). llama.cpp merges the adjacent
  pair whose union has the highest *score*, so each token gets score ``-rank`` of the first merge that
  makes it (tokens no merge makes rank below every merge): ranked merges and scores then pick the
  same pair.

Added tokens become CONTROL (special) or USER_DEFINED; ``<0xNN>`` byte tokens BYTE; ids the tokenizer
does not use, up to the model's vocabulary size, become UNUSED ``[PAD{id}]`` (as llama.cpp's converter pads).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ember.errors import TokenizerError
from ember.loading.gguf.tokenizer import (
    BYTE, CONTROL, NORMAL, PRE_TOKENIZER_SPLITS, UNKNOWN, UNUSED, USER_DEFINED, _byte_level_alphabet,
)
from ember.tokenizer import Tokenizer

# The name written for each split regex (several names share one regex; this is llama.cpp's usual spelling).
_PRE_NAME_PREFERRED = ("llama-bpe", "qwen2", "gpt-4o", "tekken")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class VocabMetadata:
    """What :func:`vocab_metadata` found; :meth:`add_to` writes it with a ``gguf.GGUFWriter``."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unknown/padding/eot -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def add_to(self, writer: Any) -> None:
        """Add every ``tokenizer.*`` key to a ``gguf.GGUFWriter`` (before its header is written)."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, i in self.special_ids.items():
            writer.add_uint32(f"tokenizer.ggml.{kind}_token_id", i)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_json(tok: Tokenizer) -> dict[str, Any]:
    return json.loads(tok._backend.to_str())  # the tokenizer.json document Ember runs


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A pipeline stage's steps: the members of a ``Sequence``, or the stage itself."""
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def _pre_name(pre_tokenizer: dict[str, Any] | None, source: str) -> str:
    splits = [s for s in _steps(pre_tokenizer, "pretokenizers") if s.get("type") == "Split"]
    if not splits:
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    pattern = splits[0].get("pattern", {})
    regex = pattern.get("Regex", pattern.get("String"))
    names = [n for n, r in PRE_TOKENIZER_SPLITS.items() if r is not None and r == regex]
    if not names:
        raise TokenizerError(f"{source}: the pre-tokenizer's split regex is not one llama.cpp knows by name, so a "
                             "GGUF file could not say how to split text; supported: "
                             + ", ".join(sorted({n for n, r in PRE_TOKENIZER_SPLITS.items() if r})))
    return next((n for n in _PRE_NAME_PREFERRED if n in names), names[0])


def _adds(post: dict[str, Any] | None, token: str | None) -> tuple[bool, bool]:
    """Whether the post-processor puts ``token`` before / after a single sequence."""
    if token is None:
        return False, False
    for step in _steps(post, "processors"):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            names = [p["SpecialToken"]["id"] if "SpecialToken" in p else None for p in single]
            seq_at = next((k for k, p in enumerate(single) if "Sequence" in p), 0)
            return token in names[:seq_at], token in names[seq_at + 1:]
        if step.get("type") in ("BertProcessing", "RobertaProcessing"):
            return step.get("cls", [None])[0] == token, step.get("sep", [None])[0] == token
    return False, False


def _space_prefix(doc: dict[str, Any]) -> bool:
    for n in _steps(doc.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in _steps(doc.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    return False


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges") or []]


def vocab_metadata(tok: Tokenizer, n_vocab: int) -> VocabMetadata:
    """The GGUF vocabulary of ``tok``, padded to the model's ``n_vocab`` embedding rows.

    Raises:
        TokenizerError: not a BPE tokenizer, a pre-tokenizer llama.cpp cannot name, or more tokens than rows.
    """
    source = tok._source
    doc = _backend_json(tok)
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{source}: a {model.get('type')} tokenizer cannot be written to GGUF; llama.cpp runs "
                             "BPE vocabularies (byte-level like GPT-2/Llama 3/Qwen, or SentencePiece-style like Llama 2)")
    byte_level = any(p.get("type") == "ByteLevel" for p in _steps(doc.get("pre_tokenizer"), "pretokenizers"))
    if not byte_level and not model.get("byte_fallback"):
        raise TokenizerError(f"{source}: BPE without a ByteLevel pre-tokenizer or byte_fallback cannot be written "
                             "to GGUF (llama.cpp's BPE kinds are byte-level 'gpt2' and SentencePiece-style 'llama')")
    size = tok.vocab_size
    if size > n_vocab:
        raise TokenizerError(f"{source}: the tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    added = {a["id"]: a for a in doc.get("added_tokens") or []}
    tokens: list[str] = []
    types: list[int] = []
    unk = tok.unk_token
    for i in range(n_vocab):
        text = tok.id_to_token(i) if i < size else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(CONTROL if added[i].get("special", True) else USER_DEFINED)
        elif text == unk:
            tokens.append(text)
            types.append(UNKNOWN)
        elif not byte_level and _BYTE_TOKEN.fullmatch(text):
            tokens.append(text)
            types.append(BYTE)
        else:
            tokens.append(text)
            types.append(NORMAL)
    bos, eos = tok.token_to_id(tok.bos_token), tok.token_to_id(tok.eos_token)
    if eos is None and tok.eos_token_ids:
        eos = tok.eos_token_ids[0]
    specials = {"bos": bos, "eos": eos, "unknown": tok.token_to_id(unk), "padding": tok.pad_token_id}
    extra_eos = [i for i in tok.eos_token_ids if i != eos]
    if extra_eos:
        specials["eot"] = extra_eos[0]  # e.g. <|eot_id|> besides <|end_of_text|>
    add_bos, add_eos = _adds(doc.get("post_processor"), tok.bos_token)[0], _adds(doc.get("post_processor"), tok.eos_token)[1]
    meta = VocabMetadata(model="gpt2" if byte_level else "llama", pre="default", tokens=tokens, token_types=types,
                         special_ids={k: v for k, v in specials.items() if v is not None}, add_bos=add_bos,
                         add_eos=add_eos, chat_template=tok.chat_template)
    merges = _merge_pairs(model)
    if byte_level:
        meta.pre = _pre_name(doc.get("pre_tokenizer"), source)
        meta.merges = [f"{a} {b}" for a, b in merges]
        letters = set(_byte_level_alphabet().values())
        for a, b in merges:
            if not set(a + b) <= letters:
                raise TokenizerError(f"{source}: merge {a!r} {b!r} is not in GPT-2's byte alphabet; not a byte-level "
                                     "vocabulary llama.cpp can read")
    else:
        rank: dict[str, int] = {}
        for k, (a, b) in enumerate(merges):
            rank.setdefault(a + b, k)
        worst = len(merges)
        meta.scores = [-float(rank.get(t, worst + i)) if ty == NORMAL else 0.0
                       for i, (t, ty) in enumerate(zip(tokens, types))]
        meta.add_space_prefix = _space_prefix(doc)
    return meta
