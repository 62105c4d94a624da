"""How many tokens each sequence of a served batch proposes: one controller for the whole batch's forward.

In ``serve`` every sequence's proposals are verified in the scheduler's one decode forward, so what a proposal
costs is the batch's cost, not the sequence's: a plain step over ``B`` sequences runs ``B`` rows, and each
proposal adds a row (on a CPU, with the weights already streamed for ``B`` rows, an extra row is mostly its
own products) plus the proposer's work for it. The controller measures, as moving averages,

* ``t_plain[B]``: seconds of a plain forward over ``B`` sequences (one per batch size seen),
* ``t_row``: the extra seconds per proposal row of a verification forward over a plain one of the same batch,
* ``t_propose``: the proposer's seconds per proposed token (summed over the batch's sequences),

and each sequence's acceptance ``a_i``. A step where sequence ``i`` proposes ``k_i`` emits on average
``sum_i E(a_i, k_i)`` tokens (``E`` of :func:`~ember.speculative.adaptive.expected_tokens`; 1 for ``k_i = 0``) in
``t_plain[B] + (t_row + t_propose) * sum_i k_i`` seconds. The ``k_i`` that maximise that ratio come from
Dinkelbach's iteration: at a rate ``r`` (tokens per second) each sequence takes the ``k`` maximising
``E(a_i, k) - r * c * k`` with ``c = t_row + t_propose``, and ``r`` becomes the step's ratio, starting from the
plain rate ``B / t_plain[B]`` (so a sequence proposes only where its gain beats what the rows cost at the
plain rate). When no sequence would gain, or the best step is expected to be under ``min_gain`` times the
plain rate, the batch runs plain steps for a while, then probes: one step where every speculating sequence
proposes at least one token, which re-measures acceptance and the row cost (the batch's first speculative
step is such a probe, of one token per sequence). The wait is 4 steps, doubling after
each probe that did not pay up to ``max_backoff``, and never shorter than what keeps a probe's measured extra
time under ``probe_share`` of the plain steps' time between probes.
"""

from __future__ import annotations

import math

from ember.speculative.adaptive import expected_tokens


