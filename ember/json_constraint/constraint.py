"""One sequence under a grammar: :class:`JsonConstraint` masks logits one token at a time."""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from ember.json_constraint.grammar import JsonGrammar
from ember.json_constraint.vocab import TokenVocab

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
