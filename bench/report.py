"""Markdown tables from the benchmarks' JSON (bench/results/*.json), as they were measured, and docs/benchmarks.md.

    python bench/report.py            # print every table whose JSON exists
    python bench/report.py decode     # one of: decode, quant, gguf, serve, tune, plan, offload, speculative
    python bench/report.py --write    # record each JSON's table in bench/recorded/, then regenerate docs/benchmarks.md

Nothing here measures anything: it formats what bench/decode.py, quant.py, gguf_llamacpp.py, serve.py, tune.py and
plan_accuracy.py, offload.py, speculative.py wrote, so the tables are the benchmark's numbers, not copies by hand. bench/results/ is
not committed (it is one machine's last run); bench/recorded/ is: one Markdown file per recorded table,
named ``DATE-BENCH-MACHINE.md``, each saying the machine and date it was measured on. docs/benchmarks.md
is made from those files alone, so the same files always give the same page (``--check`` says whether
the committed page is up to date).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
RECORDED = BENCH / "recorded"
DOCS_PAGE = BENCH.parent / "docs" / "benchmarks.md"
MiB, GiB = 2**20, 2**30


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _targets(targets: list[dict]) -> str:
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = []
    for t in targets:
        value = t["value"] if isinstance(t["value"], str) else f"{t['value']:.2f}x"
        lines.append(f"- {marks[t['ok']]}: {t['target']}: {value}")
    return "\n".join(lines)


def _median(bw: dict) -> str:
    return f" ({bw['median'] / 1e9:.1f} GB/s)" if "median" in bw else " (not recorded by this run)"


def decode() -> str | None:
    d = _load("decode")
    if d is None:
        return None
    bw = d["bandwidth_bytes_s"]
    rows = []
    for r in d["rows"]:
        rows.append([r["model"], r["weights"], r["engine"], f"{r['decode_tok_s']:.2f}",
                     f"{r['vs_ember_bf16']:.2f}x" if "vs_ember_bf16" in r else "",
                     f"{r['bytes_per_token'] / 1e6:.0f}", f"{r['roofline_tok_s']:.1f}", f"{100 * r['roofline_frac']:.0f}%",
                     f"{100 * r['median_roofline_frac']:.0f}%" if "median_roofline_frac" in r else "",
                     f"{r['rss_after_decode_bytes'] / 1e6:.0f}" if r.get("rss_after_decode_bytes") else "",
                     f"{r['demo_ppl_ratio']:.4f}" if r.get("demo_ppl_ratio") is not None else "",
                     f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""])
    dims, moe = d["dims"], d.get("moe_dims") or {}
    shown = [f"{d['size']} Llama ({dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, TinyLlama's shape)"
             ] if any(r["model"] == "llama" for r in d["rows"]) else []
    if any(r["model"] == "mixtral-moe" for r in d["rows"]):
        shown.append(f"a Mixtral-shape MoE ({moe.get('num_hidden_layers')} layers, hidden {moe.get('hidden_size')}, "
                     f"{moe.get('num_local_experts')} experts, top-{moe.get('num_experts_per_tok')})")
    others = sorted({r["model"] for r in d["rows"]} - {"llama", "mixtral-moe"})
    if others:
        shown.append(f"the family shapes {', '.join(others)} (bench/models.py's FAMILY_SIZES and GPT_OSS_SIZES)")
    text = (f"Decode, batch 1, 128-token prompt, 128 new tokens, random weights: {' and '.join(shown)}. "
            f"{d['date']}, {d['machine']}. Roofline = the best copy "
            f"bandwidth measured between rows and timing rounds ({bw['copy'] / 1e9:.1f} GB/s; samples "
            f"{', '.join(f'{b / 1e9:.0f}' for b in bw.get('samples', [bw['copy']]))}) / bytes read per token; "
            f"% median: the same at the median sample{_median(bw)}. "
            f"ppl/bf16 = perplexity ratio of the trained demo model in that format (see bench/demo_ppl.py).\n\n")
    text += _table(["model", "weights", "engine", "decode tok/s", "vs bf16", "MB/token", "roofline tok/s",
                    "% roofline", "% median", "resident MB", "ppl/bf16", "vs HF"], rows)
    for r in d["rows"]:
        c = r.get("expert_check")
        if c:
            text += (f"\n\nMoE bytes per token, counted by hooks over {c['decode_steps']} decode steps: "
                     f"{c['expert_tokens_per_layer_per_step']:.2f} experts per MoE layer per token (top-{c['top_k']} "
                     f"of {c['num_experts']}), expert weights read {c['measured_expert_bytes_per_token'] / 1e6:.1f} MB "
                     f"per token, as stated ({c['stated_expert_bytes_per_token'] / 1e6:.1f} MB).")
    return text + "\n\n" + _targets(d["targets"])


def quant() -> str | None:
    """bench/quant.py's one-row tables: the default run, and the bf16-activation run when it was made too."""
    d = _load("quant")
    if d is None:
        return None
    off = _load("quant_bf16act")
    offs = {r["format"]: r for r in off["gemv"]} if off else {}
    rows = []
    for r in d["gemv"]:
        o = offs.get(r["format"])
        rows.append([r["format"], f"{r['stored_bytes'] / 1e6:.2f}", f"{r['cold_ms']:.3f}", f"{r['cold_gbs']:.1f}",
                     f"{100 * r['roofline_frac']:.0f}%", f"{r['speedup_vs_bf16']:.2f}x", f"{r['hot_gbs']:.1f}",
                     r["kernel"], f"{o['cold_gbs']:.1f} / {o['hot_gbs']:.1f}" if o else ""])
    text = (f"One activation row times a (5632, 2048) weight (TinyLlama's MLP), {d['date']}, {d['machine']}; cold = "
            f"from DRAM (copies rotated past the cache), hot = one matrix again and again; roofline = "
            f"{d['roofline_bytes_s'] / 1e9:.1f} GB/s (best streaming read measured in the same run)"
            + ("; last column: the same with `EMBER_INT8_ACTIVATIONS=0` (bf16 activations), a separate run" if off else "")
            + ".\n\n")
    return text + _table(["format", "MB stored", "cold ms", "cold GB/s", "% roofline", "vs bf16", "hot GB/s", "kernel"]
                         + (["bf16-activation cold / hot GB/s"] if off else []), [r if off else r[:-1] for r in rows])


