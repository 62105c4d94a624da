"""Decode benchmark: Ember (float, int8, int4, nf4; a dense and an MoE model) vs HF transformers.

Rows, all batch 1, a 128-token prompt, 128 new tokens (greedy, EOS ignored):

* a random TinyLlama-shape Llama checkpoint in each of ``--dtypes`` (bf16, fp32): Ember and HF;
* the bf16 checkpoint quantized on load by Ember each way in ``--quant`` (int8, int4 group 128, nf4);
* a random Mixtral-shape MoE checkpoint (8 experts, top-2) in bf16: Ember;
* (``--families``) a random Gemma-3-shape dense checkpoint (sandwich norms, GeGLU, 5 sliding : 1 global layers,
  tied 262k-vocabulary head at "1.1b") and a DeepSeek-V3-shape one (multi-head latent attention, sigmoid-routed
  experts with a shared expert; expert bytes counted from the active experts and checked with hooks) in bf16,
  written by transformers' ``save_pretrained``; the MLA row prints its latent cache bytes per token against
  expanded keys/values and a GQA model of the same width.
* a random gpt-oss-shape checkpoint (32 experts, top-4, alternating sliding/full attention with sinks) with
  its experts in MXFP4 as the hub stores them (``*_blocks``/``*_scales``) and the rest in bf16: Ember, and again
  with ``--quant mxfp4+int8`` (the experts as stored, attention and head int8: llama.cpp's MXFP4_MOE mix).

Every row is timed the same way, in the same process: decode tok/s = 127 / (t(128 new) - t(1 new)),
so prefill is excluded; each the fastest of ``--repeats`` rounds. The bf16 row and its quantized forms
are loaded together and timed in interleaved rounds (each once per round, a bandwidth sample after each
round), so the int4 / bf16 ratio compares rows that saw the same spells of a shared machine; the float
Ember rows also run after their HF row (the faster kept), so a slow spell hits neither side alone. The
memory-bandwidth roofline is measured here with a large copy:
roofline tok/s = bandwidth / bytes that must be read per token, where bytes per token are summed
from the loaded modules (``Transformer.weight_bytes_per_token``: each tensor at its stored size, a
quantized Linear's packed codes and scales as held, one row of an untied embedding table, k of E
experts per MoE layer) plus the KV cache read at the mean context of the decode. For the MoE row the
expert part is also *measured*: forward hooks count the expert calls of the decode steps.
"resident MB" is the process RSS growth from before the load to after decoding (the mmap'd float
checkpoint's touched pages count; quantized-on-load weights are private memory).

Perplexity columns: random weights give a meaningless (near-uniform) perplexity, so the ppl of
each weight format is measured on the *trained demo model* (``ember.demo``, built once into
``bench/.cache/demo`` with its full 300-step recipe), in that format (bf16 compute), on the demo's
own bundled corpus (``ember eval ppl bench/.cache/demo --text ember/data/demo_corpus.txt`` gives
the bf16 number); the ratio is vs that model in bf16. The demo trains on the whole corpus and
memorises it, so on unseen text its ppl is close to uniform (~1000 of a 1024 vocabulary) and says
nothing about quantization error: that held-out number is printed below the table, not used.
What the corpus ppl measures is how well each format preserves the function the model learned. Targets (issue): int4 decode
>= 2.5x Ember bf16 tok/s; every Ember row >= 60% of its roofline; int8 ppl within 1%, int4 within 5%
of bf16. Prints a table; writes JSON.

    python bench/decode.py                 # 1.1B TinyLlama dims (+ ~1.2B Mixtral-shape MoE)
    python bench/decode.py --size small    # a quick run: 110M Llama, 170M MoE (well under 2 minutes
                                           # once bench/.cache/demo exists; building it takes ~1 min)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_ppl import demo_perplexities  # noqa: E402
from models import (FAMILY_SIZES, GPT_OSS_SIZES, MOE_SIZES, SIZES, write_checkpoint,  # noqa: E402
                    write_family_checkpoint, write_gpt_oss_checkpoint)

WARMUP_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=32000)
DEMO_CACHE = Path(__file__).resolve().parent / ".cache" / "demo"
DEADLINE: list[float] = []  # --time-limit: past this time.monotonic(), each row stops after its first timing round


def more_rounds(done: int) -> bool:
    """Whether a row that has ``done`` timing rounds takes another (always its first; the rest before the
    ``--time-limit`` deadline)."""
    return done == 0 or not DEADLINE or time.monotonic() < DEADLINE[0]

# Text the demo model never saw (its subjects and plain style, none of its sentences): the demo
# memorises its corpus, so ppl here is near uniform; printed as a caveat, not used for the ratios.


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in bytes/s: a large copy (read + write counted) and a large sum (read only)."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); dst.copy_(src); best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter(); src.sum(); best_read = min(best_read, time.perf_counter() - t)
    del src, dst
    release_memory()
    return {"copy": 2 * n * 4 / best_copy, "read": n * 4 / best_read}


def rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next RSS delta starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def module_bytes(m: torch.nn.Module) -> int:
    """Stored bytes of a module's parameters and buffers (each tensor once; quantized codes as held)."""
    seen, total = set(), 0
    for t in m.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(cfg, elem: int, prompt: int, new: int) -> int:
    """KV-cache bytes one decode step reads, at the mean context of a ``prompt`` + ``new`` decode: each layer's
    keys/values per token as its cache holds them (MLA: the latent and the rotated key, read once)."""
    from ember.cache import bytes_per_token, layer_specs

    mean_ctx = prompt + new / 2
    dtype = {2: torch.bfloat16, 4: torch.float32}[elem]
    return round(sum(bytes_per_token(s, dtype) for s in layer_specs(cfg)) * mean_ctx)