class SequenceAcceptance:
    """One sequence's running estimate of the chance that a proposal is kept (prior 0.5, two passes' worth)."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.kept, self.missed = decay, 1.0, 1.0

    @property
    def rate(self) -> float:
        """Kept proposals over kept + first rejections (the per-proposal keep probability)."""
        return self.kept / (self.kept + self.missed)

    def record(self, k: int, accepted: int) -> None:
        """A pass over ``k`` proposals kept ``accepted`` of them."""
        if k > 0:
            self.kept = self.decay * self.kept + accepted
            self.missed = self.decay * self.missed + (1 if accepted < k else 0)


class BatchAdaptiveK:
    """Chooses every sequence's proposal count for the batch's next decode forward from measured costs.

    Args:
        k_max: the most proposals per sequence and step (``--num-speculative``).
        adaptive: False: every speculating sequence proposes ``k_max`` (tests, fixed-k benchmarks).
        max_backoff: the most plain steps between probes while speculation is off.
        decay: weight of the past in the moving averages (per step).
        min_gain: the expected speed-up over plain steps a speculative step must promise.
    """

    def __init__(self, k_max: int, adaptive: bool = True, max_backoff: int = 128, decay: float = 0.9,
                 min_gain: float = 1.05, probe_share: float = 0.02) -> None:
        if k_max < 1:
            raise ValueError(f"the number of speculative tokens must be >= 1, got {k_max}")
        self.k_max, self.adaptive, self.max_backoff, self.decay = k_max, adaptive, max_backoff, decay
        self.min_gain, self.probe_share = min_gain, probe_share
        self.probe_extra = 0.0    # seconds the last probe cost over a plain step
        self.t_plain: dict[int, float] = {}   # batch size -> seconds per plain forward
        self.t_row: float | None = None       # extra seconds per proposal row
        self.t_propose: float | None = None   # proposer seconds per proposed token
        self.steps = 0            # forwards recorded (the first pays one-time costs and is not kept)
        self.off = 0              # plain steps left before the next probe
        self.backoff = 4          # plain steps the next switch-off lasts
        self.probe_next = False   # the step after a switch-off probes
        self.probing = False      # the step planned last is a probe

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def _ks(self, accs: list[float | None], budgets: list[int], rate: float, c: float) -> list[int]:
        """Each sequence's ``k`` maximising ``E(a, k) - rate * c * k`` (0 for sequences that do not speculate)."""
        out = []
        for a, b in zip(accs, budgets):
            hi = 0 if a is None else min(self.k_max, max(b, 0))
            out.append(max(range(hi + 1), key=lambda k: (expected_tokens(a, k) if k else 1.0) - rate * c * k))
        return out

    def plan(self, accs: list[float | None], budgets: list[int]) -> tuple[list[int], float]:
        """Proposals for each of the batch's sequences (``accs[i]``: its acceptance, None where it does not
        speculate; ``budgets[i]``: the most it may propose), and the expected speed-up over a plain step."""
        B = len(accs)
        if not self.adaptive:
            return [0 if a is None else min(self.k_max, max(b, 0)) for a, b in zip(accs, budgets)], 1.0
        self.probing = False
        t_p = self.t_plain.get(B)
        if t_p is None or all(a is None for a in accs):
            return [0] * B, 1.0  # time this batch size's plain step first
        if self.off > 0:
            self.off -= 1
            return [0] * B, 1.0
        if self.t_row is None:  # the first speculative step is a probe of one proposal per sequence
            self.probing = True
            return [1 if a is not None and b > 0 else 0 for a, b in zip(accs, budgets)], 1.0
        c = self.t_row + (self.t_propose or 0.0)
        plain_rate = rate = B / t_p
        ks = [0] * B
        for _ in range(8):  # Dinkelbach: the ratio rises each round and settles in a few
            new = self._ks(accs, budgets, rate, c)
            tokens = sum(expected_tokens(a, k) if k else 1.0 for a, k in zip(accs, new))
            new_rate = tokens / (t_p + c * sum(new))
            if new == ks or new_rate <= rate:
                break
            ks, rate = new, new_rate
        gain = rate / plain_rate
        if sum(ks) > 0 and gain >= self.min_gain:
            self.backoff, self.probe_next = 4, False
            return ks, gain
        if self.probe_next:
            # a probe: every speculating sequence proposes at least one token, so acceptance and costs move
            self.probe_next, self.probing = False, True
            return [max(k, 1) if a is not None and b > 0 else 0 for k, a, b in zip(ks, accs, budgets)], gain
        # off for ``backoff`` plain steps (this one first), and at least as many as keep the next probe's cost
        # (as the last one's) under ``probe_share`` of the plain time between probes
        wait = max(self.backoff, min(math.ceil(self.probe_extra / (self.probe_share * t_p)), self.max_backoff))
        self.off = wait - 1
        self.backoff, self.probe_next = min(2 * self.backoff, self.max_backoff), True
        return [0] * B, gain

    def record(self, B: int, ks: list[int], forward_s: float, propose_s: float) -> None:
        """A decode forward over ``B`` sequences that proposed ``ks`` took ``forward_s`` seconds, proposing
        ``propose_s`` (summed over the sequences)."""
        self.steps += 1
        if self.steps == 1:  # the first forward pays one-time costs
            return
        n = sum(ks)
        if n == 0:
            self.t_plain[B] = self._avg(self.t_plain.get(B), forward_s)
            return
        self.t_propose = self._avg(self.t_propose, propose_s / n)
        t_p = self.t_plain.get(B)
        if t_p is not None:
            self.t_row = self._avg(self.t_row, max(forward_s - t_p, 0.0) / n)
            if self.probing:
                self.probe_extra = max(forward_s - t_p, 0.0) + propose_s
