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

Tool-calling mix (``--tool-share F``, default 0.25): the checkpoint gets a byte-level BPE tokenizer
and a Hermes tool template instead, and at ``--tool-streams`` (16) concurrent streams the plain mix
and a mix where a share F of the requests are streamed chat completions with a forced tool call
(``tool_choice: required``, two tools; the arguments are checked to parse) run in alternating rounds
(``--tool-rounds``); the table gives each round and the ratio of the medians. A forced call ends when
its JSON is complete, so its requests count the tokens they actually produced.

    python bench/serve.py                       # 110M-parameter Llama, bf16 where native, 1,4,16,32 streams
    python bench/serve.py --size micro --levels 1,4   # a quick smoke run
    python bench/serve.py --size micro --levels 16 --tool-rounds 3   # plain vs tool-calling mix at 16 streams
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


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}]
HERMES = ("{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
          "</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
          "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tool_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (so JSON can be written) with <tool_call> tokens and a Hermes tool template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}),
              "the weather in the little town is warm and blue", "[1, 2, 3.5, -4] true false null"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab_size - 8, 2000),
                                                        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = HERMES
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    fast.save_pretrained(folder)


async def one_request(client, base: str, prompt: str, new: int, tool: bool = False) -> dict:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    url = f"{base}/v1/completions"
    if tool:
        body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
                "tool_choice": "required", "max_tokens": new, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        url = f"{base}/v1/chat/completions"
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    args = ""
    try:
        async with client.stream("POST", url, json=body) as r:
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
                for tc in (obj["choices"][0].get("delta", {}).get("tool_calls") or []) if obj.get("choices") else []:
                    arrivals.append(time.perf_counter())
                    args += tc["function"].get("arguments") or ""
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}", "start": t0, "end": time.perf_counter()}
    end = time.perf_counter()
    if tool:
        try:
            json.loads(args)
        except ValueError:
            return {"error": f"tool-call arguments do not parse: {args[:80]!r}", "start": t0, "end": end}
    elif tokens != new:
        return {"error": f"got {tokens} tokens, expected {new}", "start": t0, "end": end}
    return {"start": t0, "end": end, "tokens": tokens, "ttft": arrivals[0] - t0 if arrivals else float("nan"),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def run_level(base: str, concurrency: int, rounds: int, max_seconds: float, prompts: list[str], new: int,
                    tool_share: float = 0.0) -> dict:
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
            tool = tool_share > 0 and (k * tool_share) % 1 + tool_share >= 1  # every 1/share-th request
            results.append(await one_request(client, base, prompts[k % len(prompts)], new, tool))

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
    ap.add_argument("--tool-share", type=float, default=0.25, help="share of forced tool-call requests in the tool mix "
                    "(0: no tool mix)")
    ap.add_argument("--tool-streams", type=int, default=16)
    ap.add_argument("--tool-rounds", type=int, default=3, help="alternating plain / tool-mix rounds")
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
        if args.tool_share > 0 and not args.model:
            write_tool_tokenizer(folder, vocab)
            words = "the weather in the little town is warm and blue".split()
            prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_len)) for _ in range(256)]
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
            mix = []
            if args.tool_share > 0:
                c = args.tool_streams
                asyncio.run(run_level(base, c, 1, 60, prompts, 16, args.tool_share))  # warm-up: grammar, vocab
                for k in range(args.tool_rounds):
                    for share in (0.0, args.tool_share):
                        row = asyncio.run(run_level(base, c, args.rounds, args.max_seconds, prompts[k:], args.new, share))
                        row.update(round=k + 1, tool_share=share)
                        mix.append(row)
                        print(f"[tool mix {share:.2f}, round {k + 1}] {row['agg_tok_s']:.1f} tok/s, "
                              f"{row['errors']} errors {row['error_samples']}", file=sys.stderr)
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
    if mix:
        print(f"\ntool-calling mix at {args.tool_streams} streams: {args.tool_share:.0%} of requests force a call "
              f"(tool_choice required, 2 tools); alternating rounds\n")
        print("| round | mix | requests | errors | output tok/s |\n|---|---|---|---|---|")
        for r in mix:
            kind = "plain" if r["tool_share"] == 0 else f"{r['tool_share']:.0%} tools"
            print(f"| {r['round']} | {kind} | {r['requests']} | {r['errors']} | {r['agg_tok_s']:.1f} |")
        plain = statistics.median(r["agg_tok_s"] for r in mix if r["tool_share"] == 0)
        tools = statistics.median(r["agg_tok_s"] for r in mix if r["tool_share"] > 0)
        print(f"\nmedian: plain {plain:.1f} tok/s, tool mix {tools:.1f} tok/s = {tools / plain:.1%} of plain; "
              f"errors {sum(r['errors'] for r in mix)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "model": args.model or args.size,
                               "dims": dims, "dtype": dtype_used, "prompt_len": args.prompt_len, "new": args.new,
                               "bandwidth_bytes_s": bw, "weight_bytes_per_token": wbytes,
                               "single_stream_roofline_tok_s": roof, "rows": rows, "tool_mix": mix}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
