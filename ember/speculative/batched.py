"""Speculation inside continuous batching: each running sequence proposes its own tokens, and every sequence's
proposals are verified in the scheduler's one decode forward (rows of different lengths, left-padded), whose
products run the few-row kernel that generate's verification runs (:meth:`BatchSpeculator.verifying`).

Only plain greedy sequences speculate (no logit bias, constraint or logprobs, which the scheduler applies per
emitted token); the others ride in the same forward with one row each. Each sequence has its own proposer and
:class:`~ember.speculative.adaptive.AdaptiveK`, fed with the shared forward's time, so a sequence whose
proposals keep failing stops proposing while its batch mates go on. A rejected proposal's keys/values stay in
the sequence's blocks until the next pass overwrites them (the scheduler moves its ``computed`` back).
"""

from __future__ import annotations

import time

import torch

from ember.runtime.ops import exact_rows
from ember.sampling import SamplingParams
from ember.speculative.adaptive import AdaptiveK, SpeculationCounters
from ember.speculative.decoding import SpeculativeConfig
from ember.speculative.proposers import Proposer
from ember.speculative.verify import accept_greedy


class SequenceSpeculation:
    """One sequence's proposer, controller and counters."""

    def __init__(self, config: SpeculativeConfig, params: SamplingParams, max_len: int) -> None:
        self.proposer: Proposer = config.proposer(params, max_len, torch.Generator().manual_seed(0))
        self.control = AdaptiveK(config.num_speculative, config.adaptive)
        self.counters = SpeculationCounters()
        self.k = 0
        self.propose_s = 0.0


class BatchSpeculator:
    """The scheduler's side of speculation: proposals before its decode forward, verification after it."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.counters = SpeculationCounters()  # summed over every sequence served

    @staticmethod
    def verifying():
        """The context of the verification forward: every row's products through ``ember_linear_rows`` (one
        weight stream for all sequences' rows, each row rounded as the one-token step rounds it)."""
        return exact_rows()

    def start(self, params: SamplingParams, max_len: int) -> SequenceSpeculation:
        """State for one new sequence of at most ``max_len`` tokens."""
        return SequenceSpeculation(self.config, params, max_len)

    def propose(self, spec: SequenceSpeculation, ids: list[int], budget: int) -> list[int]:
        """Proposals to follow ``ids`` (at most ``budget``), or [] for a plain row this step."""
        k = min(spec.control.choose(), budget)
        t0 = time.perf_counter()
        proposal = spec.proposer.propose(ids, k)[0] if k > 0 else []
        spec.propose_s = time.perf_counter() - t0
        spec.k = len(proposal)
        return proposal

    def verify(self, spec: SequenceSpeculation, logits: torch.Tensor, proposal: list[int], forward_s: float) -> list[int]:
        """The tokens this row emits from its ``len(proposal) + 1`` logits (greedy), recording the outcome."""
        c, total = spec.counters, self.counters
        if not proposal:
            spec.control.record_plain(forward_s)
            out = [int(logits[-1].argmax())]
        else:
            out = accept_greedy(logits.argmax(-1).tolist(), proposal)
            kept = len(out) - 1
            spec.control.record_pass(len(proposal), kept, spec.propose_s, forward_s)
            for x in (c, total):
                x.proposed += len(proposal)
                x.accepted += kept
        for x in (c, total):
            x.passes += 1
            x.tokens += len(out)
        return out
