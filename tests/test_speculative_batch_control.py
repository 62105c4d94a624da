"""The served batch's speculation controller (ember/speculative/batch_control.py) with injected costs and
acceptances: no timing, every decision follows from the figures fed in."""

import pytest

from ember.speculative.adaptive import expected_tokens
from ember.speculative.batch_control import BatchAdaptiveK, SequenceAcceptance


def _warm(c: BatchAdaptiveK, B: int, t_plain: float, t_row: float | None = None, t_prop: float = 0.0) -> None:
    """Feed the controller a warm-up forward, plain steps of ``t_plain`` and (optionally) one verification step
    whose rows cost ``t_row`` each, proposing ``t_prop`` per token."""
    if c.steps == 0:
        c.record(B, [0] * B, 10 * t_plain, 0.0)  # the first forward's one-time costs are not kept
    for _ in range(3):
        c.record(B, [0] * B, t_plain, 0.0)
    if t_row is not None:
        c.record(B, [2] * B, t_plain + 2 * B * t_row, 2 * B * t_prop)


def _rate(accs, ks, t_plain, c):
    return sum(expected_tokens(a, k) if k else 1.0 for a, k in zip(accs, ks)) / (t_plain + c * sum(ks))


def test_measures_plain_step_per_batch_size_before_speculating():
    c = BatchAdaptiveK(4)
    assert c.plan([0.9] * 4, [50] * 4)[0] == [0] * 4  # nothing timed yet
    _warm(c, 4, 0.020)
    assert c.t_plain == {4: pytest.approx(0.020)}
    assert c.plan([0.9] * 3, [50] * 3)[0] == [0] * 3  # a batch of 3 has not been timed: plain first
    assert sum(c.plan([0.9] * 4, [50] * 4)[0]) > 0    # the first speculative step measures a row


def test_costly_rows_turn_the_batch_off_and_probe_with_backoff():
    # 4 streams, a row costs 40% of the whole plain step: at acceptance 0.4 no k pays
    c = BatchAdaptiveK(4)
    _warm(c, 4, 0.020, t_row=0.008)
    accs = [0.4] * 4
    plans = [c.plan(accs, [50] * 4)[0] for _ in range(4 + 8 + 2)]
    spec_steps = [i for i, ks in enumerate(plans) if sum(ks)]
    # off for 4 steps, a probe of one token per sequence, off for 8, another probe
    assert spec_steps == [4, 13]
    assert plans[4] == [1, 1, 1, 1]
    assert c.backoff == 16
    for _ in range(200):  # the wait doubles up to its bound
        c.plan(accs, [50] * 4)
    assert c.backoff == c.max_backoff


def test_cheap_rows_and_high_acceptance_speculate_with_the_best_ratio():
    c = BatchAdaptiveK(6)
    t_plain, t_row = 0.020, 0.0005
    _warm(c, 4, t_plain, t_row=t_row)
    accs = [0.9, 0.9, 0.2, None]  # the last sequence samples: never proposes
    ks, gain = c.plan(accs, [50] * 4)
    assert ks[3] == 0 and ks[0] == ks[1] > ks[2]
    best = _rate(accs, ks, t_plain, c.t_row)
    # no other choice of k for the two good sequences beats the controller's (the ratio's optimum)
    for k in range(7):
        for k2 in range(3):
            assert _rate(accs, [k, k, k2, 0], t_plain, c.t_row) <= best + 1e-9
    assert gain == pytest.approx(best / (4 / t_plain))
    assert gain > 1.5


def test_budget_and_fixed_k():
    c = BatchAdaptiveK(4)
    _warm(c, 2, 0.020, t_row=0.0001)
    assert c.plan([0.95, 0.95], [2, 0])[0] == [2, 0]  # never past a sequence's tokens left
    fixed = BatchAdaptiveK(3, adaptive=False)
    assert fixed.plan([0.0, None, 0.5], [9, 9, 1])[0] == [3, 0, 1]


def test_gain_returns_after_a_probe_finds_acceptance():
    c = BatchAdaptiveK(4)
    _warm(c, 4, 0.020, t_row=0.002)
    low = [SequenceAcceptance() for _ in range(4)]
    for a in low:
        for _ in range(30):
            a.record(4, 0)
    assert all(a.rate < 0.05 for a in low)
    assert c.plan([a.rate for a in low], [50] * 4)[0] == [0] * 4  # switched off
    for a in low:  # the text turned repetitive: every proposal kept from now on
        for _ in range(30):
            a.record(4, 4)
    plans = [c.plan([a.rate for a in low], [50] * 4)[0] for _ in range(5)]
    assert plans[:3] == [[0] * 4] * 3  # the rest of the wait (the estimates do not move while off)
    assert all(k > 1 for k in plans[3]) and c.backoff == 4  # it pays again: speculation back on


def test_row_cost_is_measured_against_the_same_batch_size():
    c = BatchAdaptiveK(4)
    _warm(c, 4, 0.020)
    _warm(c, 2, 0.012)
    c.record(2, [3, 1], 0.012 + 4 * 0.001, 4 * 0.0002)
    assert c.t_row == pytest.approx(0.001)
    assert c.t_propose == pytest.approx(0.0002)


def test_a_costly_probe_waits_longer():
    # a probe of 4 rows costing one whole plain step: the wait keeps probing under 2% of the plain time
    c = BatchAdaptiveK(4)
    _warm(c, 4, 0.020)
    assert c.plan([0.1] * 4, [50] * 4)[0] == [1] * 4  # the first speculative step probes (no row timed yet)
    c.record(4, [1] * 4, 0.040, 0.0)
    assert c.probe_extra == pytest.approx(0.020)
    plans = [c.plan([0.1] * 4, [50] * 4)[0] for _ in range(51)]
    assert [i for i, ks in enumerate(plans) if sum(ks)] == [50]  # 0.020 / (0.02 * 0.020) = 50 plain steps
