"""Fine-tuning data: JSONL records -> token ids + loss masks -> (packed) batches.

One record per line, in any of three shapes (they may be mixed in one file)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}   OpenAI chat
    {"prompt": "...", "completion": "..."}      raw text (or both lists of messages: conversational)
    {"text": "..."}                             plain text, every token trained on

Chats are rendered with the model's own chat template; the loss covers only assistant turns
(each turn's content and the template's end-of-turn text) unless ``loss_on="all"``. An assistant
message with ``"weight": 0`` (OpenAI's field) is context, not a target. Prompt/completion
records train on the completion and an EOS; text records on everything plus an EOS.

Every line is validated before anything is tokenized, and all problems are reported together
with their line numbers (:class:`~ember.errors.DataError`; reading is in :mod:`ember.train.jsonl`).
Examples longer than ``seq_len`` are truncated (or dropped with ``overlong="drop"``) and counted
in :class:`DataStats`; tokenizing one does only the work its first ``seq_len`` tokens need.

Batches: rows are single examples right-padded to the longest in the batch, or with ``pack``
several examples share a row of up to ``seq_len`` tokens; each example keeps its own positions
(0, 1, ...) and a segment id, and :func:`attention_mask` turns segment ids into a block-diagonal
causal mask so no token attends across an example boundary. Epoch order is a pure function of
(seed, epoch), so a run resumed at (epoch, batch index) sees exactly the same batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ember.errors import ChatTemplateError, DataError
from ember.tokenizer import Tokenizer
from ember.train.jsonl import ROLES, _data_error, read_jsonl, record_format, validate_record

__all__ = ["IGNORE", "ROLES", "Batch", "BatchPlan", "DataStats", "Example", "attention_mask", "encode_bounded",
           "encode_with_offsets", "load_jsonl", "read_jsonl", "record_format", "tokenize_record", "validate_record"]

IGNORE = -100  # label of positions that carry no loss (as in HF / PyTorch cross_entropy)


@dataclass
class Example:
    """One tokenized record.

    Attributes:
        ids: token ids (T,).
        target: per token, whether it is a training target (predicted from the tokens before it).
        line: 1-based line number in the source file.
    """

    ids: list[int]
    target: list[bool]
    line: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss (the first token is never predicted)."""
        return sum(self.target[1:])


@dataclass
class DataStats:
    """What :func:`load_jsonl` kept and why it dropped the rest."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log."""
        fmt = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        parts = [f"{self.examples} examples ({fmt})", f"{self.tokens} tokens, {self.target_tokens} trained on"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to fit")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped as too long")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with nothing to learn")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------- tokenizing
def encode_with_offsets(tok: Tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's (start, end) character span (special tokens added by the
    post-processor get (0, 0))."""
    fn = getattr(tok, "encode_with_offsets", None)
    if callable(fn):
        return fn(text, add_special_tokens=add_special_tokens)
    enc = tok._backend.encode(text, add_special_tokens=add_special_tokens)  # noqa: SLF001 - same package family
    return list(enc.ids), [tuple(o) for o in enc.offsets]


# Characters past the cut whose tokens are not trusted: a cut can change the token it falls in and
# (through look-ahead in the pre-tokenizer) its neighbours, never tokens this far before it.
_CUT_SLACK = 1024


def max_token_chars(tok: Tokenizer) -> int:
    """The longest token's spelling in characters (at least 1): no token covers more text than this, so
    ``n`` tokens never span more than ``n * max_token_chars`` characters."""
    cached = getattr(tok, "_ember_max_token_chars", None)
    if cached is None:
        backend = getattr(tok, "_backend", None)
        vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else {}
        cached = max((len(t) for t in vocab), default=1) or 1
        try:
            tok._ember_max_token_chars = cached  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return cached


def encode_bounded(tok: Tokenizer, text: str, add_special_tokens: bool,
                   max_tokens: int | None) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`encode_with_offsets`, doing only the work the first ``max_tokens`` tokens need.

    A text longer than those tokens can span is cut before tokenizing; of the cut text's tokens, those
    ending ``_CUT_SLACK`` characters before the cut are the full text's own, and at least
    ``max_tokens`` of them are returned (the rest would be truncated anyway). A 50 MB line thus costs
    what ``--seq-len`` can use, not 50 MB of tokenization.
    """
    if max_tokens is None:
        return encode_with_offsets(tok, text, add_special_tokens)
    budget = max_tokens * max_token_chars(tok) + 2 * _CUT_SLACK
    while len(text) > budget:
        ids, offsets = encode_with_offsets(tok, text[:budget], add_special_tokens)
        keep = 0
        while keep < len(ids) and offsets[keep][1] <= budget - _CUT_SLACK:
            keep += 1
        if keep >= max_tokens:
            return ids[:keep], offsets[:keep]
        budget *= 4  # tokens longer than the vocabulary suggests (an unknown run fused to one): widen
    return encode_with_offsets(tok, text, add_special_tokens)


