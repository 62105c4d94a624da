"""Quantized Linear kernels: weight bytes streamed per second, per format, vs the bf16 path and the roofline.

Decode multiplies one activation row by every weight, so a layer's speed is (bytes it stores) /
(time per call). For each format this times ``module(x)`` on a (5632, 2048) weight (TinyLlama's MLP
shape), two ways:

* cold: the call rotates over enough copies that their stored bytes exceed ``--cold-gib`` (default
  1.5 GiB), so every byte comes from DRAM as in real decode;
* hot: one matrix over and over (cache-resident; an upper bound).

The roofline is the best measured streaming-read rate of this machine (max of a cold bf16 ``torch.mv``
sweep and a large ``sum``); "% roofline" = achieved weight GB/s / that. A batch sweep (activation rows
1..128) compares each fused kernel with dequantize-then-matmul, which is how the kernel/fallback
thresholds in ember.quant were chosen. Timings interleave the candidates and keep the best round
(the machine may be shared). Prints tables; writes JSON.

    python bench/quant.py                  # all formats, cold + hot + batch sweep
    python bench/quant.py --skip-batch     # GEMV tables only
    python bench/quant.py --skip-batch --formats bf16,int4g32,int8,gguf-q4_0,gguf-q4_k,gguf-q6_k,gguf-q8_0,gguf-mxfp4
                                           # GGUF block kernels (GGUFLinear) beside Ember's own
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember import kernels  # noqa: E402
import ember.runtime  # noqa: E402,F401  (the CPU kernels behind Linear)
from ember.models import Linear  # noqa: E402
from ember.quant import Int4Linear, Int8Linear, NF4Linear  # noqa: E402


def stored_bytes(m: torch.nn.Module) -> int:
    if isinstance(m, (Int8Linear, Int4Linear, NF4Linear)):
        return m.weight_bytes()
    if hasattr(m, "qweight"):  # GGUFLinear: the blocks as stored
        return m.qweight.numel()
    return m.weight.numel() * m.weight.element_size()


def best_time(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Interleaved timing: for each round call every fn ``inner`` times; keep each fn's best round."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / inner)
    return best


def measure_read_bandwidth(cold_gib: float, rounds: int) -> dict[str, float]:
    """Streaming-read bytes/s: a cold bf16 torch.mv sweep and a large fp32 sum."""
    n, k = 5632, 2048
    count = max(1, int(cold_gib * 2**30 / (n * k * 2)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(count)]
    x = torch.randn(k, dtype=torch.bfloat16)
    big = torch.ones(int(cold_gib * 2**30) // 4)

    def sweep():
        for w in ws:
            torch.mv(w, x)

    t = best_time({"mv": sweep, "sum": big.sum}, rounds, 1)
    out = {"bf16_mv": count * n * k * 2 / t["mv"], "fp32_sum": big.numel() * 4 / t["sum"]}
    del ws, big
    return out


def build(fmt: str, w: torch.Tensor) -> torch.nn.Module:
    lin = Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    if fmt == "bf16":
        return lin
    if fmt == "int8":
        return Int8Linear.from_linear(lin)
    if fmt.startswith("int4"):
        return Int4Linear.from_linear(lin, int(fmt.split("g")[1]))
    if fmt == "nf4":
        return NF4Linear.from_linear(lin)
    if fmt.startswith("gguf-"):  # the ggml blocks of the same weight, kept as stored (GGUFLinear)
        import gguf

        from ember.loading.gguf.kquants import quantize_k
        from ember.quant.gguf_linear import GGUFLinear

        qtype = gguf.GGMLQuantizationType[fmt[5:].upper()]
        x = w.float().numpy()
        raw = quantize_k(x, qtype.name) if qtype.name in ("Q4_K", "Q5_K", "Q6_K") else gguf.quants.quantize(x, qtype)
        return GGUFLinear(torch.from_numpy(raw), qtype, None, w.dtype)
    raise ValueError(fmt)


def gemv_table(formats: list[str], cold_gib: float, rounds: int, bw: float) -> list[dict]:
    n, k = 5632, 2048
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    rows = []
    for fmt in formats:
        m = build(fmt, w)
        nbytes = stored_bytes(m)
        copies = [m] + [copy.deepcopy(m) for _ in range(max(0, int(cold_gib * 2**30 / nbytes) - 1))]

        def cold(copies=copies):
            for c in copies:
                c(x)

        t = best_time({"cold": cold}, max(2, rounds // 3), 1)["cold"] / len(copies)
        hot = best_time({"hot": lambda: m(x)}, rounds, 20)["hot"]
        rows.append({"format": fmt, "stored_bytes": nbytes, "copies": len(copies), "cold_ms": t * 1e3,
                     "cold_gbs": nbytes / t / 1e9, "hot_ms": hot * 1e3, "hot_gbs": nbytes / hot / 1e9,
                     "roofline_frac": nbytes / t / bw, "kernel": kernel_name(m)})
        del copies
        print(f"  {fmt}: cold {t * 1e3:.3f} ms", file=sys.stderr)
    base = next((r for r in rows if r["format"] == "bf16"), None)
    for r in rows:
        r["speedup_vs_bf16"] = base["cold_ms"] / r["cold_ms"] if base else None
    return rows


def kernel_name(m: torch.nn.Module) -> str:
    """The path a one-row bf16 call of ``m`` takes (as the modules' forward chooses it)."""
    lib = kernels.load()
    vnni = lib is not None and bool(lib.ember_kernels_vnni()) and kernels.INT8_ACTIVATIONS
    if isinstance(m, Int8Linear):
        if lib is None:
            return "_weight_int8pack_mm"
        return "ember int8, VNNI (int8 activations)" if vnni else "ember int8"
    if isinstance(m, Int4Linear) and m.layout != "native":
        return "_weight_int4pack_mm_for_cpu" if m.layout == "cpu" else f"dequant+matmul ({m.layout})"
    if isinstance(m, (Int4Linear, NF4Linear)):
        if lib is None:
            return "dequant+matmul"
        return "ember 4-bit, VNNI (int8 activations)" if vnni else "ember 4-bit (bf16)"
    if hasattr(m, "qtype"):
        return f"ember GGUF {m.qtype.name}, {'VNNI' if vnni else 'AVX2'} (int8 activations)" if lib is not None \
            else "dequant+matmul (torch decoders)"
    return "ember bf16" if lib is not None else "torch.mv (bf16)"


def batch_table(formats: list[str], rounds: int) -> list[dict]:
    """Per activation-row count M: fused kernel vs dequantize-then-matmul (hot, one matrix)."""
    n, k = 5632, 2048
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    out = []
    for fmt in formats:
        m = build(fmt, w)
        for rows_m in (1, 2, 4, 8, 16, 32, 64, 128):
            x = torch.randn(rows_m, k, dtype=torch.bfloat16)
            fns = {"fallback": lambda: m._dequant_linear(x)}
            if fmt == "int8":
                fns["kernel"] = lambda: torch._weight_int8pack_mm(x, m.weight, m.scales)
            elif fmt.startswith("int4") and m.layout == "cpu":
                fns["kernel"] = lambda: torch._weight_int4pack_mm_for_cpu(x, m.weight, m.group_size, m.scales_and_zeros)
            if fmt == "bf16":
                fns = {"bf16": lambda: m(x)}
            t = best_time(fns, rounds, 3)
            out.append({"format": fmt, "rows": rows_m, **{f"{key}_ms": v * 1e3 for key, v in t.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,int8,int4g32,int4g64,int4g128,nf4")
    ap.add_argument("--cold-gib", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--out", default="bench/results/quant.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    formats = args.formats.split(",")
    bws = measure_read_bandwidth(args.cold_gib, max(3, args.rounds // 3))
    bw = max(bws.values())
    machine = (f"{platform.machine()} {os.cpu_count()} cores ({torch.get_num_threads()} threads), "
               f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"Quantized Linear decode (1 x 2048 @ 2048 -> 5632), {date.today()}; {machine}")
    print(f"read bandwidth: cold bf16 mv {bws['bf16_mv'] / 1e9:.1f} GB/s, fp32 sum {bws['fp32_sum'] / 1e9:.1f} GB/s; "
          f"roofline = {bw / 1e9:.1f} GB/s")
    print(f"ember kernels: {kernels.status()}; fused up to {kernels.MAX_ROWS['int8']} activation rows (int8), "
          f"{kernels.MAX_ROWS['q4']} (4-bit), then dequantized tiles + GEMM\n")
    rows = gemv_table(formats, args.cold_gib, args.rounds, bw)
    hdr = (f"| {'format':8} | {'MB stored':>9} | {'cold ms':>8} | {'cold GB/s':>9} | {'% roofline':>10} | "
           f"{'vs bf16':>7} | {'hot GB/s':>8} | kernel")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:]) )
    for r in rows:
        print(f"| {r['format']:8} | {r['stored_bytes'] / 1e6:9.2f} | {r['cold_ms']:8.3f} | {r['cold_gbs']:9.1f} | "
              f"{100 * r['roofline_frac']:9.0f}% | {r['speedup_vs_bf16']:6.2f}x | {r['hot_gbs']:8.1f} | {r['kernel']}")
    batch = []
    if not args.skip_batch:
        batch = batch_table([f for f in formats if f in ("bf16", "int8", "int4g128", "nf4")], max(3, args.rounds // 3))
        print("\nActivation rows M (hot, ms per call): fused kernel vs dequantize-then-matmul")
        print(f"| {'format':8} | {'M':>4} | {'kernel':>8} | {'fallback':>8} | {'bf16':>8} |")
        for r in batch:
            print(f"| {r['format']:8} | {r['rows']:4} | {r.get('kernel_ms', float('nan')):8.3f} | "
                  f"{r.get('fallback_ms', float('nan')):8.3f} | {r.get('bf16_ms', float('nan')):8.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "bandwidth_bytes_s": bws,
                               "roofline_bytes_s": bw, "gemv": rows, "batch": batch}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