class ExpertCounter:
    """Forward hooks on every MoE expert: calls, tokens and stored bytes of the experts that ran."""

    def __init__(self, model) -> None:
        from ember.models import SparseMoE

        self.calls = self.tokens = self.bytes = 0
        self.moe_layers = 0
        self.handles = []
        for layer in model.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                self.moe_layers += 1
                for expert in layer.mlp.experts:
                    self.handles.append(expert.register_forward_hook(self._hook(module_bytes(expert))))

    def _hook(self, nbytes: int):
        def hook(mod, inputs, output):
            x = inputs[0]
            self.calls += 1
            self.tokens += x.numel() // x.shape[-1]
            self.bytes += nbytes
        return hook

    def snapshot(self) -> tuple[int, int, int]:
        return self.calls, self.tokens, self.bytes

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class EmberRow:
    """One Ember row's loaded model, timed in rounds (:meth:`time_round`) alone or interleaved with other rows.

    Loading measures the resident memory: RSS growth from before the load to after it, and to after a
    first (warm-up) decode. Each round times 1 and ``new`` new tokens back to back; a round's decode rate
    is (new - 1) / (t(new) - t(1)), so prefill is excluded, and the row keeps its best round.
    """

    def __init__(self, folder: Path, dtype: str, prompt: list[int], new: int, quant: str | None = None,
                 group_size: int | None = None, check_experts: bool = False) -> None:
        import ember
        from ember.sampling import SamplingParams

        release_memory()
        rss0 = rss_bytes()
        self.llm = ember.load(folder, device="cpu", dtype=dtype, quant=quant, group_size=group_size)
        rss_load = rss_bytes()
        self.prompt, self.new = prompt, new
        self.p1 = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        self.pn = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        self._run(self.p1)  # warm-up
        res = self._run(self.pn)[1]
        assert len(res.token_ids) == new
        rss_run = rss_bytes()
        model = self.llm.model
        cfg = model.config
        weights = model.weight_bytes_per_token()
        kv = kv_bytes_per_token(cfg, torch.empty(0, dtype=self.llm.dtype).element_size(), len(prompt), new)
        self.out = {"bytes_per_token": weights + kv, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
                    "tensor_bytes": module_bytes(model),
                    "rss_after_load": rss_load - rss0 if rss0 is not None else None,
                    "rss_after_decode": rss_run - rss0 if rss0 is not None else None, "tokens": res.token_ids}
        if check_experts and cfg.num_local_experts:
            self.out["expert_check"] = check_expert_reads(self.llm, prompt, new, self.p1, self.pn)
        self.rates: list[float] = []
        self.prefills: list[float] = []

    def _run(self, params):
        t = time.perf_counter()
        res = self.llm.generate(self.prompt, params)
        return time.perf_counter() - t, res

    def time_round(self) -> float:
        """Time one round; returns its decode tok/s."""
        t1 = self._run(self.p1)[0]
        tn = self._run(self.pn)[0]
        self.prefills.append(t1)
        self.rates.append((self.new - 1) / (tn - t1))
        return self.rates[-1]

    def result(self) -> dict:
        return {**self.out, "prefill_s": min(self.prefills), "decode_tok_s": max(self.rates),
                "runs_tok_s": list(self.rates)}

    def close(self) -> None:
        del self.llm
        release_memory()


