"""Where a speculative verification pass spends its time: k + 1 rows vs one row, per weight shape.

For each Linear shape of a decoder layer (q/k/v together, o, gate/up together, down) and the head, ``--layers``
distinct random weights (so the set streams from DRAM, not the last-level cache, as a model's layers do) are
multiplied by one activation row (``ember_linear_many``: the one-token step's call) and by ``--rows`` rows
(``ember_linear_rows``: the verification pass's call). Prints the single-thread CPU time of each (median of
interleaved rounds) and their ratio, per shape and over all shapes weighted as a model of that shape holds them.

    python bench/rows.py                       # the speculative bench's default target, fp32
    python bench/rows.py --dtype bf16 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shapes(hidden: int, inter: int, heads: int, kv: int, vocab: int) -> dict[str, list[tuple[int, int]]]:
    """Each product of a layer (and the head) as the (out, in) shapes that share one call."""
    hd = hidden // heads
    return {"qkv": [(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden)], "o": [(hidden, heads * hd)],
            "gate/up": [(inter, hidden), (inter, hidden)], "down": [(hidden, inter)], "head": [(vocab, hidden)]}


def time_shape(group: list[tuple[int, int]], copies: int, rows: int, dtype: torch.dtype, rounds: int) -> tuple:
    """Median single-thread CPU seconds of one row and of ``rows`` rows through ``copies`` sets of ``group``."""
    from ember.kernels import dense_kernel, linear_many, linear_rows

    sets = [[dense_kernel(torch.randn(o, i).to(dtype) * 0.02) for o, i in group] for _ in range(copies)]
    I = group[0][1]
    x1, xr = torch.randn(1, I).to(dtype), torch.randn(rows, I).to(dtype)
    one, many = [], []
    for _ in range(rounds):
        t0 = time.process_time()
        for ks in sets:
            linear_many(ks, x1)
        one.append(time.process_time() - t0)
        t0 = time.process_time()
        for ks in sets:
            assert linear_rows(ks, xr) is not None
        many.append(time.process_time() - t0)
    return statistics.median(one), statistics.median(many)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args()
    from ember import kernels

    if kernels.load() is None:
        sys.exit("the native kernels did not build: nothing to measure")
    torch.set_num_threads(1)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    total1 = totalr = 0.0
    print(f"{a.dtype}, {a.rows} rows vs 1, single-thread CPU ms (median of {a.rounds} interleaved rounds)")
    print(f"{'product':<10}{'1 row':>10}{f'{a.rows} rows':>10}{'ratio':>8}")
    for name, group in shapes(a.hidden, a.inter, a.heads, a.kv, a.vocab).items():
        copies = 1 if name == "head" else a.layers
        t1, tr = time_shape(group, copies, a.rows, dtype, a.rounds)
        total1, totalr = total1 + t1, totalr + tr
        print(f"{name:<10}{t1 * 1e3:>10.2f}{tr * 1e3:>10.2f}{tr / t1:>7.2f}x")
    print(f"{'all':<10}{total1 * 1e3:>10.2f}{totalr * 1e3:>10.2f}{totalr / total1:>7.2f}x")


if __name__ == "__main__":
    main()
