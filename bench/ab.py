"""A/B decode comparison of two checkouts of Ember, in interleaved rounds.

A change that should not move speed (a refactor, a new code path beside the fast one) is checked by running
``bench/decode.py`` from the old checkout and from the new one, alternately, in the same minutes: a shared
machine's memory bandwidth drifts within minutes, so two benchmark runs taken apart compare the machine's
moods as much as the code. Each round runs both sides once (the side that goes first alternates); the table
gives each row's median decode tok/s per side over the rounds and the new/old ratio of the medians.

    python bench/ab.py OLD_DIR NEW_DIR                       # bf16, int4 and the MoE row, 1.1B dims, 3 rounds
    python bench/ab.py OLD_DIR NEW_DIR --rounds 5 --size small
    python bench/ab.py OLD_DIR NEW_DIR --families            # the families' rows (DeepSeek-MLA among them)

OLD_DIR and NEW_DIR are checkouts (e.g. ``git worktree add /tmp/old <commit>``); each runs with its own
``bench/decode.py`` and its own ``ember`` package first on ``sys.path``. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path


def run_side(checkout: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One ``bench/decode.py`` run in ``checkout``; returns {row label: decode tok/s}."""
    cmd = [sys.executable, "bench/decode.py", "--size", args.size, "--dtypes", "bf16", "--quant", args.quant,
           "--no-hf", "--no-ppl", "--repeats", str(args.repeats), "--out", str(out)]
    if args.families:  # the families' rows instead (Gemma 3/4 shapes, DeepSeek-MLA, gpt-oss)
        cmd.append("--only-families")
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/decode.py failed in {checkout}:\n{proc.stderr[-4000:]}")
    rows = json.loads(out.read_text())["rows"]
    return {f"{r['model']} {r['weights']}": r["decode_tok_s"] for r in rows if r.get("engine") == "ember"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds inside each decode.py run (best kept)")
    ap.add_argument("--size", default="1.1b", choices=["1.1b", "small"])
    ap.add_argument("--quant", default="none,int4", help="decode.py --quant (the bf16 row and these)")
    ap.add_argument("--families", action="store_true", help="the families' rows (decode.py --only-families) instead")
    ap.add_argument("--out", default="bench/results/ab.json")
    args = ap.parse_args()
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    rates: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory(prefix="ember-ab-") as tmp:
        for i in range(args.rounds):
            order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
            for side in order:
                got = run_side(sides[side], args, Path(tmp) / f"{side}-{i}.json")
                for row, rate in got.items():
                    rates[side].setdefault(row, []).append(rate)
                print(f"round {i + 1} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), file=sys.stderr)
    rows = []
    print(f"\n| row | old tok/s (median of {args.rounds}) | new tok/s | new / old |")
    print("|---|---|---|---|")
    for row in rates["old"]:
        if row not in rates["new"]:
            continue
        old, new = statistics.median(rates["old"][row]), statistics.median(rates["new"][row])
        rows.append({"row": row, "old_tok_s": rates["old"][row], "new_tok_s": rates["new"][row],
                     "old_median": old, "new_median": new, "ratio": new / old})
        print(f"| {row} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                               "old": str(sides["old"]), "new": str(sides["new"]), "size": args.size,
                               "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