def time_ember(folder: Path, dtype: str, prompt: list[int], new: int, repeats: int, quant: str | None = None,
               group_size: int | None = None, check_experts: bool = False) -> dict:
    """Ember decode tok/s (best of ``repeats`` rounds), bytes read per token (from the loaded modules) and
    resident memory for one row timed on its own."""
    row = EmberRow(folder, dtype, prompt, new, quant, group_size, check_experts)
    for i in range(repeats):
        if not more_rounds(i):
            break
        row.time_round()
    out = row.result()
    row.close()
    return out


def check_expert_reads(llm, prompt: list[int], new: int, p1, pn) -> dict:
    """Count the experts executed by the decode steps (hooks); compare the bytes with the stated k/E share."""
    model, cfg = llm.model, llm.model.config
    counter = ExpertCounter(model)
    try:
        a = counter.snapshot()
        llm.generate(prompt, p1)  # prefill only
        b = counter.snapshot()
        llm.generate(prompt, pn)  # prefill + new-1 decode steps
        c = counter.snapshot()
    finally:
        counter.remove()
    steps = new - 1
    calls, tokens, nbytes = (c[i] - b[i] - (b[i] - a[i]) for i in range(3))  # decode steps only
    all_experts = sum(module_bytes(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    stated_share = all_experts * cfg.num_experts_per_tok / cfg.num_local_experts
    weights = model.weight_bytes_per_token()
    return {"decode_steps": steps, "expert_calls_per_step": calls / steps,
            "expert_tokens_per_layer_per_step": tokens / steps / counter.moe_layers,
            "top_k": cfg.num_experts_per_tok, "num_experts": cfg.num_local_experts,
            "stated_expert_bytes_per_token": round(stated_share), "measured_expert_bytes_per_token": round(nbytes / steps),
            "stated_weight_bytes_per_token": weights,
            "measured_weight_bytes_per_token": round(weights - stated_share + nbytes / steps)}


def time_hf(folder: Path, dtype: torch.dtype, prompt: list[int], new: int, repeats: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(1)
    t1 = min(run(1)[0] for _ in range(repeats))
    tn, toks = min((run(new) for _ in range(repeats)), key=lambda x: x[0])
    del model
    release_memory()
    return {"prefill_s": t1, "decode_tok_s": (new - 1) / (tn - t1), "tokens": toks}


def label(dtype: str, quant: str | None, group: int | None) -> str:
    if quant == "int4":
        return f"int4-g{group}"
    return quant or dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--dtypes", default="bf16,fp32", help="float checkpoints: Ember and HF rows")
    ap.add_argument("--quant", default="none,int8,int4,nf4",
                    help="Ember rows for the bf16 checkpoint quantized on load (none = the float row only)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size of the decode rows")
    ap.add_argument("--no-moe", action="store_true", help="skip the MoE row")
    ap.add_argument("--no-gpt-oss", action="store_true", help="skip the gpt-oss (MXFP4 experts) row")
    ap.add_argument("--moe-quant", default="none", help="also quantize the MoE model these ways (e.g. int4)")
    ap.add_argument("--families", action="store_true",
                    help="add the Gemma-3-shape and DeepSeek-V3-shape (MLA + routed MoE) rows")
    ap.add_argument("--only-families", action="store_true", help="only the families' rows (implies --families)")
    ap.add_argument("--no-ppl", action="store_true", help="skip the demo-model perplexity columns")
    ap.add_argument("--demo-dir", default=str(DEMO_CACHE), help="where the demo model is built / reused")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4,
                    help="timed rounds per row; the fastest is kept (shared machines)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hybrid", choices=["none", "small", "1b"], default="none",
                    help="also the hybrid rows of bench/hybrid.py (Qwen3.5- and Nemotron-H-shape) at this size")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: past this, every row stops after its first timing round (rows still all run)")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args()
    if args.time_limit:
        DEADLINE.append(time.monotonic() + args.time_limit)
    t_start = time.perf_counter()

    torch.manual_seed(0)
    bw = measure_bandwidth()
    print(f"memory bandwidth: copy {bw['copy'] / 1e9:.1f} GB/s (read+write), read-only sum {bw['read'] / 1e9:.1f} GB/s")
    dims = SIZES[args.size]
    prompt = torch.randint(3, dims["vocab_size"], (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    dtypes = [d for d in args.dtypes.split(",") if d]
    quants = [q for q in args.quant.split(",") if q and q != "none"]
    if args.only_families:
        args.families, args.no_moe, args.no_ppl, dtypes, quants = True, True, True, [], []
    moe_quants = [q for q in args.moe_quant.split(",") if q and q != "none"]
    rows: list[dict] = []
    names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

    def remeasure() -> None:
        """Bandwidth again between rows: on a shared machine it drifts; the roofline uses the best seen."""
        now = measure_bandwidth(0.5, 3)
        bw["samples"].append(now["copy"])
        bw["copy"], bw["read"] = max(bw["copy"], now["copy"]), max(bw["read"], now["read"])

    bw["samples"] = [bw["copy"]]

    def add_row(model: str, dt: str, quant: str | None, e: dict, group: int | None = None, sample: bool = True) -> dict:
        if sample:
            remeasure()
        roof = bw["copy"] / e["bytes_per_token"]
        row = {"model": model, "weights": label(dt, quant, group), "compute_dtype": dt, "quant": quant or "none",
               "engine": "ember", "decode_tok_s": e["decode_tok_s"], "prefill_s": e["prefill_s"],
               "bytes_per_token": e["bytes_per_token"], "weight_bytes_per_token": e["weight_bytes_per_token"],
               "kv_bytes_per_token": e["kv_bytes_per_token"], "roofline_tok_s": roof,
               "roofline_frac": e["decode_tok_s"] / roof, "tensor_bytes": e["tensor_bytes"],
               "rss_after_load_bytes": e["rss_after_load"], "rss_after_decode_bytes": e["rss_after_decode"],
               "runs_tok_s": e.get("runs_tok_s")}
        if "expert_check" in e:
            row["expert_check"] = e["expert_check"]
        rows.append(row)
        print(f"[{model} {row['weights']}] ember {e['decode_tok_s']:.2f} tok/s", file=sys.stderr)
        return row

    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        # One-time runtime set-up (thread pools, kernel caches) would otherwise land in the first
        # row's resident MB: run every code path once on a tiny model first.
        tiny = Path(tmp) / "warmup"
        write_checkpoint(tiny, WARMUP_DIMS, torch.bfloat16)
        for q in [None] + (quants if dtypes else []):
            time_ember(tiny, "bf16", prompt[:16], 4, 1, quant=q, group_size=32 if q == "int4" else None)
        need = list(dict.fromkeys(dtypes + (["bf16"] if quants else [])))
        for dt in need:
            folder = Path(tmp) / dt
            t = time.perf_counter()
            write_checkpoint(folder, dims, names[dt])
            print(f"[{dt}] wrote random checkpoint in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            group: list[tuple[str | None, EmberRow]] = []
            if dt == "bf16" and quants:
                # The bf16 row and its quantized forms are loaded together and timed in interleaved rounds
                # (a round times each once, starting one later each time; a bandwidth sample per round): on a
                # shared VM whose bandwidth moves within seconds, rows timed one after another minutes apart
                # compare the machine's moods as much as the formats.
                for q in [None] + quants:
                    group.append((q, EmberRow(folder, "bf16", prompt, args.new, quant=q,
                                              group_size=args.group_size if q == "int4" else None)))
                for i in range(args.repeats):
                    if not more_rounds(i):
                        break
                    for q, r in group[i % len(group):] + group[:i % len(group)]:
                        rate = r.time_round()
                        print(f"[{dt} {q or 'float'}] round {i + 1}: {rate:.2f} tok/s", file=sys.stderr)
                    remeasure()
            if dt in dtypes:
                e = group[0][1].result() if group else time_ember(folder, dt, prompt, args.new, args.repeats)
                row = add_row("llama", dt, None, e, sample=not group)
                if not args.no_hf:
                    h = time_hf(folder, names[dt], prompt, args.new, args.repeats)
                    same = sum(a == b for a, b in zip(h["tokens"], e["tokens"]))
                    rows.append({"model": "llama", "weights": dt, "compute_dtype": dt, "quant": "none",
                                 "engine": "hf-transformers", "decode_tok_s": h["decode_tok_s"],
                                 "prefill_s": h["prefill_s"], "bytes_per_token": e["bytes_per_token"],
                                 "roofline_tok_s": row["roofline_tok_s"],
                                 "roofline_frac": h["decode_tok_s"] / row["roofline_tok_s"],
                                 "greedy_tokens_equal": f"{same}/{args.new}"})
                    print(f"[{dt}] hf {h['decode_tok_s']:.2f} tok/s", file=sys.stderr)
                    # Ember again after HF, so a slow spell of a shared machine cannot favour either side.
                    if group:  # one more round of the loaded bf16 row
                        group[0][1].time_round()
                        again = {"decode_tok_s": group[0][1].rates[-1]}
                    else:
                        again = time_ember(folder, dt, prompt, args.new, args.repeats)
                    row["ember_runs_tok_s"] = [e["decode_tok_s"], again["decode_tok_s"]]
                    row["decode_tok_s"] = max(row["ember_runs_tok_s"])
                    row["speedup_vs_hf"] = row["decode_tok_s"] / h["decode_tok_s"]
                    print(f"[{dt}] ember again {again['decode_tok_s']:.2f} tok/s", file=sys.stderr)
            for q, r in group[1:]:
                row = add_row("llama", "bf16", q, r.result(), args.group_size, sample=False)
                # For context (the target compares each row's best round): the ratio to bf16 within each round,
                # whose rows ran within seconds of each other.
                row["round_ratios_vs_bf16"] = [a / b for a, b in zip(r.rates, group[0][1].rates[:args.repeats])]
            for _, r in group:
                r.close()
            group.clear()
            for p in folder.iterdir():  # free the disk before the next checkpoint
                p.unlink()
        if not args.no_moe:
            moe_dims = MOE_SIZES[args.size]
            folder = Path(tmp) / "moe"
            t = time.perf_counter()
            write_checkpoint(folder, moe_dims, torch.bfloat16)
            print(f"[moe] wrote random checkpoint in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            for q in [None] + moe_quants:
                e = time_ember(folder, "bf16", prompt, args.new, args.repeats, quant=q,
                               group_size=args.group_size if q == "int4" else None, check_experts=True)
                add_row("mixtral-moe", "bf16", q, e, args.group_size)
        if args.families:
            for model_name, (config_class, fdims) in FAMILY_SIZES[args.size].items():
                folder = Path(tmp) / model_name
                t = time.perf_counter()
                write_family_checkpoint(folder, config_class, fdims, torch.bfloat16)
                print(f"[{model_name}] wrote random checkpoint in {time.perf_counter() - t:.1f}s", file=sys.stderr)
                e = time_ember(folder, "bf16", [i % fdims["vocab_size"] for i in prompt], args.new, args.repeats,
                               check_experts=True)
                row = add_row(model_name, "bf16", None, e)
                if config_class == "DeepseekV3Config":
                    row["mla_cache"] = mla_cache_comparison(folder)
                for p in folder.iterdir():
                    p.unlink()
        if not args.no_gpt_oss:
            folder = Path(tmp) / "gpt-oss"
            t = time.perf_counter()
            write_gpt_oss_checkpoint(folder, GPT_OSS_SIZES[args.size])
            print(f"[gpt-oss] wrote random MXFP4 checkpoint in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            e = time_ember(folder, "bf16", prompt, args.new, args.repeats)
            add_row("gpt-oss", "bf16", "mxfp4", e)
            # llama.cpp's MXFP4_MOE mix: the experts as stored, attention and head in 8 bits
            e = time_ember(folder, "bf16", prompt, args.new, args.repeats, quant="mxfp4+int8")
            add_row("gpt-oss", "bf16", "mxfp4+int8", e)

    # Every row against the best bandwidth of the whole run (a conservative roofline: the targets use it) and,
    # for context, against the median sample: a shared VM's bandwidth moves within seconds (26-43 GB/s on the
    # same buffers on the 2-core Zen 4 EPYC), and a row of 10-30 s sees the mix, not the best moment.
    bw["median"] = statistics.median(bw["samples"])
    for r in rows:
        r["roofline_tok_s"] = bw["copy"] / r["bytes_per_token"]
        r["roofline_frac"] = r["decode_tok_s"] / r["roofline_tok_s"]
        r["median_roofline_frac"] = r["decode_tok_s"] * r["bytes_per_token"] / bw["median"]

    ppl = None
    if not args.no_ppl:
        formats = [d for d in dtypes if d in ("fp32", "bf16")]
        formats = list(dict.fromkeys(formats + ["bf16"] + quants))
        ppl = demo_perplexities(formats, Path(args.demo_dir), window=512, stride=256)
        release_memory()
        for r in rows:
            f = ppl["formats"].get(r["weights"] if r["quant"] != "int4" else "int4")
            if r["engine"] == "ember" and r["model"] == "llama" and f:
                r.update(demo_ppl=f["train_ppl"], demo_ppl_ratio=f.get("train_ratio"),
                         demo_heldout_ppl=f["heldout_ppl"], demo_heldout_ppl_ratio=f.get("heldout_ratio"))

    base = next((r for r in rows if r["engine"] == "ember" and r["model"] == "llama" and r["weights"] == "bf16"), None)
    moe_base = next((r for r in rows if r["model"] == "mixtral-moe" and r["quant"] == "none"), None)
    for r in rows:
        ref = base if r["model"] == "llama" else moe_base if r["model"] == "mixtral-moe" else None
        if ref and r["engine"] == "ember":
            r["vs_ember_bf16"] = r["decode_tok_s"] / ref["decode_tok_s"]

    from ember.hardware import cpu_name

    machine = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, {args.device}"
    md = MOE_SIZES[args.size]
    shown = [] if args.only_families else [f"{args.size} Llama ({dims['num_hidden_layers']} layers, hidden "
                                           f"{dims['hidden_size']})"]
    if not args.no_moe:
        shown.append(f"Mixtral-shape MoE ({md['num_hidden_layers']} layers, hidden {md['hidden_size']}, "
                     f"{md['num_local_experts']} experts top-{md['num_experts_per_tok']})")
    if args.families:
        shown += [f"{m} ({d['num_hidden_layers']} layers, hidden {d['hidden_size']})"
                  for m, (_, d) in FAMILY_SIZES[args.size].items()]
    if not args.no_gpt_oss:
        go = GPT_OSS_SIZES[args.size]
        shown.append(f"gpt-oss shape ({go['num_hidden_layers']} layers, hidden {go['hidden_size']}, "
                     f"{go['num_local_experts']} experts top-{go['num_experts_per_tok']}, MXFP4 experts)")
    print(f"\nDecode, {', '.join(shown)}, random weights; batch 1, "
          f"prompt {args.prompt_len}, {args.new} new tokens; {date.today()}; {machine}")
    print(f"roofline = copy bandwidth {bw['copy'] / 1e9:.1f} GB/s (the best of {len(bw['samples'])} measurements between rows and timing rounds: "
          f"{', '.join(f'{b / 1e9:.0f}' for b in bw['samples'])} GB/s) / bytes read per token (weights as stored + KV); "
          f"% median = the same at the median sample ({bw['median'] / 1e9:.1f} GB/s); "
          f"resident MB = RSS growth, load to after decode; "
          f"tensor MB = bytes of the model's parameters and buffers")
    if ppl:
        print(f"demo ppl = perplexity of the trained *demo model* (ember.demo, 4 layers, hidden 192), not of the "
              f"random bench model, in that weight format, on its corpus ({ppl['train_tokens']} tokens, window "
              f"{ppl['window']}, stride {ppl['stride']}); int4 there uses group size {ppl['int4_group_size']} "
              f"(hidden 192 is not a multiple of 128)")
    print()
    hdr = (f"| {'model':11} | {'weights':9} | {'engine':15} | {'decode tok/s':>12} | {'vs bf16':>7} | {'MB/token':>8} | "
           f"{'roofline tok/s':>14} | {'% roofline':>10} | {'% median':>8} | {'resident MB':>11} | {'tensor MB':>9} | {'demo ppl':>8} | {'ppl/bf16':>8} | "
           f"{'vs HF':>6} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        vs = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""
        vb = f"{r['vs_ember_bf16']:.2f}x" if "vs_ember_bf16" in r else ""
        res = f"{r['rss_after_decode_bytes'] / 1e6:.0f}" if r.get("rss_after_decode_bytes") is not None else ""
        tm = f"{r['tensor_bytes'] / 1e6:.0f}" if "tensor_bytes" in r else ""
        pp = f"{r['demo_ppl']:.3f}" if "demo_ppl" in r else ""
        pr = f"{r['demo_ppl_ratio']:.4f}" if r.get("demo_ppl_ratio") is not None else ""
        print(f"| {r['model']:11} | {r['weights']:9} | {r['engine']:15} | {r['decode_tok_s']:12.2f} | {vb:>7} | "
              f"{r['bytes_per_token'] / 1e6:8.1f} | {r['roofline_tok_s']:14.2f} | {100 * r['roofline_frac']:9.1f}% | "
              f"{100 * r['median_roofline_frac']:7.1f}% | "
              f"{res:>11} | {tm:>9} | {pp:>8} | {pr:>8} | {vs:>6} |")

    for r in rows:
        if r.get("round_ratios_vs_bf16"):
            rr = r["round_ratios_vs_bf16"]
            print(f"{r['weights']} / bf16 within each timing round: {', '.join(f'{x:.2f}' for x in rr)} "
                  f"(median {statistics.median(rr):.2f}x; the table's vs bf16 divides best rounds)")
    for r in rows:
        m = r.get("mla_cache")
        if m:
            print(f"\nMLA cache ({r['model']}), bytes per token per layer in bf16: latent {m['latent']} (what Ember "
                  f"keeps and a decode step reads) vs {m['expanded_kv']} for expanded keys/values of every head "
                  f"({m['expanded_kv'] / m['latent']:.1f}x) and {m['gqa_same_width']} for a GQA model of the same width")
    for r in rows:
        c = r.get("expert_check")
        if c:
            print(f"\nMoE ({r['weights']}) bytes/token check over {c['decode_steps']} decode steps: "
                  f"{c['expert_calls_per_step']:.2f} expert calls per step = "
                  f"{c['expert_tokens_per_layer_per_step']:.2f} per MoE layer (top-{c['top_k']} of {c['num_experts']}); "
                  f"expert bytes/token measured {c['measured_expert_bytes_per_token'] / 1e6:.2f} MB vs stated "
                  f"{c['stated_expert_bytes_per_token'] / 1e6:.2f} MB; weight bytes/token measured "
                  f"{c['measured_weight_bytes_per_token'] / 1e6:.2f} MB vs stated {c['stated_weight_bytes_per_token'] / 1e6:.2f} MB")
    if ppl:
        print(f"\ndemo-model perplexity: its corpus ({ppl['train_tokens']} tokens) | unseen text "
              f"({ppl['heldout_tokens']} tokens; near uniform, the demo memorises its corpus, not used):")
        for fmt, f in ppl["formats"].items():
            print(f"  {fmt:16} corpus {f['train_ppl']:7.3f} (x{f.get('train_ratio', float('nan')):.4f})   "
                  f"unseen {f['heldout_ppl']:8.2f} (x{f.get('heldout_ratio', float('nan')):.4f})")

    hybrid_rows = None
    if args.hybrid != "none":  # after the Llama/MoE rows, against the same bandwidth
        import hybrid

        hybrid_rows = hybrid.run_rows(args.hybrid, args.prompt_len, args.new, args.repeats, bw)
        hybrid.print_rows(hybrid_rows, bw)
    targets = check_targets(rows)
    print("\ntargets:")
    for t in targets:
        print(f"  [{'PASS' if t['ok'] else 'FAIL' if t['ok'] is False else 'n/a '}] {t['target']}: {t['value']}")
    elapsed = time.perf_counter() - t_start
    print(f"\n({elapsed:.0f}s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "size": args.size, "dims": dims,
                               "moe_dims": None if args.no_moe else MOE_SIZES[args.size],
                               "bandwidth_bytes_s": bw, "rows": rows, "hybrid_rows": hybrid_rows, "demo_ppl": ppl,
                               "targets": targets,
                               "gpt_oss_dims": None if args.no_gpt_oss else GPT_OSS_SIZES[args.size],
                               "seconds": elapsed}, indent=2))
    print(f"wrote {out}")


def mla_cache_comparison(folder: Path) -> dict:
    """Cache bytes per token per layer (bf16) of the MLA checkpoint: its latent (what Ember keeps), the expanded
    keys/values of every head, and a GQA model of the same width (hidden / 128 heads of 128, 4 query heads per kv
    head: the common layout)."""
    from ember.cache import bytes_per_token, layer_specs
    from ember.config import ModelConfig

    cfg = ModelConfig.from_file(folder)
    latent = bytes_per_token(layer_specs(cfg)[0], torch.bfloat16)
    expanded = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    gqa = 2 * 2 * max(1, cfg.hidden_size // 128 // 4) * 128
    return {"latent": latent, "expanded_kv": expanded, "gqa_same_width": gqa}


def check_targets(rows: list[dict]) -> list[dict]:
    """The issues' targets, each with the measured value and PASS/FAIL (None when a row is missing)."""
    ember_rows = [r for r in rows if r["engine"] == "ember"]
    by = {(r["model"], r["weights"].split("-")[0]): r for r in ember_rows}
    out = []
    bf16 = by.get(("llama", "bf16"))
    for dt in ("bf16", "fp32"):
        r = by.get(("llama", dt))
        sp = r.get("speedup_vs_hf") if r else None
        out.append({"target": f"Ember {dt} decode >= 2x HF transformers (same run)", "ok": None if sp is None else sp >= 2,
                    "value": f"{sp:.2f}x" if sp is not None else "missing"})
    out.append({"target": "Ember bf16 decode >= 70% of the bandwidth roofline",
                "ok": None if bf16 is None else bf16["roofline_frac"] >= 0.7,
                "value": f"{100 * bf16['roofline_frac']:.0f}%" if bf16 else "missing"})
    int4, bf16 = by.get(("llama", "int4")), by.get(("llama", "bf16"))
    sp = int4["decode_tok_s"] / bf16["decode_tok_s"] if int4 and bf16 else None
    out.append({"target": "int4 decode >= 2.5x Ember bf16 tok/s", "ok": None if sp is None else sp >= 2.5,
                "value": f"{sp:.2f}x" if sp is not None else "missing"})
    low = [f"{r['model']} {r['weights']} {100 * r['roofline_frac']:.0f}%" for r in ember_rows if r["roofline_frac"] < 0.6]
    out.append({"target": "every Ember row >= 60% of its roofline", "ok": not low,
                "value": ("below: " + ", ".join(low)) if low else
                f"lowest {min(100 * r['roofline_frac'] for r in ember_rows):.0f}%"})
    for mode, limit in (("int8", 0.01), ("int4", 0.05)):
        r = by.get(("llama", mode))
        ratio = r.get("demo_ppl_ratio") if r else None
        out.append({"target": f"{mode} demo-model ppl within {100 * limit:.0f}% of bf16",
                    "ok": None if ratio is None else abs(ratio - 1) <= limit,
                    "value": f"x{ratio:.4f}" if ratio is not None else "missing"})
    return out


if __name__ == "__main__":
    main()
