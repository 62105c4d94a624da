"""GGUF vocabulary (``tokenizer.ggml.*``) -> a ``tokenizers`` pipeline, written as tokenizer.json would be.

``llama`` = SentencePiece-style BPE (merges recovered from token scores, byte fallback, a space prefix
as llama.cpp adds it), ``gpt2`` = byte-level BPE with the file's merges and the pre-tokenizer regex
named by ``tokenizer.ggml.pre``, ``gemma4`` = BPE with the file's merges over raw UTF-8 with spaces escaped as
U+2581 and byte fallback (``<0xXX>`` tokens), split only at newline runs as llama.cpp splits it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import tokenizers

from ember.errors import TokenizerError
from ember.loading.gguf.reader import GGUFFile
from ember.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's pre-tokenizer table).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "gpt-2": None,  # None: GPT-2's own regex (ByteLevel use_regex)
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp looks a whole pre-tokenized word up in the vocabulary before merging for these.
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral", "llama4"}
# Control tokens llama.cpp treats as end of generation by their text (besides eos/eot/eom ids).
_END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<|return|>", "<end_of_utterance>")


@dataclass
class GGUFTokenizerSpec:
    """Everything :class:`ember.tokenizer.Tokenizer` needs, read from ``tokenizer.*`` metadata."""

    json: dict[str, Any]  # a tokenizer.json document
    special_tokens: dict[str, str]  # bos_token/eos_token/unk_token/pad_token -> text
    eos_token_ids: list[int]
    chat_templates: dict[str, str]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the rest to U+0100+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spm_merges(tokens: list[str], scores: list[float], usable: list[bool]) -> list[list[str]]:
    """BPE merges that reproduce SentencePiece's score-greedy merging.

    SentencePiece BPE repeatedly joins the adjacent pair whose union has the highest score. As a
    ranked merge list: every split (left, right) of a usable token into two usable tokens, best union
    score first; ties ordered by longer left piece, then longer right piece, then token order, then
    the pieces' ids (the order HF's converter emits, so both build the same tokenizer).
    """
    ids = {tok: i for i, tok in enumerate(tokens) if usable[i]}
    found: list[tuple[float, int, int, int, str, str]] = []
    for tok, i in ids.items():
        local = []
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                local.append((ids[left], ids[right], left, right))
        local.sort()
        found.extend((scores[i], len(left), len(right), n, left, right)
                     for n, (_, _, left, right) in enumerate(local))
    # Python's sort is stable and reverse=True keeps equal items in order: sort on the key only.
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [[left, right] for *_, left, right in found]


def _array(gf: GGUFFile, key: str, kind: type | tuple[type, ...]) -> list:
    """Metadata array ``key`` whose items are all ``kind`` (bools are not numbers); [] when absent."""
    v = gf.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or any(not isinstance(x, kind) or isinstance(x, bool) for x in v):
        what = "strings" if kind is str else "numbers"
        raise TokenizerError(f"{gf.path}: metadata {key!r} must be an array of {what}")
    return v


def _merge_pairs(src: Any, raw: list[str]) -> list[list[str]]:
    """``tokenizer.ggml.merges`` entries ('left right') as pairs."""
    merges = []
    for k, m in enumerate(raw):
        pair = m.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{src}: tokenizer.ggml.merges[{k}] = {m!r} is not 'left right'")
        merges.append(pair)
    return merges


def tokenizer_spec(gf: GGUFFile) -> GGUFTokenizerSpec:
    """Build the tokenizer a GGUF file describes.

    Raises:
        TokenizerError: no vocabulary, an unsupported ``tokenizer.ggml.model``, or inconsistent arrays.
    """
    src = gf.path
    kind = gf.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{src}: no tokenizer in this GGUF file (metadata 'tokenizer.ggml.model' is missing)")
    if not isinstance(kind, str):
        raise TokenizerError(f"{src}: metadata 'tokenizer.ggml.model' must be a string, got {kind!r}")
    tokens = _array(gf, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise TokenizerError(f"{src}: metadata 'tokenizer.ggml.tokens' is missing or empty")
    n = len(tokens)
    types = _array(gf, "tokenizer.ggml.token_type", int) or [NORMAL] * n
    if len(types) != n:
        raise TokenizerError(f"{src}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def token_id(key: str) -> int | None:
        i = gf.get_int(f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= i < n:
            raise TokenizerError(f"{src}: tokenizer.ggml.{key} = {i} is outside the vocabulary (0..{n - 1})")
        return i

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    if unk is None and kind == "llama":
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    pre = gf.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise TokenizerError(f"{src}: metadata 'tokenizer.ggml.pre' must be a string, got {pre!r}")

    if kind == "llama":
        add_bos_default = True
        scores = _array(gf, "tokenizer.ggml.scores", (int, float)) or [-float(i) for i in range(n)]
        if len(scores) != n:
            raise TokenizerError(f"{src}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        space_prefix = bool(gf.get("tokenizer.ggml.add_space_prefix", True))
        vocab = {tok: i for i, tok in enumerate(tokens)}  # a repeated spelling maps to its last id, as in llama.cpp
        model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                 "merges": _spm_merges(tokens, scores, [t == NORMAL for t in types])}
        # llama.cpp escapes spaces as U+2581 and, with add_space_prefix, puts one before the text and
        # after every special token: the legacy HF Llama normalizer, applied per added-token split.
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
                      if space_prefix else replace)
        pre_tokenizer = None
        decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]
        if space_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder = {"type": "Sequence", "decoders": decoders}
    elif kind == "gpt2":
        add_bos_default = pre in _IGNORE_MERGES_PRE  # Llama 3 style vocabularies start with BOS
        merges = _merge_pairs(src, _array(gf, "tokenizer.ggml.merges", str))  # absent = none
        alphabet = _byte_level_alphabet()
        letters = set(alphabet.values())
        vocab = {}
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ == NORMAL and not set(tok) <= letters:  # a plain token written as raw text: respell it
                tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
            vocab[tok] = i
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": pre in _IGNORE_MERGES_PRE, "vocab": vocab, "merges": merges}
        normalizer = None
        if pre not in PRE_TOKENIZER_SPLITS:
            warnings.warn(f"{src}: unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's regex", stacklevel=2)
        split = PRE_TOKENIZER_SPLITS.get(pre)
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": split is None}
        pre_tokenizer = byte_level if split is None else {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}, byte_level]}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    elif kind == "gemma4":
        add_bos_default = True  # llama.cpp forces it on for this model
        vocab = {tok: i for i, tok in enumerate(tokens)}
        model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                 "merges": _merge_pairs(src, _array(gf, "tokenizer.ggml.merges", str))}
        normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": "[^\n]+|[\n]+"}, "behavior": "Isolated",
                         "invert": False}
        decoder = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                    {"type": "ByteFallback"}, {"type": "Fuse"}]}
    else:
        raise TokenizerError(f"{src}: tokenizer model {kind!r} is not supported; supported: llama (SentencePiece BPE), "
                             "gpt2 (byte-level BPE), gemma4 (BPE with byte fallback)")

    # Control/unknown tokens (and the named specials) are matched whole and are "special"; user-defined
    # ones are matched whole but decode as text.
    named = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    special_ids = {i for i in named.values() if i is not None}
    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (CONTROL, UNKNOWN, USER_DEFINED) or i in special_ids:
            if vocab.get(tok) != i:  # a repeated spelling: the last id keeps the text
                continue
            special = typ != USER_DEFINED or i in special_ids
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special})

    add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(gf.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    post = None
    if add_bos or add_eos:
        # Written as JSON, not TemplateProcessing("<s> $A"), which cannot spell tokens holding ':' or spaces.
        head = [(tokens[bos], bos)] if add_bos else []
        tail = [(tokens[eos], eos)] if add_eos else []

        def template(seq: str) -> list[dict]:
            return [*({"SpecialToken": {"id": t, "type_id": 0}} for t, _ in head),
                    {"Sequence": {"id": seq, "type_id": 0}},
                    *({"SpecialToken": {"id": t, "type_id": 0}} for t, _ in tail)]

        post = {"type": "TemplateProcessing", "single": template("A"), "pair": template("A") + template("B"),
                "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in head + tail}}

    spec_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
                 "decoder": decoder, "model": model}

    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    eos_ids += [i for i, (t, typ) in enumerate(zip(tokens, types)) if typ == CONTROL and t in _END_OF_GENERATION]
    templates: dict[str, str] = {}
    if isinstance(tmpl := gf.get("tokenizer.chat_template"), str):
        templates["default"] = tmpl
    for name in _array(gf, "tokenizer.chat_templates", str):
        if isinstance(t := gf.get(f"tokenizer.chat_template.{name}"), str):
            templates[name] = t
    return GGUFTokenizerSpec(
        json=spec_json,
        special_tokens={k: tokens[i] for k, i in named.items() if i is not None},
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        chat_templates=templates,
    )


def load_gguf_tokenizer(path: str | os.PathLike | GGUFFile) -> Tokenizer:
    """The tokenizer stored in a llama.cpp GGUF file's metadata.

    Args:
        path: a ``.gguf`` file, or an open :class:`GGUFFile`.

    Reads ``tokenizer.ggml.*`` (``llama`` SentencePiece-style or ``gpt2`` byte-level BPE vocabularies,
    token types, special token ids, add_bos/eos flags) and ``tokenizer.chat_template``; see
    :func:`tokenizer_spec` for how they become a `tokenizers` pipeline.

    Raises:
        TokenizerError: the file has no vocabulary or one Ember cannot build.
        GGUFError: the file itself is malformed.
    """
    gf = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    spec = tokenizer_spec(gf)
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec.json))
    except Exception as e:  # tokenizers raises a bare Exception for any error
        raise TokenizerError(f"{gf.path}: cannot build a tokenizer from the GGUF vocabulary: {e}") from None
    return Tokenizer(backend, special_tokens=spec.special_tokens, chat_templates=spec.chat_templates,
                     eos_token_ids=spec.eos_token_ids, source=str(gf.path))
