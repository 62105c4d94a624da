"""Bigger than memory: a MoE model decoded with its experts read from disk, a dense one with layers streamed.

A random Qwen3-MoE checkpoint (bf16, written with transformers' ``save_pretrained``; kept in ``--folder`` for
reruns) is loaded with ``ember.offload.load_offloaded`` and a budget of (checkpoint bytes) / ratio, for each of
``--ratios`` (default 1.5, 3, 8): attention, norms, routers and embeddings stay resident, the rest of the budget is the expert cache,
and experts are read with ``O_DIRECT`` (the page cache cannot serve them; where the file system refuses O_DIRECT
the rows say so). Decoding samples (temperature 1, fixed seed) so the routing keeps changing; the same prompt and
seed decoded by the whole model in memory, its MoE layers run as modules as offloaded layers run, gives the
reference tokens, which every offloaded row must equal (the fused MoE kernel's row sums bf16 in another order and
is timed, not compared).

The roofline of a row, measured in the same run:

    disk-bound tok/s    = disk read rate (O_DIRECT, 4 MiB reads, as many in flight as the reader keeps)
                          / bytes the row read from disk per decode token
    compute-bound tok/s = the same model decoded whole in memory (no budget; the reference row)
    % of roofline       = decode tok/s / min(disk-bound, compute-bound)

A row whose disk-bound rate is below its compute-bound rate is disk bound: the issue's target (>= 60% of the
roofline) is checked on those rows. Each row also gives the hit rate, prefetch precision (speculative reads used /
done), the time per token the forward waited for reads, and the mean reads in flight.

Dense layer streaming: a random Qwen3 (dense) at a budget of half its size, layers read ahead on the same I/O
threads; the planner's predicted tok/s (its formula, fed the in-memory step measured here and the disk rate) beside
the measured one.

llama.cpp: the MoE model written as a bf16 GGUF (Ember's writer, a SentencePiece-style vocabulary of the same
size) run by llama-cpp-python from the mmap'd file in a child process under the same memory limit, set with
``systemd-run --scope -p MemoryMax=`` or a cgroup v2 folder where the machine allows one; where neither is
possible the row runs without a limit and says why (the page cache is dropped with ``posix_fadvise`` first).
Its GB read per token is the process's storage reads (``/proc/self/io``).

    python bench/offload.py                            # ratios 1.5, 3, 8; 48 decode tokens; dense + llama.cpp rows
    python bench/offload.py --ratios 3 --tokens 128 --no-dense
    python bench/offload.py --table bench/recorded/offload.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ember  # noqa: E402
from ember.engine import Engine  # noqa: E402
from ember.offload import load_offloaded  # noqa: E402
from ember.offload.disk import disk_read_rate  # noqa: E402
from ember.tokenizer import Tokenizer  # noqa: E402
from report import offload_rows_table as table  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=768,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
             num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False)
DENSE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT = "w17 w401 w33 w2048 w77 w1200 w9 w300"
SAMPLING = dict(temperature=1.0, seed=1234)
RESERVE = 64 << 20  # KV cache of a short context + activations + logits


def build(folder: Path, shape: dict = SHAPE, moe: bool = True) -> None:
    """A random Qwen3(-MoE) of ``shape`` in bf16, saved as transformers saves it, with a word tokenizer."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    cfg = (transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config)(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)


