"""How many tokens to propose: a running estimate of acceptance and of what passes cost, and a switch-off.

One verification pass over ``k`` proposals emits ``E(a, k) = (1 - a^(k+1)) / (1 - a)`` tokens on average when each
proposal is kept with probability ``a`` (independently: the usual model). It costs the proposer's ``k`` steps
plus a target pass over ``k + 1`` rows; a plain step emits one token for one target pass over one row. The
controller measures those times as it goes (moving averages), picks the ``k`` with the best expected tokens per
second, and when even that is not faster than plain decoding it stops proposing for a while (doubling the wait
after each failed probe, up to ``max_backoff`` plain steps), so a prompt where proposals rarely hit costs a probe
now and then, not a slower run.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens one pass over ``k`` proposals emits when each is kept with probability ``a``."""
    a = min(max(a, 0.0), 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class SpeculationCounters:
    """What speculation did in one generation (summed): the figures of the summary line."""

    proposed: int = 0       # proposed tokens that were checked
    accepted: int = 0       # of those, kept
    passes: int = 0         # target weight passes after prefill (plain steps and verification passes)
    tokens: int = 0         # tokens those passes emitted

    @property
    def acceptance(self) -> float:
        """Kept / proposed (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per target weight pass (1.0 for plain decoding)."""
        return self.tokens / self.passes if self.passes else 0.0


class AdaptiveK:
    """Chooses the number of proposals for the next pass from measured acceptance and timings.

    Args:
        k_max: the most proposals per pass (``--num-speculative``).
        adaptive: False keeps ``k_max`` always (tests, benchmarks of a fixed k).
        max_backoff: the most plain steps between probes while speculation is off.
        decay: weight of the past in the moving averages (per pass).
    """

    def __init__(self, k_max: int, adaptive: bool = True, max_backoff: int = 128, decay: float = 0.9) -> None:
        if k_max < 1:
            raise ValueError(f"the number of speculative tokens must be >= 1, got {k_max}")
        self.k_max, self.adaptive, self.max_backoff, self.decay = k_max, adaptive, max_backoff, decay
        self.kept, self.missed = 1.5, 0.5   # acceptance prior 0.75, as a few observations' worth
        self.t_plain: float | None = None  # seconds per plain step
        self.t_row: float | None = None    # extra seconds per extra row of a verification pass
        self.t_propose: float | None = None  # seconds per proposed token
        self.off = 0          # plain steps left before the next probe
        self.backoff = 4      # plain steps the next switch-off lasts
        self.plain_seen = 0
        self.probe_due = False

    @property
    def acceptance(self) -> float:
        """The running estimate of the chance that a proposal is kept."""
        return self.kept / (self.kept + self.missed)

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def speedup(self, k: int) -> float:
        """Expected tokens per second of a pass over ``k`` proposals, relative to plain steps (1.0 = as fast)."""
        if self.t_plain is None or k < 1:
            return 1.0
        cost = self.t_plain + k * ((self.t_row or 0.0) + (self.t_propose or 0.0))
        return expected_tokens(self.acceptance, k) * self.t_plain / cost

    def choose(self) -> int:
        """Proposals for the next pass; 0 means a plain step."""
        if not self.adaptive:
            return self.k_max
        if self.plain_seen < 2:  # measure plain steps first (the first one also warms up)
            return 0
        if self.off > 0:
            self.off -= 1
            return 0
        best = max(range(1, self.k_max + 1), key=self.speedup)
        if self.t_row is not None and self.speedup(best) < 1.0 and not self.probe_due:
            self.off = self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self.probe_due = True  # the estimates do not move while off: the pass after the wait is a probe
            return 0
        self.probe_due = False
        return best

    def record_plain(self, seconds: float) -> None:
        """A plain step took ``seconds``."""
        self.plain_seen += 1
        if self.plain_seen > 1:  # the first plain step pays one-time costs
            self.t_plain = self._avg(self.t_plain, seconds)

    def record_pass(self, k: int, accepted: int, propose_s: float, verify_s: float) -> None:
        """A pass over ``k`` proposals kept ``accepted`` of them; proposing took ``propose_s``, verifying
        ``verify_s`` seconds."""
        if k < 1:
            return
        d = self.decay
        self.kept = d * self.kept + accepted
        self.missed = d * self.missed + (1 if accepted < k else 0)
        self.t_propose = self._avg(self.t_propose, propose_s / k)
        if self.t_plain is not None:
            self.t_row = self._avg(self.t_row, max(verify_s - self.t_plain, 0.0) / k)
        if self.speedup(k) >= 1.0:
            self.backoff = 4
