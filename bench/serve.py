"""Serving benchmark: ``ember serve`` under 1, 4, 16 and 32 concurrent streams (loopback only).

Starts ``python -m ember.server`` on a random Llama checkpoint (written here, word-level tokenizer)
on 127.0.0.1 with a free port, then for each concurrency level keeps that many streaming
``/v1/completions`` requests in flight (greedy, EOS ignored, so every request yields exactly
``--new`` tokens) until ``--rounds`` requests per stream are done or ``--max-seconds`` pass.
Per level: aggregate output tok/s (all tokens / wall time), time to first token and inter-token
latency p50/p99, failed requests. The client is plain ``httpx`` + hand-parsed SSE to stay light.

Roofline: one decode step reads every weight once, so a memory-bound model's single-stream ceiling is
bandwidth / weight bytes, and a batch of B streams can at best approach B x that (until compute-bound).
The issue's target: aggregate tok/s at 16 streams >= 6x the single-stream figure, zero errors.

    python bench/serve.py                       # 110M-parameter Llama, bf16 where native, 1,4,16,32 streams
    python bench/serve.py --size micro --levels 1,4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000),
    "micro": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ember.server", str(folder), "--port", "0", "--dtype", args.dtype,
           "--model-name", "bench", "--max-batch", str(args.max_batch), "--max-queue", "1024", "--log-level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        if m := re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line):
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("server did not start within 300 s")


async def one_request(client, base: str, prompt: str, new: int) -> dict:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}", "start": t0, "end": time.perf_counter()}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return {"error": obj["error"]["message"], "start": t0, "end": time.perf_counter()}
                if obj.get("choices") and obj["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}", "start": t0, "end": time.perf_counter()}
    end = time.perf_counter()
    if tokens != new:
        return {"error": f"got {tokens} tokens, expected {new}", "start": t0, "end": end}
    return {"start": t0, "end": end, "tokens": tokens, "ttft": arrivals[0] - t0 if arrivals else float("nan"),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def run_level(base: str, concurrency: int, rounds: int, max_seconds: float, prompts: list[str], new: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[dict] = []
    t_start = time.perf_counter()
    deadline = t_start + max_seconds
    todo = concurrency * rounds
    counter = iter(range(todo))

    async def worker(client) -> None:
        for k in counter:
            if time.perf_counter() > deadline:
                return
            results.append(await one_request(client, base, prompts[k % len(prompts)], new))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results) if results else float("nan")
    total = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "output_tokens": total, "wall_s": wall, "agg_tok_s": total / wall if wall > 0 else 0.0,
            "per_stream_tok_s": statistics.mean(r["tokens"] / (r["end"] - r["start"]) for r in ok) if ok else 0.0,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--model", default=None, help="serve this checkpoint folder instead of a random one")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where native), bf16, fp32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent streams per level")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop issuing requests at a level after this")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="output tokens per request")
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    args.max_batch = max(levels)

    import random

    import torch
    from decode import measure_bandwidth, write_checkpoint

    bw = measure_bandwidth(0.5)
    with tempfile.TemporaryDirectory(prefix="ember-serve-bench-") as tmp:
        if args.model:
            folder = Path(args.model)
            dims = json.loads((folder / "config.json").read_text())
        else:
            folder = Path(tmp) / args.size
            dims = SIZES[args.size]
            write_checkpoint(folder, dims, torch.bfloat16)
        vocab = dims["vocab_size"]
        rng = random.Random(0)
        prompts = [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(args.prompt_len)) for _ in range(256)]
        import ember

        llm = ember.load(folder, device="cpu", dtype=args.dtype if args.dtype != "auto" else "auto")
        wbytes = llm.model.weight_bytes_per_token()
        dtype_used = str(llm.dtype).removeprefix("torch.")
        n_params = llm.config.num_parameters()
        del llm
        proc, base = start_server(folder, args)
        try:
            asyncio.run(run_level(base, 1, 2, 60, prompts, 8))          # warm-up: first shapes, allocator
            asyncio.run(run_level(base, max(levels), 1, 60, prompts, 8))
            rows = []
            for c in levels:
                row = asyncio.run(run_level(base, c, args.rounds, args.max_seconds, prompts[c:], args.new))
                rows.append(row)
                print(f"[{c:2d} streams] {row['agg_tok_s']:.1f} tok/s, {row['errors']} errors", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)

    single = next((r["agg_tok_s"] for r in rows if r["concurrency"] == 1), None)
    roof = bw["copy"] / wbytes
    from ember.hardware import cpu_name

    machine = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, {args.device or 'default device'}"
    print(f"\nember serve, {args.model or args.size} ({n_params / 1e6:.0f}M parameters, {dtype_used}); "
          f"prompt {args.prompt_len} tokens, {args.new} output tokens per request, greedy; {date.today()}; {machine}")
    print(f"single-stream roofline = copy bandwidth {bw['copy'] / 1e9:.1f} GB/s / {wbytes / 1e6:.0f} MB per token "
          f"= {roof:.1f} tok/s; B streams can approach B x that while memory-bound\n")
    hdr = (f"| {'streams':>7} | {'requests':>8} | {'errors':>6} | {'output tok/s':>12} | {'x single':>8} | "
           f"{'tok/s/stream':>12} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | {'ITL p50 ms':>10} | {'ITL p99 ms':>10} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        x = r["agg_tok_s"] / single if single else float("nan")
        r["speedup_vs_single"] = x
        print(f"| {r['concurrency']:7d} | {r['requests']:8d} | {r['errors']:6d} | {r['agg_tok_s']:12.1f} | {x:7.2f}x | "
              f"{r['per_stream_tok_s']:12.1f} | {r['ttft_p50_ms']:11.1f} | {r['ttft_p99_ms']:11.1f} | "
              f"{r['itl_p50_ms']:10.1f} | {r['itl_p99_ms']:10.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "model": args.model or args.size,
                               "dims": dims, "dtype": dtype_used, "prompt_len": args.prompt_len, "new": args.new,
                               "bandwidth_bytes_s": bw, "weight_bytes_per_token": wbytes,
                               "single_stream_roofline_tok_s": roof, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
