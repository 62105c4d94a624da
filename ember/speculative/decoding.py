"""Speculative decoding of one sequence over the engine's static cache.

After prefill, each pass either

* proposes ``k`` tokens (:mod:`ember.speculative.proposers`), runs the target once over the last confirmed
  token and the ``k`` proposals (``k + 1`` rows: the few-row streaming kernels read every weight once for all
  rows, so the pass costs about one decode step), keeps what the target agrees with
  (:mod:`ember.speculative.verify`), emits one more token from the target's own distribution, and rolls the
  cache back over the rejected proposals (their slots are overwritten by the next pass; recurrent states and
  sliding-window rings are restored from a snapshot and the accepted tokens run again, :mod:`.rollback`); or
* takes a plain decode step (the one-token fused path), when the controller (:class:`AdaptiveK`) has switched
  speculation off or the proposer has nothing to offer.

Greedy output is the plain greedy output token for token; sampled output has the target's distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ember.errors import GenerationError
from ember.sampling import Sampler, SamplingParams
from ember.speculative.adaptive import AdaptiveK, SpeculationCounters
from ember.speculative.mtp import HiddenTap, MTPProposer, check_mtp_target
from ember.speculative.proposers import DraftProposer, NgramProposer, Proposer
from ember.speculative.rollback import Snapshot, needs_replay
from ember.speculative.verify import accept_greedy, accept_sampled

METHODS = ("ngram", "draft", "mtp")
DEFAULT_NUM_SPECULATIVE = {"ngram": 4, "draft": 4, "mtp": 1}


@dataclass
class SpeculativeConfig:
    """How an engine speculates.

    Attributes:
        method: "ngram" (prompt lookup), "draft" (a smaller model sharing the tokenizer) or "mtp" (the checkpoint's
            multi-token-prediction heads).
        num_speculative: the most proposals per pass (the controller may use fewer).
        draft: the draft :class:`~ember.models.Transformer` (method "draft").
        adaptive: adapt k to the measured acceptance and switch off when it does not pay.
        max_ngram: the longest n-gram prompt lookup matches.
    """

    method: str
    num_speculative: int | None = None
    draft: object | None = field(default=None, repr=False)
    adaptive: bool = True
    max_ngram: int = 4
    target: object | None = field(default=None, repr=False)  # method "mtp": the model whose head proposes
    mtp_head: object | None = field(default=None, repr=False)  # and that head (check_target loads it)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GenerationError(f"unknown speculation method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.num_speculative is None:
            self.num_speculative = DEFAULT_NUM_SPECULATIVE[self.method]
        if not isinstance(self.num_speculative, int) or self.num_speculative < 1:
            raise GenerationError(f"--num-speculative must be an integer >= 1, got {self.num_speculative!r}")
        if self.method == "draft" and self.draft is None:
            raise GenerationError("speculation by draft model needs a draft model (--draft MODEL)")

    def proposer(self, params: SamplingParams, max_len: int, generator: torch.Generator) -> Proposer:
        """A fresh proposer for one sequence of at most ``max_len`` tokens."""
        if self.method == "ngram":
            return NgramProposer(self.max_ngram)
        if self.method == "draft":
            return DraftProposer(self.draft, params, max_len + self.num_speculative + 1, generator)
        if self.mtp_head is None:
            raise GenerationError("MTP speculation needs its head loaded first (check_target)")
        return MTPProposer(self.target, self.mtp_head, params, max_len + self.num_speculative + 1, generator)

    def before_prefill(self, model) -> None:
        """Called before the prompt's forward of a generation that will speculate: the MTP head reads every
        position's hidden state, the prompt's included."""
        if self.method == "mtp":
            model.hidden_tap = HiddenTap()


def check_target(model, config: SpeculativeConfig) -> None:
    """Refuse a target/draft pair that cannot speculate, with what to do.

    Raises:
        GenerationError: a target without an MTP head for ``mtp``, or a draft whose vocabulary differs.
    """
    if config.method == "mtp":
        head = check_mtp_target(model)
        config.target, config.mtp_head = model, head
    if config.draft is not None:
        dv, tv = config.draft.config.vocab_size, model.config.vocab_size
        if dv != tv:
            raise GenerationError(f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}); "
                                  "a draft must share the target's tokenizer")


def supports(params: SamplingParams) -> bool:
    """Whether speculation applies under these settings: history penalties change each place's distribution
    with the tokens before it, which the one-pass verification does not model, so they decode plainly."""
    return params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty


class SpeculativeDecoder:
    """Generates tokens for one sequence whose prompt is already in ``cache`` (a static cache of batch 1).

    Args:
        model: the target :class:`~ember.models.Transformer`.
        cache: its :class:`~ember.cache.StaticKVCache`, filled with the prompt (``cache.pos == len(prompt)``).
        config: the engine's :class:`SpeculativeConfig`.
        params: the sampling settings (see :func:`supports`).
        sampler: the engine's sampler (batch 1): plain steps draw with it, so a greedy run is the plain run.
        prompt: the prompt's token ids.
        max_new: tokens to generate at most.
    """

    def __init__(self, model, cache, config: SpeculativeConfig, params: SamplingParams, sampler: Sampler,
                 prompt: list[int], max_new: int) -> None:
        self.model, self.cache, self.config, self.params, self.sampler = model, cache, config, params, sampler
        self.ids = list(prompt)
        self.max_new = max_new
        self.generator = torch.Generator(device="cpu").manual_seed(
            params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.proposer = config.proposer(params, len(prompt) + max_new, self.generator)
        self.control = AdaptiveK(config.num_speculative, config.adaptive)
        self.counters = SpeculationCounters()
        self.session = object()
        p = model.model.norm.weight
        self.device = p.device
        self.replay = needs_replay(cache)
        # a proposer fed the target's hidden states (MTP): the prompt's come from the prefill (before_prefill)
        self.observe = getattr(self.proposer, "observe", None)
        self.tap = getattr(model, "hidden_tap", None) if self.observe is not None else None
        if self.observe is not None:
            if self.tap is None or self.tap.last is None:
                raise GenerationError("MTP speculation needs the prompt's hidden states: call "
                                      "SpeculativeConfig.before_prefill(model) before the prefill")
            self._observe(0)

    def _observe(self, start: int) -> None:
        """Hand the proposer the target's normed hidden states of the forward that just ran from ``start``."""
        self.observe(start, self.model.model.norm(self.tap.last[0]))

    def _target(self, toks: list[int], last_only: bool) -> torch.Tensor:
        x = torch.tensor([toks], dtype=torch.long, device=self.device)
        start = self.cache.pos
        logits = self.model(x, None, self.cache, start, None, last_only=last_only, session=self.session)
        self.cache.advance(len(toks))
        if self.tap is not None:
            self._observe(start)
        return logits[0].float()  # (T or 1, V)

    @torch.inference_mode()
    def tokens(self, first_logits: torch.Tensor) -> Iterator[int]:
        """Every generated token in order, the first sampled from ``first_logits`` (1, V) (the prefill's)."""
        try:
            yield from self._tokens(first_logits)
        finally:
            if self.tap is not None and self.model.hidden_tap is self.tap:
                self.model.hidden_tap = None

    def _tokens(self, first_logits: torch.Tensor) -> Iterator[int]:
        tok = int(self.sampler.sample(first_logits.float())[0])
        self.ids.append(tok)
        yield tok
        made = 1
        c = self.counters
        while made < self.max_new:
            k = min(self.control.choose(), self.max_new - made - 1)
            t0 = time.perf_counter()
            proposal, q = self.proposer.propose(self.ids, k) if k > 0 else ([], None)
            t1 = time.perf_counter()
            if not proposal:
                logits = self._target([tok], last_only=True)
                tok = int(self.sampler.sample(logits)[0])
                self.control.record_plain(time.perf_counter() - t1)
                out = [tok]
            else:
                k = len(proposal)
                snap = Snapshot.take(self.cache) if self.replay else None
                logits = self._target([tok] + proposal, last_only=False)  # (k + 1, V)
                if self.params.greedy:
                    out = accept_greedy(logits.argmax(-1).tolist(), proposal)
                else:
                    out = accept_sampled(self._probs(logits), proposal, q, self.generator)
                kept = len(out) - 1
                if snap is not None and kept < k:  # states/rings hold the rejected ones: back, then the kept again
                    snap.restore(self.cache)
                    self._target([tok] + proposal[:kept], last_only=True)
                else:
                    self.cache.pos -= k - kept  # forget the rejected proposals' keys/values
                self.control.record_pass(k, kept, t1 - t0, time.perf_counter() - t1)
                c.proposed += k
                c.accepted += kept
            c.passes += 1
            c.tokens += len(out)
            for t in out:
                self.ids.append(t)
                made += 1
                yield t
            tok = out[-1]

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, V) target probabilities after the warpers, each row as the engine's sampler would draw it."""
        rows = [self.sampler.process_logits(logits[i:i + 1], None) for i in range(logits.shape[0])]
        return torch.cat(rows).softmax(-1)