def ensure(folder: Path, shape: dict, moe: bool) -> int:
    """Build ``folder`` once; its checkpoint bytes."""
    if not (folder / "config.json").is_file():
        print(f"[bench] writing a random {'Qwen3-MoE' if moe else 'Qwen3'} to {folder}", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        build(folder, shape, moe)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_offload(folder: Path, budget: int, tokens: int, prefetch: bool, want: list[int], disk_bw: float,
                compute_tok_s: float) -> dict:
    model = load_offloaded(folder, budget, dtype="bf16", reserve_bytes=RESERVE, prefetch=prefetch)
    llm = Engine(model, Tokenizer.from_dir(folder), folder)
    llm.generate("w5 w6 w7 w8", max_new_tokens=16, temperature=1.0, seed=7)  # warm: the cache starts filled
    model.offload.cache.drain()
    model.offload.reset_stats()
    res = llm.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)
    model.offload.cache.drain()
    s = model.offload.stats()
    st = res.stats
    per_token = s["bytes_read"] / s["tokens"]
    disk_bound = disk_bw / per_token if per_token else float("inf")
    bound = min(disk_bound, compute_tok_s)
    row = {
        "engine": "ember offload" + ("" if prefetch else " (no prefetch)"), "budget_bytes": budget,
        "cache_bytes": s["cache_bytes"], "resident_bytes": s["resident_bytes"], "direct": s["direct"],
        "decode_tok_s": st.decode_tok_s, "prefill_tok_s": st.prefill_tok_s, "gb_read_per_token": per_token / 1e9,
        "hit_rate": s["hit_rate"], "prefetch_precision": s["prefetch_precision"] if prefetch else None,
        "wait_ms_per_token": s["wait_ms_per_token"], "mean_in_flight": s["io"]["mean_in_flight"],
        "max_in_flight": s["io"]["max_in_flight"], "disk_bound_tok_s": disk_bound, "compute_bound_tok_s": compute_tok_s,
        "disk_bound": disk_bound < compute_tok_s, "roofline_frac": st.decode_tok_s / bound,
        "same_tokens": res.token_ids == want, "rss_after_decode_bytes": rss_bytes(), "stats": s,
    }
    model.offload.close()
    del model, llm
    gc.collect()  # the hooks' closures hold the store: free this row's cache before the next row loads
    return row


