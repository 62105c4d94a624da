"""Where proposed tokens come from: prompt lookup (n-gram) and a small draft model.

A proposer is asked for up to ``k`` tokens that may follow a sequence (prompt + confirmed tokens). It returns
the tokens and, when it drew them from a distribution, that distribution ((k, V) probabilities) so the sampled
verification can apply the rejection rule (:func:`ember.speculative.verify.accept_sampled`); None means the
tokens were picked deterministically.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ember.cache import StaticKVCache, layer_specs
from ember.errors import GenerationError
from ember.sampling import Sampler, SamplingParams
from ember.speculative.verify import draw


class Proposer(Protocol):
    """What the speculative decoders need from a source of proposals."""

    def propose(self, ids: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens to follow ``ids``, and their (len, V) distribution or None (deterministic)."""
        ...

    def reset(self) -> None:
        """Forget everything about the previous sequence."""
        ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from ``max_ngram``
    down to ``min_ngram``) and propose the tokens that followed it. No second model: it pays off where the
    output repeats its input (editing, summarizing, code), and proposes nothing (a plain step) where it finds
    no match."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.reset()

    def reset(self) -> None:
        # per n: n-gram -> index of the token that followed its latest occurrence (n-grams ending before the
        # sequence's last token; kept up to date as the sequence grows, so a lookup is a dict hit, not a scan)
        self._index: dict[int, dict[tuple, int]] = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self._ids: list[int] = []
        self._done = 0  # n-grams ending at e < self._done are indexed

    def _update(self, ids: list[int]) -> None:
        L = len(ids)
        if L < len(self._ids) or ids[:len(self._ids)] != self._ids:  # another sequence: start over
            self.reset()
        for e in range(max(self._done, 1), L):
            for n, table in self._index.items():
                if e >= n:
                    table[tuple(ids[e - n:e])] = e
        self._done = max(self._done, L)
        self._ids = list(ids)

    def propose(self, ids: list[int], k: int) -> tuple[list[int], None]:
        if k < 1:
            return [], None
        self._update(ids)
        L = len(ids)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            e = self._index[n].get(tuple(ids[L - n:]))
            if e is not None:
                return ids[e:e + k], None
        return [], None


def check_rollback(cfg, what: str) -> None:
    """Refuse a draft model whose per-layer state cannot be rolled back by moving its cache position back.

    A draft's rejected proposals leave keys/values in its static cache; attention simply overwrites those slots
    on the next proposal (the draft's cache keeps every slot, sliding layers included), but a recurrent layer
    (Gated DeltaNet, Mamba-2) folds every token into its state. (A target snapshots its states instead:
    :mod:`ember.speculative.rollback` for one sequence, the scheduler's state slots in a batch.)

    Raises:
        GenerationError: naming the layer kind and what to do.
    """
    if "recurrent" in {s.kind for s in layer_specs(cfg)}:
        raise GenerationError(f"speculative decoding is not available for {what} ({cfg.model_type}): its recurrent "
                              "layers cannot drop rejected tokens from their state; use a draft model without "
                              "recurrent layers, or --speculate ngram")


def proposal_sampler(params: SamplingParams, device: torch.device) -> Sampler | None:
    """None for greedy settings (proposals are the argmax); else a sampler applying the target's temperature /
    top-k / top-p / min-p, so proposals are drawn from the distribution the rejection rule is handed."""
    return None if params.greedy else Sampler(
        SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                       min_p=params.min_p, seed=0), 1, device)


def pick(logits: torch.Tensor, sampler: Sampler | None, generator: torch.Generator | None, dists: list) -> int:
    """One proposal from ``logits`` (V,): the argmax, or a draw whose distribution is appended to ``dists``."""
    if sampler is None:
        return int(logits.argmax())
    q = sampler.process_logits(logits[None].float(), None)[0].softmax(-1)
    dists.append(q)
    return draw(q, generator)


class DraftProposer:
    """A small model sharing the target's tokenizer proposes ``k`` tokens, one fused decode step each.

    It keeps its own :class:`~ember.cache.StaticKVCache` for one sequence and the tokens whose keys/values it
    holds; before proposing it rolls back to the longest prefix it shares with the confirmed sequence and feeds
    the rest (usually the last kept proposal's successor), so a rejected proposal costs nothing to forget.

    Args:
        model: the draft :class:`~ember.models.Transformer`.
        params: the target's sampling settings; greedy proposes the argmax, otherwise it samples from the draft's
            distribution under the same temperature / top-k / top-p / min-p (and returns it for the rejection rule).
        max_len: the longest sequence it will see (prompt + new tokens + k).
        generator: the draws' source when sampling.
    """

    def __init__(self, model, params: SamplingParams, max_len: int, generator: torch.Generator | None = None) -> None:
        check_rollback(model.config, "the draft model")
        self.model = model
        p = model.model.norm.weight
        self.device, self.dtype = p.device, p.dtype
        self.sampler = proposal_sampler(params, self.device)
        self.generator = generator
        self.max_len = max_len
        self.cache: StaticKVCache | None = None
        self.held: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.session = object()

    def reset(self) -> None:
        self.cache, self.held = None, []

    def _feed(self, toks: list[int]) -> torch.Tensor:
        """Run ``toks`` after the held tokens; the last position's logits (V,)."""
        cache = self.cache
        x = torch.tensor([toks], dtype=torch.long, device=self.device)
        logits = self.model(x, None, cache, cache.pos, None, last_only=True, session=self.session)[0, -1]
        cache.advance(len(toks))
        self.held.extend(toks)
        return logits

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        if k < 1:
            return [], None
        if len(ids) + k > self.max_len:
            k = self.max_len - len(ids)
            if k < 1:
                return [], None
        if self.cache is None:
            # every slot kept (no rings): the draft's position moves back past rejected proposals
            self.cache = StaticKVCache(self.model.config, 1, self.max_len, self.dtype, self.device, windows=False)
        # keep the longest prefix shared with ids (at least one token is always fed, for its logits)
        n = 0
        limit = min(len(self.held), len(ids) - 1)
        while n < limit and self.held[n] == ids[n]:
            n += 1
        self.held = self.held[:n]
        self.cache.pos = n
        logits = self._feed(ids[n:])
        out: list[int] = []
        dists = []
        for i in range(k):
            tok = pick(logits, self.sampler, self.generator, dists)
            out.append(tok)
            if i + 1 < k:
                logits = self._feed([tok])
        return out, (torch.stack(dists) if dists else None)