def gguf_table(d: dict) -> str:
    """bench/gguf_llamacpp.py's side-by-side table of one run (Ember / llama.cpp on the same GGUF files)."""
    cpu = "_cpu" if d.get("cpu_time") else ""  # tokens per CPU-second of the process (a shared machine)
    text = (f"Ember and llama.cpp (llama-cpp-python {d['llama_cpp_python']}, {d['threads']} threads) on the same GGUF "
            f"files, {d['date']}, {d['machine']}: batch 1, {d['prompt_len']}-token prompt, {d['new_tokens']} new "
            f"tokens, {d['rounds']} interleaved rounds (medians); {'tok/s are tokens per CPU-second of each process; ' if cpu else ''}"
            "ratio = Ember / llama.cpp; resident = RSS growth of the engine's own process over the load and the timed "
            "rounds.\n\n")
    rows = []
    for r in d["rows"]:
        e, c = r["ember"], r["llama_cpp"]
        size = f"{r['file_bytes'] / MiB:.0f}"
        if "error" in e or "error" in c:
            who, err = ("Ember", e) if "error" in e else ("llama.cpp", c)
            rows.append([r["model"], r["type"], size, f"{who} refused the file: {err['error'].split(': ', 1)[-1][:60]}"]
                        + [""] * 8)
            continue
        rows.append([r["model"], r["type"], size, f"{e[f'decode_tok{cpu}_s']:.2f}", f"{c[f'decode_tok{cpu}_s']:.2f}",
                     f"{r['decode_ratio']:.2f}x", f"{e[f'prefill_tok{cpu}_s']:.1f}", f"{c[f'prefill_tok{cpu}_s']:.1f}",
                     f"{r['prefill_ratio']:.2f}x", f"{e['rss_bytes'] / MiB:.0f}", f"{c['rss_bytes'] / MiB:.0f}",
                     f"{r['rss_ratio']:.2f}x"])
    skipped = (f"\n\nNot run within the run's time limit: {', '.join(d['skipped'])}." if d.get("skipped") else "")
    return text + _table(["model", "type", "file MB", "decode tok/s Ember", "llama.cpp", "ratio", "prefill tok/s Ember",
                          "llama.cpp", "ratio", "resident MB Ember", "llama.cpp", "ratio"], rows) + skipped