def _plain_messages(msgs: list[dict]) -> list[dict]:
    """Messages as the template expects them: list-of-parts content joined, our ``weight`` removed."""
    out = []
    for m in msgs:
        m = {k: v for k, v in m.items() if k != "weight"}
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        out.append(m)
    return out


def _chat_spans(tok: Tokenizer, msgs: list[dict], trained: list[bool],
                max_chars: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the character spans of the turns to train on.

    A turn's span runs from where the assistant's content starts (the end of the prompt rendered
    with ``add_generation_prompt``) to the end of the conversation rendered through that turn, so
    it includes the template's end-of-turn text (e.g. ``<|eot_id|>``) that teaches the model to stop.
    Turns starting past ``max_chars`` (beyond what the kept tokens can reach) are not located.
    """
    plain = _plain_messages(msgs)
    full = tok.apply_chat_template(plain, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(plain):
        if max_chars is not None and cursor > max_chars:
            break  # every later turn starts past the tokens that are kept
        if m["role"] != "assistant" or not trained[i]:
            continue
        prefix = tok.apply_chat_template(plain[:i], add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(plain[:i + 1], add_generation_prompt=False)
        if i and full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
            cursor = len(upto)
            continue
        # A template that renders earlier turns differently (e.g. strips reasoning from history):
        # fall back to finding the content itself, plus an end-of-turn token right after it.
        content = m.get("content") or ""
        at = full.find(content, cursor) if content else -1
        if at < 0:
            raise ChatTemplateError(f"cannot locate assistant message {i} in the rendered conversation")
        end = at + len(content)
        for eos in _eos_strings(tok):
            if full.startswith(eos, end):
                end += len(eos)
                break
        spans.append((at, end))
        cursor = end
    return full, spans


def _eos_strings(tok: Tokenizer) -> list[str]:
    out = []
    for i in tok.eos_token_ids:
        s = tok.id_to_token(i)
        if s:
            out.append(s)
    return out


def _mark(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens whose first character lies in one of ``spans`` (post-processor specials never do)."""
    out = []
    for s, e in offsets:
        out.append(e > s and any(a <= s < b for a, b in spans))
    return out


def _eos_id(tok: Tokenizer) -> int | None:
    if tok.eos_token is not None and (i := tok.token_to_id(tok.eos_token)) is not None:
        return i
    return tok.eos_token_ids[0] if tok.eos_token_ids else None


def tokenize_record(tok: Tokenizer, obj: dict, loss_on: str = "assistant", line: int = 0,
                    max_tokens: int | None = None) -> Example:
    """Tokenize one validated record.

    Args:
        tok: the model's tokenizer (its chat template renders ``messages``).
        obj: a record that passed :func:`validate_record`.
        loss_on: ``"assistant"`` (assistant turns / completion only) or ``"all"`` tokens.
        line: source line, kept on the example.
        max_tokens: when set, only the first ``max_tokens`` tokens are guaranteed exact (a longer
            example comes back with more than ``max_tokens`` tokens, the excess cut short): the
            work done is bounded by what a ``seq_len`` of ``max_tokens - 1`` can use.
    """
    fmt = record_format(obj)
    if fmt == "text":
        ids, _ = encode_bounded(tok, obj["text"], True, max_tokens)
        target = [True] * len(ids)
        eos = _eos_id(tok)
        if eos is not None:
            ids, target = ids + [eos], target + [True]
        return Example(ids, target, line)
    if fmt == "prompt_completion" and isinstance(obj["prompt"], str):
        prompt, completion = obj["prompt"], obj["completion"]
        ids, offsets = encode_bounded(tok, prompt + completion, True, max_tokens)
        target = [True] * len(ids) if loss_on == "all" else _mark(offsets, [(len(prompt), len(prompt) + len(completion))])
        eos = _eos_id(tok)
        if eos is not None:
            ids, target = ids + [eos], target + [True]
        return Example(ids, target, line)
    if fmt == "prompt_completion":
        msgs = list(obj["prompt"]) + list(obj["completion"])
        trained = [False] * len(obj["prompt"]) + [m.get("weight", 1) == 1 for m in obj["completion"]]
    else:
        msgs = list(obj["messages"])
        trained = [m.get("weight", 1) == 1 for m in msgs]
    max_chars = None if max_tokens is None else max_tokens * max_token_chars(tok) + _CUT_SLACK
    text, spans = _chat_spans(tok, msgs, trained, max_chars)
    ids, offsets = encode_bounded(tok, text, False, max_tokens)
    target = [True] * len(ids) if loss_on == "all" else _mark(offsets, spans)
    return Example(ids, target, line)


def load_jsonl(path: str | os.PathLike, tok: Tokenizer, seq_len: int, loss_on: str = "assistant",
               overlong: str = "truncate") -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize a JSONL file.

    Args:
        path: the data file.
        tok: the model's tokenizer.
        seq_len: longest example in tokens; longer ones are truncated (keeping the start) or dropped.
        loss_on: ``"assistant"`` or ``"all"``.
        overlong: ``"truncate"`` or ``"drop"``.
    Returns:
        (examples, stats). Examples left with no target token (e.g. truncated before the answer) are
        dropped and counted.
    Raises:
        DataError: malformed lines (all of them, with line numbers), or no usable example.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    records = read_jsonl(path)
    stats = DataStats(records=len(records))
    examples: list[Example] = []
    errors: list[str] = []
    for line, obj in records:
        fmt = record_format(obj)
        try:
            ex = tokenize_record(tok, obj, loss_on, line, max_tokens=seq_len + 1)
        except ChatTemplateError as e:
            errors.append(f"{path}:{line}: {e}")
            continue
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        if len(ex) > seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ex = Example(ex.ids[:seq_len], ex.target[:seq_len], line)
            stats.truncated += 1
        if ex.n_targets == 0:
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex)
        stats.target_tokens += ex.n_targets
    if errors:
        raise _data_error(errors)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.summary()}); raise --seq-len or check the data")
    return examples, stats


