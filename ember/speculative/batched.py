"""Speculation inside continuous batching: each running sequence proposes its own tokens, and every sequence's
proposals are verified in the scheduler's one decode forward (rows of different lengths, left-padded), whose
products run the few-row kernel that generate's verification runs (:meth:`BatchSpeculator.verifying`).

Only plain greedy sequences speculate (no logit bias, constraint or logprobs, which the scheduler applies per
emitted token); the others ride in the same forward with one row each. Each sequence has its own proposer and
:class:`~ember.speculative.batch_control.SequenceAcceptance`; one
:class:`~ember.speculative.batch_control.BatchAdaptiveK` times the shared forward (plain and with proposal rows) and
picks every sequence's ``k`` for the batch's tokens per second, so a sequence whose proposals keep failing stops
proposing while its batch mates go on, and the whole batch decodes plainly where proposal rows do not pay. A
rejected proposal's keys/values stay in the sequence's blocks until the next pass overwrites them (the scheduler
moves its ``computed`` back).

An MTP head (``--speculate mtp``) reads the main model's hidden state at every position: each forward of the
scheduler (prefill chunks, plain rows, verification passes) runs under :meth:`BatchSpeculator.forward`, which
taps the last layer's output of the whole batch and hands every MTP sequence its own rows (its columns of the
left-padded batch). Each such sequence has its own head cache (a one-layer static cache of the sequence's
length, beside the paged cache) and hidden-state buffer, dropped with the sequence. Its prompt is computed, not
taken from the prefix cache: a cached block holds keys/values but not the hidden states the head needs.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from ember.runtime.ops import exact_rows
from ember.sampling import SamplingParams
from ember.speculative.adaptive import SpeculationCounters
from ember.speculative.batch_control import BatchAdaptiveK, SequenceAcceptance
from ember.speculative.decoding import SpeculativeConfig
from ember.speculative.mtp import HiddenTap
from ember.speculative.proposers import Proposer
from ember.speculative.verify import accept_greedy


class SequenceSpeculation:
    """One sequence's proposer, acceptance estimate and counters."""

    def __init__(self, config: SpeculativeConfig, params: SamplingParams, max_len: int) -> None:
        self.proposer: Proposer = config.proposer(params, max_len, torch.Generator().manual_seed(0))
        self.accept = SequenceAcceptance()
        self.counters = SpeculationCounters()
        self.k = 0
        self.propose_s = 0.0

    @property
    def reads_states(self) -> bool:
        """Whether the proposer is fed the main model's hidden states (an MTP head): every position of the
        sequence must then be computed by the model, none taken from the prefix cache."""
        return hasattr(self.proposer, "observe")


class BatchSpeculator:
    """The scheduler's side of speculation: proposals before its decode forward, verification after it."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.counters = SpeculationCounters()  # summed over every sequence served
        self.control = BatchAdaptiveK(config.num_speculative, config.adaptive)

    @staticmethod
    def verifying(news: list[int]):
        """The context of the decode forward feeding ``news[i]`` tokens of sequence i: where some row has more than
        one (proposals, or kept tokens a rolled-back state runs again), every row's products through
        ``ember_linear_rows`` (one weight stream for all sequences' rows, each row rounded as the one-token step
        rounds it); otherwise plain serving's own step."""
        return exact_rows() if any(n > 1 for n in news) else contextlib.nullcontext()

    def forward(self, model, seqs: list, news: list[int], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` (the scheduler's forward over ``seqs``, ``news[i]`` new tokens each, right-aligned in the
        batch) with the last layer's output handed, normed, to every sequence whose proposer reads it: rows
        ``T - news[i] ..`` of batch row i are its positions ``seqs[i].computed ..`` (not yet advanced)."""
        if self.config.method != "mtp" or not any(s.spec is not None for s in seqs):
            return run()
        model.hidden_tap = tap = HiddenTap()
        try:
            logits = run()
        finally:
            model.hidden_tap = None
        h = tap.last
        T = h.shape[1]
        for i, (s, n) in enumerate(zip(seqs, news)):
            if s.spec is not None:
                s.spec.proposer.observe(s.computed, model.model.norm(h[i, T - n:]))
        return logits

    def start(self, params: SamplingParams, max_len: int) -> SequenceSpeculation:
        """State for one new sequence of at most ``max_len`` tokens."""
        return SequenceSpeculation(self.config, params, max_len)

    def propose(self, seqs: list) -> list[list[int]]:
        """Each running sequence's proposals for the batch's next decode forward ([] for a plain row), at most
        its tokens left but one."""
        specs = [s.spec for s in seqs]
        ks, _ = self.control.plan([None if sp is None else sp.accept.rate for sp in specs],
                                  [s.max_new - s.generated - 1 for s in seqs])
        out = []
        for s, sp, k in zip(seqs, specs, ks):
            t0 = time.perf_counter()
            proposal = sp.proposer.propose(s.ids, k)[0] if k > 0 else []
            if sp is not None:
                sp.propose_s, sp.k = time.perf_counter() - t0, len(proposal)
            out.append(proposal)
        return out

    def record(self, seqs: list, proposals: list[list[int]], forward_s: float) -> None:
        """The decode forward over ``seqs`` with ``proposals`` took ``forward_s`` seconds."""
        self.control.record(len(seqs), [len(p) for p in proposals], forward_s,
                            sum(s.spec.propose_s for s, p in zip(seqs, proposals) if p))

    @staticmethod
    def prepare(seqs: list, proposals: list[list[int]], states) -> tuple[list[int], dict[int, list[torch.Tensor]]]:
        """What the verification forward feeds each sequence (its pending tokens: the last one, plus the kept
        ones a rolled-back recurrent state runs again; then its proposals), and copies of the recurrent states
        (``states``: the paged cache's :class:`~ember.cache.RecurrentStateSlots`, or None) of every sequence that
        proposes, by slot, for :meth:`rewind`."""
        news = [len(s.ids) - s.computed + len(p) for s, p in zip(seqs, proposals)]
        if states is None:
            return news, {}
        return news, {s.state_slot: states.save(s.state_slot) for s, p in zip(seqs, proposals) if p}

    @staticmethod
    def rewind(s, fed: int, proposed: int, kept: int, states, saved: dict[int, list[torch.Tensor]]) -> None:
        """Forget what a verification pass that fed ``fed`` tokens of sequence ``s`` (its pending tokens, then
        ``proposed`` proposals, of which it kept ``kept``) must not keep. Attention slots of rejected proposals
        are rewritten by the next pass, so ``s.computed`` just stops short of them; a recurrent layer has folded
        them into its state, so the state goes back to where the pass started and the next pass runs the kept
        tokens again (the state then holds exactly what plain decoding of the emitted tokens would)."""
        if kept < proposed and s.state_slot in saved:
            states.load(s.state_slot, saved[s.state_slot])
            s.computed -= fed
        else:
            s.computed -= proposed - kept

    def verify(self, spec: SequenceSpeculation, logits: torch.Tensor, proposal: list[int]) -> list[int]:
        """The tokens this row emits from its ``len(proposal) + 1`` logits (greedy), recording the outcome."""
        c, total = spec.counters, self.counters
        if not proposal:
            out = [int(logits[-1].argmax())]
        else:
            out = accept_greedy(logits.argmax(-1).tolist(), proposal)
            kept = len(out) - 1
            spec.accept.record(len(proposal), kept)
            for x in (c, total):
                x.proposed += len(proposal)
                x.accepted += kept
        for x in (c, total):
            x.passes += 1
            x.tokens += len(out)
        return out
