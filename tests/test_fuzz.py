"""Seeded fuzzing of every reader of untrusted files (bench/fuzz.py, bounded to ~25 s here).

Every case must load or end in a one-line EmberError: never another exception, a hang (> 10 s per
case) or a memory blow-up (> 2 GB). ``python bench/fuzz.py --cases 10000`` is the long run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import fuzz  # noqa: E402


def test_fuzzed_inputs_load_or_fail_with_one_line_ember_errors():
    result = fuzz.fuzz(cases=100_000, seed=0, time_limit=25.0, case_timeout=10.0, max_rss_gb=2.0)
    counts = result["counts"]
    assert result["cases"] >= 4 * 20, result  # every kind ran a fair number of cases
    assert all(sum(c.values()) >= 20 for c in result["by_kind"].values()), result["by_kind"]
    bad = {k: counts[k] for k in ("multiline", "other", "hang", "memory") if counts[k]}
    assert not bad, (bad, result["failures"][:5])
    assert counts["loaded"] > 0 and counts["clean"] > 0  # the mutations reach both ends