def gguf() -> str | None:
    d = _load("gguf")
    return None if d is None else gguf_table(d)


def serve() -> str | None:
    d = _load("serve")
    if d is None:
        return None
    rows = [[str(r["concurrency"]), str(r["requests"]), str(r["errors"]), f"{r['agg_tok_s']:.1f}",
             f"{r['speedup_vs_single']:.2f}x", f"{r['per_stream_tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f}",
             f"{r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}"] for r in d["rows"]]
    text = (f"`ember serve` on a random {d['model']} Llama ({d['dtype']}), streaming `/v1/completions` over loopback, "
            f"{d['prompt_len']}-token prompts, {d['new']} output tokens each, greedy. {d['date']}, {d['machine']}.\n\n")
    text += _table(["streams", "requests", "errors", "output tok/s", "x single", "tok/s per stream", "TTFT p50 ms",
                    "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows)
    by = {r["concurrency"]: r for r in d["rows"]}
    if 16 in by and 1 in by:
        x = by[16]["agg_tok_s"] / by[1]["agg_tok_s"]
        ok = x >= 6 and all(r["errors"] == 0 for r in d["rows"])
        text += f"\n\n- {'PASS' if ok else 'FAIL'}: aggregate tok/s at 16 streams >= 6x single stream, no errors: {x:.2f}x"
    return text


def tune() -> str | None:
    d = _load("tune")
    if d is None:
        return None
    peft = next((r for r in d["rows"] if r["row"] == "peft" and "error" not in r), None)
    rows = []
    for r in d["rows"]:
        if "error" in r:
            rows.append([r["row"], "error: " + r["error"]] + [""] * 5)
            continue
        rx = (lambda k: f"{r[k] / peft[k]:.2f}x") if peft else (lambda k: "")
        rows.append([r["row"], f"{r['tok_s']:.1f}", rx("tok_s"), f"{r['tok_s'] * d['flops_per_token'] / 1e12:.3f}",
                     f"{r['peak_bytes'] / GiB:.2f}", rx("peak_bytes"), f"{r['delta_bytes'] / GiB:.2f}"])
    text = (f"Fine-tuning {d['model']} (random weights), sequence {d['seq']}, batch 1, LoRA r=16 alpha 32 on every "
            f"linear layer, gradient checkpointing, {d['dtype']} base; best step of {d['steps']} x {d['repeat']} runs, "
            f"each row in its own process. {d.get('date', d.get('time'))}, {d.get('machine', d['device'])}.\n\n")
    text += _table(["row", "train tok/s", "x PEFT", "TFLOP/s", "peak GiB", "x PEFT", "delta GiB"], rows)
    return text + ("\n\n" + _targets(d["targets"]) if d.get("targets") else "")


def plan() -> str | None:
    d = _load("plan_accuracy")
    if d is None:
        return None
    rows = []
    for r in d["rows"]:
        m, p = r["measured"], r["predicted"]
        task = r["task"] + (" +ckpt" if r["grad_ckpt"] else "")
        rows.append([r["run"], task, f"{p['peak_rss'] / MiB:.0f} / {m['peak_rss'] / MiB:.0f}", f"{100 * r['peak_err']:+.1f}%",
                     f"{r['speed_pred']:.1f} / {r['speed_meas']:.1f}", f"{100 * r['speed_err']:+.1f}%",
                     "yes" if r["within_target"] else "no"])
    text = (f"Planner vs measurement, {len(rows)} runs on this machine (fresh process each): {d['date']}, "
            f"{d['machine']}. Peak = VmHWM; tok/s = decode tok/s per sequence, or training tok/s.\n\n")
    text += _table(["run", "task", "peak MiB pred / meas", "err", "tok/s pred / meas", "err", "within target"], rows)
    for label, sel in (("inference", [r for r in d["rows"] if not r["training"]]),
                       ("training", [r for r in d["rows"] if r["training"]])):
        if sel:
            ok_p = sum(abs(r["peak_err"]) <= d["targets"]["peak"] for r in sel)
            ok_s = sum(abs(r["speed_err"]) <= d["targets"]["tok_s"] for r in sel)
            text += (f"\n\n- {label}: peak memory within +-{100 * d['targets']['peak']:.0f}% on {ok_p}/{len(sel)} runs "
                     f"(worst {100 * max(abs(r['peak_err']) for r in sel):.1f}%); tok/s within "
                     f"+-{100 * d['targets']['tok_s']:.0f}% on {ok_s}/{len(sel)} (worst "
                     f"{100 * max(abs(r['speed_err']) for r in sel):.1f}%)")
    return text


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _pct(x, spec: str) -> str:
    return "-" if x is None else format(100 * x, spec) + "%"


def offload_rows_table(rows: list[dict]) -> str:
    """bench/offload.py's rows as a Markdown table."""
    head = ["engine", "budget GB", "decode tok/s", "GB read/token", "hit rate", "prefetch precision",
            "wait ms/token", "reads in flight", "disk-bound tok/s", "compute-bound tok/s", "% roofline", "same tokens"]
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["engine"], r["skipped"]] + [""] * (len(head) - 2))
            continue
        disk = r.get("disk_bound_tok_s")
        out.append([
            r["engine"] + (f" (predicted {r['predicted_tok_s']:.2f} tok/s)" if "predicted_tok_s" in r else ""),
            _fmt(r["budget_bytes"], ".2f", 1e-9), f"{r['decode_tok_s']:.2f}", f"{r['gb_read_per_token']:.3f}",
            _pct(r["hit_rate"], ".1f"), _pct(r.get("prefetch_precision"), ".0f"),
            _fmt(r.get("wait_ms_per_token"), ".1f"), _fmt(r.get("mean_in_flight"), ".1f"),
            _fmt(disk, ".2f") + (" (disk bound)" if r.get("disk_bound") else ""),
            _fmt(r.get("compute_bound_tok_s"), ".2f"), _pct(r.get("roofline_frac"), ".0f"),
            {True: "yes", False: "NO", None: "-"}[r.get("same_tokens")]])
    return _table(head, out)


