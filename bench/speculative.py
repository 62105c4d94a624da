"""Speculative decoding benchmark: plain vs draft-model vs n-gram decode at batch 1, and serving at 4 streams.

A target of ~80M parameters (``bench/decode.py``'s "small" shape: 768 hidden, 12 layers) and a ~10x smaller
draft are trained here on the bundled demo corpus with ``ember demo``'s recipe (the same byte-level BPE
tokenizer, so the draft shares the target's vocabulary), so acceptance is real: both learn the corpus, and on
corpus-style prompts they agree often. Training stops at ``--*-steps`` or after ``--train-minutes`` of wall time
for both models together (the target gets 70% of it), whichever comes first (the LR schedule follows whichever
is further along); the trained models are cached under a folder named by every training setting (shape, steps,
seed, minutes, LR) below ``$EMBER_BENCH_CACHE`` (default ``<tmp>/ember-bench-speculative``), so a rerun with the
same settings skips training. With the defaults a first run on a quiet 2-core machine takes about half an hour of
training (``--train-only`` trains one model, for two parallel one-thread processes) and 3-4 minutes of timed runs.

At batch 1 decode streams every weight once per token, so the target's size is what makes a verification pass
over ``k + 1`` rows cost about one step (``ember_decode_rows``); at a few million parameters fixed per-call costs
dominate instead. The timed runs are fp32 by default (docs/speculative.md, "Benchmark"); the first line printed
is the single-thread CPU time of a ``k + 1``-row pass over a one-token step.

Rows, each greedy, ``--new`` tokens, EOS ignored, decode tok/s of ``Engine.generate`` (prefill excluded), the
median of ``--repeats`` runs, plain and speculative runs interleaved so a slow spell of a shared machine hits
both:

* ``draft``: held-out corpus-style prompts (sentences the corpus does not contain), plain vs ``--draft``;
* ``ngram``: an edit-style prompt that repeats its input (a corpus paragraph, then its opening words again),
  plain vs ``--speculate ngram``;
* ``low-hit``: a prompt of shuffled corpus words, where proposals rarely hit: plain vs n-gram and vs the
  draft, both adaptive (the controller should switch speculation off: within 5% of plain);
* ``serve``: 4 streams through the continuous-batching scheduler (the held-out prompts), total generated
  tokens / wall time, plain vs draft vs n-gram (median of ``--repeats`` interleaved rounds); and 4 streams of the
  low-hit prompt, where the batch's controller should keep speculation within 5% of plain serving.

Targets (issue 29): draft >= 2.0x, n-gram >= 1.5x on the repeating prompt, low-hit >= 0.95x, serve faster with
speculation (and >= 0.95x on the low-hit prompt). Acceptance rates and tokens per weight pass come from the
runs' own counters. Prints a table; writes JSON (``--out``).

    python bench/speculative.py --threads 2           # default sizes (first run trains both models)
    python bench/speculative.py --target-hidden 384 --target-layers 6 --target-inter 1024 \
        --draft-hidden 128 --draft-layers 2 --draft-inter 384          # small models: a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path(os.environ.get("EMBER_BENCH_CACHE") or Path(tempfile.gettempdir()) / "ember-bench-speculative")

# Sentences in the corpus's subjects and plain style that the corpus does not contain.
HELDOUT_PROMPTS = [
    "The morning was quiet in the little town. The baker",
    "By the sea the wind was cold, and the fishermen",
    "In the kitchen the old woman made soup. She",
    "At night the sky over the hills was clear, and the",
]


def _config(vocab: int, hidden: int, layers: int, heads: int, kv: int, inter: int):
    from ember.demo import demo_model_config

    cfg = demo_model_config(vocab)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = hidden, layers, inter
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
    cfg.head_dim = hidden // heads
    return cfg


def build(name: str, tok, cfg, steps: int, seed: int, minutes: float, lr: float) -> tuple[Path, dict]:
    """Train (or reuse) a model of ``cfg`` on the demo corpus for at most ``steps`` steps and ``minutes`` minutes
    (the LR schedule paced by whichever runs out first); returns its folder and training report."""
    from ember.checkpoint_io import save_hf_checkpoint
    from ember.demo import generation_config, tokenizer_config, train_demo_model

    folder = CACHE / (f"spec-{name}-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-i{cfg.intermediate_size}"
                      f"-s{steps}-seed{seed}-m{minutes:g}-lr{lr:g}")
    report_file = folder / "train_report.json"
    if report_file.is_file():
        return folder, json.loads(report_file.read_text())
    with torch.random.fork_rng(devices=[]):
        model, report = train_demo_model(tok, seed=seed, steps=steps, progress=True, time_limit=60 * minutes,
                                         config=cfg, peak_lr=lr, pace_by_time=True)
    report["params"] = sum(p.numel() for p in model.parameters())
    save_hf_checkpoint(folder, model, tokenizer_files={
        "tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tokenizer_config(tok), indent=2) + "\n"},
        generation_config=generation_config(tok), overwrite=True,
        extra_files={"train_report.json": json.dumps(report)})
    return folder, report


def edit_prompt() -> str:
    """An edit-style prompt: a corpus paragraph, then its opening words again (the answer repeats the input)."""
    from ember.demo import corpus_documents

    prose, _ = corpus_documents()
    para = max(prose[:12], key=len)
    return f"{para}\n\n{' '.join(para.split()[:6])}"


def low_hit_prompt(seed: int = 0) -> str:
    """Corpus words in a random order: no continuation the models know, nothing in the prompt to repeat."""
    from ember.demo import corpus_documents

    words = " ".join(corpus_documents()[0]).split()
    rng = random.Random(seed)
    return " ".join(rng.sample(words, 60))


def decode_row(llm, prompt: str, new: int, repeats: int, spec: dict | None, chat: bool = False) -> dict:
    """Median decode tok/s of ``repeats`` greedy runs, speculating as ``spec`` says (None: plain)."""
    rates, stats, tokens = [], None, None
    for _ in range(repeats):
        llm.speculate(**spec) if spec else llm.speculate()
        out = llm.generate(prompt, max_new_tokens=new, temperature=0, ignore_eos=True, chat=chat)
        llm.speculate()
        rates.append(out.stats.decode_tok_s)
        stats, tokens = out.stats, out.token_ids
    s = stats.speculation
    return {"tok_s": statistics.median(rates), "runs": rates, "tokens": tokens,
            "acceptance": s.acceptance if s else None, "tokens_per_pass": s.tokens_per_pass if s else 1.0,
            "proposed": s.proposed if s else 0}


def compare(llm, prompt: str, new: int, repeats: int, specs: dict[str, dict]) -> dict[str, dict]:
    """Plain and each speculative setting, interleaved round by round."""
    rows: dict[str, list] = {"plain": [], **{k: [] for k in specs}}
    for _ in range(repeats):
        rows["plain"].append(decode_row(llm, prompt, new, 1, None))
        for k, spec in specs.items():
            rows[k].append(decode_row(llm, prompt, new, 1, spec))
    out = {}
    for k, runs in rows.items():
        last = runs[-1]
        out[k] = {**last, "tok_s": statistics.median(r["tok_s"] for r in runs), "runs": [r["tok_s"] for r in runs]}
    for k in specs:
        if out[k]["tokens"] != out["plain"]["tokens"]:
            raise SystemExit(f"{k}: greedy output differs from plain decoding (a bug: it must be identical)")
    return out


def pass_cost(llm, k: int, repeats: int = 9) -> dict:
    """Single-thread CPU seconds of a one-token step and of a ``k + 1``-row verification pass (the runtime's rows
    call), the median of ``repeats`` interleaved rounds after a 64-token prompt: the ratio says what speculation
    can gain (a pass emits at most ``k + 1`` tokens)."""
    from ember.cache import StaticKVCache

    model = llm.model
    p = model.model.norm.weight
    cache = StaticKVCache(model.config, 1, 64 + 2 * repeats * (k + 2) + 8, p.dtype, p.device)
    session, V = object(), model.config.vocab_size
    times: dict[int, list[float]] = {1: [], k + 1: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: other threads' spin-waits would count too
    with torch.inference_mode():
        model(torch.randint(0, V, (1, 64)), None, cache, 0, None, last_only=True)
        cache.advance(64)
        for _ in range(repeats):
            for T in times:
                t0 = time.process_time()
                model(torch.randint(0, V, (1, T)), None, cache, cache.pos, None, last_only=T == 1, session=session)
                times[T].append(time.process_time() - t0)
                cache.advance(T)
    torch.set_num_threads(threads)
    step, rows = statistics.median(times[1]), statistics.median(times[k + 1])
    return {"step_cpu_s": step, "pass_cpu_s": rows, "pass_over_step": rows / step}


def serve_row(llm, prompts: list[list[int]], new: int, spec: dict | None) -> dict:
    """Total generated tok/s of ``len(prompts)`` greedy streams through the scheduler."""
    from ember.sampling import SamplingParams
    from ember.scheduler import BatchScheduler, SeqRequest

    llm.speculate(**spec) if spec else llm.speculate()
    try:
        sched = BatchScheduler(llm, max_batch=len(prompts), num_blocks=256, block_size=16)
        reqs = [SeqRequest(p, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)) for p in prompts]
        t0 = time.perf_counter()
        sched.submit(reqs)
        sched.run_until_idle()
        dt = time.perf_counter() - t0
    finally:
        llm.speculate()
    m = sched.metrics()
    return {"tok_s": m["generated_tokens"] / dt, "tokens_per_pass": m.get("speculative_tokens_per_pass", 1.0),
            "acceptance": (m["speculative_accepted"] / m["speculative_proposed"]
                           if m.get("speculative_proposed") else None)}


def serve_compare(llm, prompts: list[list[int]], new: int, repeats: int, specs: dict) -> dict:
    """:func:`serve_row` plain and with each of ``specs``, interleaved over ``repeats`` rounds: the run of median
    tok/s of each."""
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name, spec in (("plain", None), *specs.items()):
            runs.setdefault(name, []).append(serve_row(llm, prompts, new, spec))
    return {name: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for name, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-hidden", type=int, default=768)
    ap.add_argument("--target-layers", type=int, default=12)
    ap.add_argument("--target-inter", type=int, default=2048)
    ap.add_argument("--draft-hidden", type=int, default=384)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--draft-inter", type=int, default=1024)
    ap.add_argument("--target-steps", type=int, default=200)
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--target-lr", type=float, default=1.5e-3, help="peak LR of the target (the demo's 3e-3 is "
                    "for its small model)")
    ap.add_argument("--draft-lr", type=float, default=3e-3)
    ap.add_argument("--train-minutes", type=float, default=100.0,
                    help="training wall time for both models at most (the target gets 70%%; the LR schedule "
                    "ends on time); cached per setting")
    ap.add_argument("--train-only", choices=("target", "draft"), default=None,
                    help="train (and cache) just this model, then exit: run the two in parallel processes with "
                    "--threads 1 each, then the bench with the same settings reuses them")
    ap.add_argument("--dtype", default="fp32", help="compute dtype of the timed runs (fp32, bf16)")
    ap.add_argument("--new", type=int, default=96, help="tokens per run")
    ap.add_argument("--k", type=int, default=4, help="--num-speculative")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/speculative.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import ember
    from ember.demo import train_tokenizer
    from ember.hardware import cpu_name

    tok = train_tokenizer()
    V = tok.get_vocab_size()
    tcfg = _config(V, args.target_hidden, args.target_layers, max(4, args.target_hidden // 64),
                   max(2, args.target_hidden // 128), args.target_inter)
    dcfg = _config(V, args.draft_hidden, args.draft_layers, max(2, args.draft_hidden // 64), 2, args.draft_inter)
    if args.train_only:
        cfg, steps, seed, share, lr = ((tcfg, args.target_steps, 0, 0.7, args.target_lr) if args.train_only == "target"
                                       else (dcfg, args.draft_steps, 1, 0.3, args.draft_lr))
        folder, rep = build(args.train_only, tok, cfg, steps, seed, round(share * args.train_minutes, 2), lr)
        print(f"{args.train_only}: {rep} -> {folder}")
        return
    tdir, trep = build("target", tok, tcfg, args.target_steps, 0, round(0.7 * args.train_minutes, 2), args.target_lr)
    ddir, drep = build("draft", tok, dcfg, args.draft_steps, 1, round(0.3 * args.train_minutes, 2), args.draft_lr)
    llm = ember.load(tdir, device="cpu", dtype=args.dtype, check_memory=False)
    draft = ember.load(ddir, device="cpu", dtype=args.dtype, check_memory=False)
    k = args.k
    cost = pass_cost(llm, k)
    D = {"draft": draft, "num_speculative": k}
    N = {"method": "ngram", "num_speculative": k}
    held = {}
    for i, p in enumerate(HELDOUT_PROMPTS):
        held[i] = compare(llm, p, args.new, args.repeats, {"draft": D})
    ngram = compare(llm, edit_prompt(), args.new, args.repeats, {"ngram": N})
    low = compare(llm, low_hit_prompt(), args.new, args.repeats, {"ngram": N, "draft": D})
    prompts = [llm.encode_prompt(p) for p in HELDOUT_PROMPTS[:args.streams]]
    while len(prompts) < args.streams:
        prompts.append(prompts[len(prompts) % len(HELDOUT_PROMPTS)])
    serve = serve_compare(llm, prompts, args.new, args.repeats, {"draft": D, "ngram": N})
    serve_low = serve_compare(llm, [llm.encode_prompt(low_hit_prompt())] * args.streams, args.new, args.repeats,
                              {"draft": D, "ngram": N})

    draft_speedups = [h["draft"]["tok_s"] / h["plain"]["tok_s"] for h in held.values()]
    rows = [
        ("draft, held-out prompts (mean of %d)" % len(held),
         statistics.mean(h["plain"]["tok_s"] for h in held.values()),
         statistics.mean(h["draft"]["tok_s"] for h in held.values()), statistics.mean(draft_speedups),
         statistics.mean(h["draft"]["acceptance"] or 0 for h in held.values()),
         statistics.mean(h["draft"]["tokens_per_pass"] for h in held.values()), ">= 2.0x"),
        ("ngram, edit prompt", ngram["plain"]["tok_s"], ngram["ngram"]["tok_s"],
         ngram["ngram"]["tok_s"] / ngram["plain"]["tok_s"], ngram["ngram"]["acceptance"],
         ngram["ngram"]["tokens_per_pass"], ">= 1.5x"),
        ("ngram, low-hit prompt", low["plain"]["tok_s"], low["ngram"]["tok_s"],
         low["ngram"]["tok_s"] / low["plain"]["tok_s"], low["ngram"]["acceptance"], low["ngram"]["tokens_per_pass"],
         ">= 0.95x"),
        ("draft, low-hit prompt", low["plain"]["tok_s"], low["draft"]["tok_s"],
         low["draft"]["tok_s"] / low["plain"]["tok_s"], low["draft"]["acceptance"], low["draft"]["tokens_per_pass"],
         ">= 0.95x"),
        (f"serve {args.streams} streams, draft", serve["plain"]["tok_s"], serve["draft"]["tok_s"],
         serve["draft"]["tok_s"] / serve["plain"]["tok_s"], serve["draft"]["acceptance"],
         serve["draft"]["tokens_per_pass"], "> 1.0x"),
        (f"serve {args.streams} streams, ngram", serve["plain"]["tok_s"], serve["ngram"]["tok_s"],
         serve["ngram"]["tok_s"] / serve["plain"]["tok_s"], serve["ngram"]["acceptance"],
         serve["ngram"]["tokens_per_pass"], "> 1.0x"),
        *((f"serve {args.streams} streams, low-hit, {m}", serve_low["plain"]["tok_s"], serve_low[m]["tok_s"],
           serve_low[m]["tok_s"] / serve_low["plain"]["tok_s"], serve_low[m]["acceptance"],
           serve_low[m]["tokens_per_pass"], ">= 0.95x") for m in ("draft", "ngram")),
    ]
    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    print(f"speculative decoding, batch 1 and {args.streams} streams, greedy, {args.new} new tokens, k={k}, "
          f"{args.dtype}; target {trep['params'] / 1e6:.1f}M params ({trep['steps']} steps, loss "
          f"{trep['last_loss']:.2f}), draft {drep['params'] / 1e6:.2f}M ({drep['steps']} steps, loss "
          f"{drep['last_loss']:.2f}); {date.today()}; {machine}")
    print(f"verification pass of {k + 1} rows = {cost['pass_over_step']:.2f} one-token steps of CPU time "
          f"({cost['step_cpu_s'] * 1e3:.1f} ms a step): the most a pass can gain is {k + 1}x over that")
    head = f"{'row':38s} {'plain tok/s':>11s} {'spec tok/s':>10s} {'speedup':>8s} {'accept':>7s} {'tok/pass':>8s} target"
    print(head)
    for name, a, b, r, acc, tpp, target in rows:
        acc_s = f"{acc:.0%}" if acc is not None else "-"
        print(f"{name:38s} {a:11.1f} {b:10.1f} {r:7.2f}x {acc_s:>7s} {tpp:8.2f} {target}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": str(date.today()), "machine": machine, "dtype": args.dtype, "new_tokens": args.new, "k": k,
        "pass_cost": cost,
        "target": {"params": trep["params"], **{k2: v for k2, v in trep.items() if k2 != "params"}},
        "draft": {"params": drep["params"], **{k2: v for k2, v in drep.items() if k2 != "params"}},
        "rows": [dict(zip(("row", "plain_tok_s", "spec_tok_s", "speedup", "acceptance", "tokens_per_pass", "target"),
                          r)) for r in rows],
        "held_out": {i: {k2: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k2, v in h.items()}
                     for i, h in held.items()},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
