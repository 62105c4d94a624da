"""Expert offload: a MoE model ~1.5x its memory budget, decoded with its experts read from disk on demand.

A random Qwen3-MoE checkpoint (bf16, written with transformers' ``save_pretrained``; kept in ``--folder`` for
reruns) is loaded with ``ember.offload.load_offloaded`` and a budget of (checkpoint bytes) / ``--ratio``: the
attention, norms, routers and embeddings stay resident, the rest of the budget is the expert cache, and missed
experts are read with ``O_DIRECT`` (the page cache cannot serve them; where the file system refuses O_DIRECT the
rows say so, since page-cache hits would then flatter the disk). Per row: decode tok/s, GB read from disk per
token, the cache's hit rate, and the fraction of the disk roofline reached: roofline tok/s = (disk read rate,
measured here with O_DIRECT, ``queue`` reads in flight as the prefetcher keeps) / (bytes read per token).
Decoding samples (temperature 1, fixed seed) so the tokens, and with them the routing, keep changing (greedy
decoding of random weights repeats a few tokens and routes them to the same experts). The same prompt and seed
decoded by the whole model in memory gives the reference tokens, which must be identical: the reference runs its
MoE layers as modules, as offloaded layers run (the CPU runtime's fused MoE kernel rounds bf16 sums in another
order, so it is timed as its own row but not compared token by token).

Random weights route less evenly than a uniform router but without a trained model's structure; the hit rate
depends on that, so it is reported, not assumed. llama.cpp from an mmap'd GGUF under the same
memory limit is run when ``llama_cpp`` imports and a GGUF of the model is given (``--gguf``); else that row says
why it is missing. Prints a table; writes JSON (``--out``).

    python bench/offload.py                        # ~2.5 GB model, budget = size / 1.5, 48 decode tokens
    python bench/offload.py --ratio 2 --tokens 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ember  # noqa: E402
from ember.offload.disk import disk_read_rate  # noqa: E402
from ember.engine import Engine  # noqa: E402
from ember.offload import load_offloaded  # noqa: E402
from ember.tokenizer import Tokenizer  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=768,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
             num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT = "w17 w401 w33 w2048 w77 w1200 w9 w300"
SAMPLING = dict(temperature=1.0, seed=1234)


def build(folder: Path) -> None:
    """A random Qwen3-MoE of :data:`SHAPE` in bf16, saved as transformers saves it, with a word tokenizer."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    cfg = transformers.Qwen3MoeConfig(**SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE["vocab_size"])}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_offload(folder: Path, budget: int, reserve: int, tokens: int, prefetch: bool, want: list[int],
                disk_bw: float) -> dict:
    model = load_offloaded(folder, budget, dtype="bf16", reserve_bytes=reserve, prefetch=prefetch)
    llm = Engine(model, Tokenizer.from_dir(folder), folder)
    llm.generate("w5 w6 w7 w8", max_new_tokens=16, temperature=1.0, seed=7)  # warm: the cache starts filled
    model.offload.reset_stats()
    res = llm.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)
    model.offload.cache.drain()
    s = model.offload.stats()
    st = res.stats
    per_token = s["bytes_read"] / s["tokens"]
    tok_s = st.decode_tok_s
    roof = disk_bw / per_token if per_token else float("inf")
    row = {
        "engine": "ember offload" + ("" if prefetch else " (no prefetch)"), "budget_bytes": budget,
        "cache_bytes": s["cache_bytes"], "resident_bytes": s["resident_bytes"], "direct": s["direct"],
        "decode_tok_s": tok_s, "prefill_tok_s": st.prefill_tok_s, "gb_read_per_token": per_token / 1e9,
        "hit_rate": s["hit_rate"], "prefetch_hits": s["prefetch_hits"], "wait_hits": s["wait_hits"],
        "misses": s["misses"], "uses": s["uses"], "bytes_read": s["bytes_read"],
        "disk_gbs_achieved": s["bytes_read"] / (st.prefill_s + st.decode_s) / 1e9,
        "roofline_tok_s": roof, "roofline_frac": tok_s / roof, "same_tokens": res.token_ids == want,
        "rss_after_decode_bytes": rss_bytes(),
    }
    model.offload.close()
    del model, llm
    gc.collect()  # the hooks' closures hold the store: free this row's cache before the next row loads
    return row