# ---------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Model inputs for one micro-batch.

    Attributes:
        input_ids: (B, T) int64.
        labels: (B, T) int64, the next token at each position or ``IGNORE``.
        positions: (B, T) int64 RoPE positions (restart at 0 for each packed example).
        segments: (B, T) int64 example index within its row (1, 2, ...; 0 = padding), or None
            when rows are single right-padded examples (plain causal attention is then exact).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor | None
    n_tokens: int = 0  # real (non-padding) tokens

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.positions.to(device),
                     None if self.segments is None else self.segments.to(device), self.n_tokens)


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask from segment ids (B, T) -> bool (B, 1, T, T), True = may attend."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class BatchPlan:
    """Deterministic epochs of batches over a list of examples.

    Args:
        examples: tokenized examples (each at most ``seq_len`` tokens).
        batch_size: rows per micro-batch.
        seq_len: row length limit (packing fills rows up to it).
        pack: put several examples in one row (block-diagonal attention keeps them apart).
        shuffle: shuffle examples each epoch (order depends only on ``seed`` and the epoch).
        seed: data-order seed.
        pad_id: token id used for padding (never attended to by real tokens, never a target).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, pack: bool = False,
                 shuffle: bool = True, seed: int = 0, pad_id: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.examples = list(examples)
        self.batch_size, self.seq_len, self.pack = batch_size, seq_len, pack
        self.shuffle, self.seed, self.pad_id = shuffle, seed, pad_id
        self._cache: dict[int, list[list[list[int]]]] = {}

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """Batches of epoch ``epoch``: each a list of rows, each row a list of example indices."""
        if epoch not in self._cache:
            self._cache.clear()
            n = len(self.examples)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
            else:
                order = list(range(n))
            rows = self._pack_rows(order) if self.pack else [[i] for i in order]
            self._cache[epoch] = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        return self._cache[epoch]

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def _pack_rows(self, order: list[int], open_limit: int = 64) -> list[list[int]]:
        """First-fit packing over a window of open rows (keeps the shuffled order roughly intact)."""
        rows: list[list[int]] = []
        room: list[int] = []  # free tokens of each open row, parallel to open_rows
        open_rows: list[int] = []
        for i in order:
            n = len(self.examples[i])
            for j, free in enumerate(room):
                if n <= free:
                    rows[open_rows[j]].append(i)
                    room[j] -= n
                    if room[j] == 0:
                        del room[j], open_rows[j]
                    break
            else:
                rows.append([i])
                open_rows.append(len(rows) - 1)
                room.append(self.seq_len - n)
                if len(open_rows) > open_limit:
                    k = min(range(len(room)), key=room.__getitem__)  # close the fullest
                    del room[k], open_rows[k]
        return rows

    def collate(self, rows: list[list[int]]) -> Batch:
        """Build the (B, T) tensors for one batch, T = the longest row."""
        B = len(rows)
        T = max(sum(len(self.examples[i]) for i in row) for row in rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        segments = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row, 1):
                ex = self.examples[i]
                n = len(ex)
                t_ids = torch.tensor(ex.ids, dtype=torch.long)
                tgt = torch.tensor(ex.target, dtype=torch.bool)
                ids[b, at:at + n] = t_ids
                lab = torch.where(tgt[1:], t_ids[1:], IGNORE)  # position t predicts token t+1
                labels[b, at:at + n - 1] = lab
                positions[b, at:at + n] = torch.arange(n)
                segments[b, at:at + n] = k
                at += n
        packed = self.pack and any(len(r) > 1 for r in rows)
        return Batch(ids, labels, positions, segments if packed else None, int((segments > 0).sum()))

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """(batch index, Batch) for epoch ``epoch`` from batch ``start`` on."""
        for i, rows in enumerate(self.epoch(epoch)[start:], start):
            yield i, self.collate(rows)