def dense_rows(folder: Path, tokens: int, disk_bw: float) -> list[dict]:
    """Whole in memory, then streamed at half its size; the planner's prediction beside the measurement."""
    from ember.config import ModelConfig
    from ember.planner.offload import offload_plan
    from ember.planner.workload import Workload

    size = ensure(folder, DENSE, moe=False)
    whole = ember.load(folder, device="cpu", dtype="bf16", offload="off", context=512)
    ref = whole.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)
    del whole
    gc.collect()
    budget = size // 2
    model = load_offloaded(folder, budget, dtype="bf16", reserve_bytes=RESERVE, mode="layers")
    llm = Engine(model, Tokenizer.from_dir(folder), folder)
    llm.generate("w5 w6", max_new_tokens=4, **SAMPLING)
    model.offload.reset_stats()
    res = llm.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)
    s = model.offload.stats()
    per_token = s["bytes_read"] / s["tokens"]
    hw = SimpleNamespace(nodes=1, calibration=SimpleNamespace(disk_read_bandwidth=disk_bw))
    plan = offload_plan(ModelConfig.from_file(folder), hw, Workload(context=512, dtype="bf16"), budget, RESERVE,
                        1 / ref.stats.decode_tok_s)
    compute = ref.stats.decode_tok_s
    disk_bound = disk_bw / per_token
    model.offload.close()
    common = dict(budget_bytes=None, hit_rate=None, prefetch_precision=None, same_tokens=res.token_ids == ref.token_ids)
    return [dict(common, engine="ember dense, whole in memory", decode_tok_s=compute, gb_read_per_token=0.0,
                 same_tokens=True),
            dict(common, engine="ember dense, layers streamed", budget_bytes=budget, decode_tok_s=res.stats.decode_tok_s,
                 gb_read_per_token=per_token / 1e9, predicted_tok_s=plan.decode_tok_s,
                 predicted_gb_read_per_token=plan.disk_bytes_per_token / 1e9,
                 wait_ms_per_token=s["wait_ms_per_token"], mean_in_flight=s["io"]["mean_in_flight"],
                 max_in_flight=s["io"]["max_in_flight"], disk_bound_tok_s=disk_bound, compute_bound_tok_s=compute,
                 disk_bound=disk_bound < compute, roofline_frac=res.stats.decode_tok_s / min(disk_bound, compute),
                 stats=s)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="/tmp/ember-bench-offload/qwen3-moe-random", help="MoE model folder (made once)")
    ap.add_argument("--dense-folder", default="/tmp/ember-bench-offload/qwen3-dense-random")
    ap.add_argument("--ratios", default="1.5,3,8", help="checkpoint bytes / memory budget, comma separated")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense layer-streaming rows")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--out", default="bench/results/offload.json")
    ap.add_argument("--table", metavar="JSON", default=None, help="print the table of an earlier run's JSON and exit")
    args = ap.parse_args()
    if args.table:
        from report import offload_table  # noqa: PLC0415
        print(offload_table(json.loads(Path(args.table).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    size = ensure(folder, SHAPE, moe=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    rates = [disk_read_rate(folder.parent, 1 << 30) for _ in range(2)]
    disk_bw, direct = max(r[0] for r in rates), all(r[1] for r in rates)
    print(f"[bench] checkpoint {size / 1e9:.2f} GB, disk {disk_bw / 1e9:.2f} GB/s "
          f"({'O_DIRECT' if direct else 'no O_DIRECT: page cache dropped with fadvise'})", file=sys.stderr)

    whole = ember.load(folder, device="cpu", dtype="bf16", offload="off", context=512)
    fused = whole.generate(PROMPT, max_new_tokens=args.tokens, **SAMPLING)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a: None) for layer in whole.model.model.layers]
    res = whole.generate(PROMPT, max_new_tokens=args.tokens, **SAMPLING)  # MoE layers as modules
    want = res.token_ids
    compute = res.stats.decode_tok_s
    rows = [{"engine": f"ember, whole model in memory ({name})", "budget_bytes": None,
             "decode_tok_s": r.stats.decode_tok_s, "prefill_tok_s": r.stats.prefill_tok_s, "gb_read_per_token": 0.0,
             "hit_rate": None, "same_tokens": r.token_ids == want, "rss_after_decode_bytes": rss_bytes()}
            for name, r in (("fused MoE kernel", fused), ("MoE as modules: the compute bound", res))]
    for h in hooks:
        h.remove()
    gguf = None
    if not args.no_llama:
        from offload_llamacpp import write_gguf_once  # noqa: PLC0415
        gguf = write_gguf_once(whole, folder)
    del whole
    gc.collect()
    for ratio in ratios:
        for prefetch in ((True, False) if ratio == max(ratios) else (True,)):
            print(f"[bench] offload, ratio {ratio}, prefetch {'on' if prefetch else 'off'}", file=sys.stderr)
            rows.append(run_offload(folder, int(size / ratio), args.tokens, prefetch, want, disk_bw, compute))
            rows[-1]["ratio"] = ratio
    if not args.no_llama:
        from offload_llamacpp import llama_rows  # noqa: PLC0415
        rows += llama_rows(gguf, [int(size / r) for r in ratios], args.tokens, torch.get_num_threads(), disk_bw,
                           compute)
    if not args.no_dense:
        print("[bench] dense layer streaming", file=sys.stderr)
        rows += dense_rows(Path(args.dense_folder), args.tokens, disk_bw)

    checked = [r for r in rows if r.get("disk_bound") and r["engine"].startswith("ember offload")]
    targets = []
    for r in checked:
        ok = r["roofline_frac"] >= 0.6
        targets.append({"target": f"decode >= 60% of the roofline ({r['engine']}, ratio {r['ratio']})",
                        "value": f"{100 * r['roofline_frac']:.0f}%", "ok": ok})
    print(table(rows))
    for t in targets:
        print(f"- {'PASS' if t['ok'] else 'FAIL'}: {t['target']}: {t['value']}")
    if not checked:
        print("- no offload row is disk bound on this machine (compute-bound rate below the disk-bound one): "
              "raise --ratios")
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "shape": SHAPE, "checkpoint_bytes": size,
                               "ratios": ratios, "tokens": args.tokens, "disk_read_bytes_s": disk_bw,
                               "disk_direct": direct, "disk_samples": [r[0] for r in rates], "rows": rows,
                               "targets": targets}, indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