def table(rows: list[dict]) -> str:
    """The Markdown table of a run's rows. "bound" = the slower of the two limits a step cannot beat: the
    reference's in-memory step (same module path, nothing read) and the disk reads (bytes per token / disk rate)."""
    head = ["engine", "budget GB", "decode tok/s", "GB read/token", "hit rate", "disk roofline tok/s",
            "% disk roofline", "bound tok/s", "% bound", "same tokens"]
    ref = next((r for r in rows if "the reference" in r["engine"]), None)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['engine']} | {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        bound = None
        if "roofline_tok_s" in r and ref is not None:
            bound = 1 / max(1 / ref["decode_tok_s"], 1 / r["roofline_tok_s"])
        out.append("| " + " | ".join([
            r["engine"], "-" if r["budget_bytes"] is None else f"{r['budget_bytes'] / 1e9:.2f}",
            f"{r['decode_tok_s']:.2f}", f"{r['gb_read_per_token']:.3f}",
            "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%",
            f"{r['roofline_tok_s']:.2f}" if "roofline_tok_s" in r else "-",
            f"{100 * r['roofline_frac']:.0f}%" if "roofline_frac" in r else "-",
            "-" if bound is None else f"{bound:.2f}", "-" if bound is None else f"{100 * r['decode_tok_s'] / bound:.0f}%",
            "yes" if r["same_tokens"] else "NO"]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="/tmp/ember-bench-offload/qwen3-moe-random", help="model folder (made once)")
    ap.add_argument("--ratio", type=float, default=1.5, help="checkpoint bytes / memory budget")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--gguf", default=None, help="a GGUF of the same model for the llama.cpp row")
    ap.add_argument("--out", default="bench/results/offload.json")
    ap.add_argument("--table", metavar="JSON", default=None, help="print the table of an earlier run's JSON and exit")
    args = ap.parse_args()
    if args.table:
        d = json.loads(Path(args.table).read_text())
        print(f"{d['date']}, {d['machine']}: checkpoint {d['checkpoint_bytes'] / 1e9:.2f} GB, disk "
              f"{d['disk_read_bytes_s'] / 1e9:.2f} GB/s ({'O_DIRECT' if d['disk_direct'] else 'no O_DIRECT'})\n")
        print(table(d["rows"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"[bench] writing a random Qwen3-MoE to {folder}", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        build(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    budget = int(size / args.ratio)
    reserve = 64 << 20  # KV cache of a short context + activations + logits
    rates = [disk_read_rate(folder.parent, 1 << 30) for _ in range(2)]
    disk_bw, direct = max(r[0] for r in rates), all(r[1] for r in rates)
    print(f"[bench] checkpoint {size / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB, disk {disk_bw / 1e9:.2f} GB/s "
          f"({'O_DIRECT' if direct else 'no O_DIRECT: page cache dropped with fadvise'})", file=sys.stderr)

    whole = ember.load(folder, device="cpu", dtype="bf16", offload="off", context=512)
    fused = whole.generate(PROMPT, max_new_tokens=args.tokens, **SAMPLING)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a: None) for layer in whole.model.model.layers]
    res = whole.generate(PROMPT, max_new_tokens=args.tokens, **SAMPLING)  # MoE layers as modules
    want = res.token_ids
    rows = [{"engine": f"ember, whole model in memory{' (' + name + ')' if name else ''}", "budget_bytes": None,
             "decode_tok_s": r.stats.decode_tok_s, "prefill_tok_s": r.stats.prefill_tok_s, "gb_read_per_token": 0.0,
             "hit_rate": None, "same_tokens": r.token_ids == want, "rss_after_decode_bytes": rss_bytes()}
            for name, r in (("fused MoE kernel", fused), ("MoE as modules: the reference", res))]
    for h in hooks:
        h.remove()
    del whole
    for prefetch in (True, False):
        print(f"[bench] offload, prefetch {'on' if prefetch else 'off'}", file=sys.stderr)
        rows.append(run_offload(folder, budget, reserve, args.tokens, prefetch, want, disk_bw))
    try:
        import llama_cpp  # noqa: F401
        llama = "llama-cpp-python imported, but no --gguf given" if args.gguf is None else \
            "llama.cpp row not implemented for --gguf yet"
    except ImportError:
        llama = "llama-cpp-python not installed: no llama.cpp row"
    rows.append({"engine": "llama.cpp (mmap'd GGUF)", "skipped": llama})

    best = max((r for r in rows if "roofline_frac" in r), key=lambda r: r["roofline_frac"])
    ok = best["roofline_frac"] >= 0.6
    print(table(rows))
    print(f"\n- {'PASS' if ok else 'FAIL'}: decode >= 60% of the disk roofline: {100 * best['roofline_frac']:.0f}% "
          f"({best['engine']})")
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "shape": SHAPE, "checkpoint_bytes": size,
                               "ratio": args.ratio, "tokens": args.tokens, "disk_read_bytes_s": disk_bw,
                               "disk_direct": direct, "disk_samples": [r[0] for r in rates], "rows": rows,
                               "targets": [{"target": "decode >= 60% of the disk roofline",
                                            "value": f"{100 * best['roofline_frac']:.0f}%", "ok": ok}]}, indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
