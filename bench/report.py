"""Markdown tables for the README from the benchmarks' JSON (bench/results/*.json), as they were measured.

    python bench/report.py            # every table whose JSON exists
    python bench/report.py decode     # one of: decode, quant, serve, tune, plan

Nothing here measures anything: it formats what bench/decode.py, quant.py, serve.py, tune.py and
plan_accuracy.py wrote, so the README's tables are the benchmark's numbers, not copies by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
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
    text = (f"Decode, batch 1, 128-token prompt, 128 new tokens, random weights: {d['size']} Llama "
            f"({dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, TinyLlama's shape) and a Mixtral-shape "
            f"MoE ({moe.get('num_hidden_layers')} layers, hidden {moe.get('hidden_size')}, {moe.get('num_local_experts')} "
            f"experts, top-{moe.get('num_experts_per_tok')}). {d['date']}, {d['machine']}. Roofline = the best copy "
            f"bandwidth measured between rows and timing rounds ({bw['copy'] / 1e9:.1f} GB/s; samples "
            f"{', '.join(f'{b / 1e9:.0f}' for b in bw.get('samples', [bw['copy']]))}) / bytes read per token; "
            f"% median: the same at the median sample{_median(bw)}. "
            f"ppl/bf16 = perplexity ratio of the trained demo model in that format (see bench/decode.py).\n\n")
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


def main() -> int:
    which = sys.argv[1:] or ["decode", "quant", "serve", "tune", "plan"]
    for name in which:
        text = {"decode": decode, "quant": quant, "serve": serve, "tune": tune, "plan": plan}[name]()
        print(f"### {name}\n\n{text if text else '(no results yet: run bench/' + name + '.py)'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