def offload_table(d: dict) -> str:
    """bench/offload.py's table of one run, with the machine, the disk rate and the target lines."""
    text = (f"A random Qwen3-MoE ({d['checkpoint_bytes'] / 1e9:.2f} GB bf16) decoded {d['tokens']} tokens with its "
            f"experts read from disk at budgets of size / {', '.join(str(r) for r in d['ratios'])}; {d['date']}, "
            f"{d['machine']}; disk {d['disk_read_bytes_s'] / 1e9:.2f} GB/s "
            f"({'O_DIRECT' if d['disk_direct'] else 'buffered, page cache dropped'}). % roofline = decode tok/s / "
            "min(disk-bound, compute-bound); disk-bound = disk rate / bytes read per token; compute-bound = the model "
            "whole in memory.\n\n")
    return text + offload_rows_table(d["rows"]) + ("\n\n" + _targets(d["targets"]) if d["targets"] else "")


def offload() -> str | None:
    d = _load("offload")
    return None if d is None else offload_table(d)


def speculative() -> str | None:
    d = _load("speculative")
    if d is None:
        return None
    t, dr, cost = d["target"], d["draft"], d["pass_cost"]
    text = (f"Batch 1 and the scheduler's streams, greedy, {d['new_tokens']} new tokens, k = {d['k']}, {d['dtype']}; "
            f"target {t['params'] / 1e6:.1f}M parameters ({t['steps']} steps, loss {t['last_loss']:.2f}), draft "
            f"{dr['params'] / 1e6:.2f}M ({dr['steps']} steps, loss {dr['last_loss']:.2f}), both trained on the demo "
            f"corpus; {d['date']}, {d['machine']}. A verification pass of {d['k'] + 1} rows cost "
            f"{cost['pass_over_step']:.2f} one-token steps of single-thread CPU time. Medians of interleaved rounds; "
            "greedy output identical to plain decoding in every row.\n\n")
    rows = [[r["row"], f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}", f"{r['speedup']:.2f}x",
             "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}", f"{r['tokens_per_pass']:.2f}", r["target"]]
            for r in d["rows"]]
    return text + _table(["row", "plain tok/s", "speculative tok/s", "speed-up", "acceptance", "tokens per pass",
                          "target"], rows)


TABLES = {"decode": decode, "quant": quant, "gguf": gguf, "serve": serve, "tune": tune, "plan": plan,
          "offload": offload, "speculative": speculative}
# bench name -> (section title in docs/benchmarks.md, the script and JSON that produce it)
SECTIONS = {
    "decode": ("Decode", "bench/decode.py", "decode"),
    "quant": ("Quantized kernels", "bench/quant.py", "quant"),
    "gguf": ("GGUF beside llama.cpp", "bench/gguf_llamacpp.py", "gguf"),
    "serve": ("Serving", "bench/serve.py", "serve"),
    "tune": ("Fine-tuning", "bench/tune.py", "tune"),
    "plan": ("Planner accuracy", "bench/plan_accuracy.py", "plan_accuracy"),
    "offload": ("Bigger than memory (offload)", "bench/offload.py", "offload"),
    "speculative": ("Speculative decoding", "bench/speculative.py", "speculative"),
}


def _slug(text: str) -> str:
    """A short file-name form of a machine description: ``Intel(R) Xeon(R) Processor (x86_64), 2 cores`` -> ``intel-xeon-processor-x86-64-2-cores``."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:48].strip("-") or "machine"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def record(name: str) -> Path | None:
    """Write bench/results/<name>'s table to bench/recorded/DATE-NAME-MACHINE.md (None when there is no JSON)."""
    title, script, stem = SECTIONS[name]
    d = _load(stem)
    text = TABLES[name]()
    if d is None or text is None:
        return None
    date = str(d.get("date") or d.get("time") or "undated")[:10]
    machine = str(d.get("machine") or d.get("device") or "unknown machine")
    path = RECORDED / f"{date}-{name}-{_slug(machine)}.md"
    _atomic_write(path, f"### {title}, {machine} (`{script}`, {date})\n\n{text}\n")
    return path


def recorded(name: str) -> list[Path]:
    """The recorded tables of one bench, newest first (file names start with the date)."""
    return sorted(RECORDED.glob(f"*-{name}-*.md"), reverse=True)


def render_docs() -> str:
    """docs/benchmarks.md from bench/recorded/*.md."""
    out = ["# Benchmarks", "",
           "Every table below is a recorded result: what the benchmark printed on the machine and date in its "
           "heading, newest first. The page is generated by `python bench/report.py --write` from "
           "`bench/recorded/*.md`; edit those files (or record a new run), not this page.",
           "",
           "To add a result: run the benchmark (it writes `bench/results/NAME.json` and prints its table), then "
           "`python bench/report.py --write`, which records the table in `bench/recorded/` and regenerates this "
           "page. The machines are shared 2-core VMs: bandwidth and tok/s move by 5-15% between runs and hours, "
           "so compare rows measured in the same run, and each run against its own roofline (the bandwidth it "
           "measured). No GPU results are recorded yet.",
           ""]
    for name, (title, script, _) in SECTIONS.items():
        files = recorded(name)
        out += [f"## {title} (`{script}`)", ""]
        if not files:
            out += [f"(nothing recorded yet: run `python {script}`)", ""]
        for f in files:
            out += [f.read_text().strip(), ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] in ("--write", "--check"):
        if args[0] == "--write":
            for name in SECTIONS:
                path = record(name)
                if path is not None:
                    print(f"recorded {path.relative_to(BENCH.parent)}")
            _atomic_write(DOCS_PAGE, render_docs())
            print(f"wrote {DOCS_PAGE.relative_to(BENCH.parent)}")
            return 0
        same = DOCS_PAGE.is_file() and DOCS_PAGE.read_text() == render_docs()
        print("docs/benchmarks.md is up to date" if same else "docs/benchmarks.md is stale: run python bench/report.py --write")
        return 0 if same else 1
    for name in args or list(TABLES):
        text = TABLES[name]()
        print(f"### {name}\n\n{text if text else '(no results yet: run ' + SECTIONS[name][1] + ')'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
