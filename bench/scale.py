"""Scaling out on one host: 1 process vs 2 (pipeline and tensor parallel) over loopback, with the planner's
prediction beside each measured figure, and the planner's expected figures for two DGX Sparks.

    python bench/scale.py                     # TinyLlama-1.1B shape, bf16 random weights
    python bench/scale.py --size small        # a 12-layer, 768-wide model (quicker on a busy machine)

For each run it reports, per rank: resident memory after loading and generating (VmRSS) and its ratio to the
one-process run (target <= 0.55x), and the run's decode tokens/s. The prediction prices the rank's weights
(:func:`ember.planner.parallel.layer_bytes` per stage, the local shard under TP), and the step time as the
planner's one-process decode step (:func:`ember.planner.decode_step_seconds` on this machine, with its
``ember hw --measure`` calibration when present) scaled by the rank's share of the weights, plus the link's
cost per token (:func:`ember.planner.parallel.comm_seconds_per_token`) with loopback's latency and bandwidth
measured here by a gloo ping-pong. Results go to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SIZES, write_checkpoint  # noqa: E402  (the same random Llama checkpoints as bench/decode.py)

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, os, resource, sys, time, torch
import torch.distributed as dist
import ember, ember.distributed as ed
from ember.distributed import group

folder, out, mode, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

prompt = list(range(10, 42))
base = rss()  # torch and ember imported, no model yet
if mode == "one":
    eng = ember.load(folder, dtype="bf16", check_memory=False)
    rank = 0
else:
    d = group.init(mode, "cpu")
    rank = d.rank
    eng = ed.load(folder, dtype="bf16")
loaded = rss()
eng.generate(prompt, max_new_tokens=4, temperature=0)  # warm-up (kernels, caches)
res = eng.generate(prompt, max_new_tokens=new, temperature=0, ignore_eos=True)
row = {"rank": rank, "rss_base": base, "rss_loaded": loaded, "rss_after": rss(), "decode_tok_s": res.stats.decode_tok_s,
       "tokens": res.token_ids}
link = None
if mode != "one":
    rows = [None] * d.world
    dist.all_gather_object(rows, row)
    # loopback ping-pong: latency (1 element) and bandwidth (the hidden state of 64 tokens)
    h = eng.config.hidden_size * (1 if mode == "pp" else ed.current().world)
    def pingpong(n, reps):
        t = torch.zeros(n, dtype=torch.bfloat16)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if rank == 0:
                dist.send(t, 1); dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0); dist.send(t, 0)
        return (time.perf_counter() - t0) / (2 * reps)
    lat = pingpong(1, 200)
    big = 1 << 22
    one_way = pingpong(big, 10)
    link = {"latency_s": lat, "bandwidth": 2 * big / max(one_way - lat, 1e-9)}
    group.shutdown()
else:
    rows = [row]
if rank == 0:
    json.dump({"rows": rows, "link": link}, open(out, "w"))
'''


def run(folder: Path, mode: str, nproc: int, new: int, work: Path, threads: int) -> dict:
    """One run of the worker (``mode`` "one", "pp" or "tp" on ``nproc`` processes); its rows and link figures."""
    script, out = work / "worker.py", work / f"{mode}.json"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, threads // nproc)))
    if mode == "one":
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(script)]
    subprocess.run(cmd + [str(folder), str(out), mode, str(new)], env=env, check=True)
    return json.loads(out.read_text())


def predictions(folder: Path, link: dict | None) -> dict:
    """The planner's per-rank weight bytes and decode tok/s for 1 process, PP 2 and TP 2 on this machine."""
    from ember.config import ModelConfig
    from ember.distributed.pipeline import stage_ranges
    from ember.hardware import detect
    from ember.planner import Workload, decode_step_seconds, weight_bytes
    from ember.planner.parallel import comm_seconds_per_token, layer_bytes

    cfg = ModelConfig.from_file(folder)
    hw = detect("cpu")
    if link:
        hw = dataclasses.replace(hw, interconnect_bandwidth=link["bandwidth"], interconnect_latency_s=link["latency_s"])
    wl = Workload(context=96, batch=1, dtype="bf16")
    t1, _ = decode_step_seconds(cfg, hw, wl, 64)
    wb = weight_bytes(cfg, "bf16")
    per_layer = layer_bytes(cfg, "bf16")
    total = wb.total
    stages = stage_ranges(cfg, 2)
    pp_bytes = [sum(per_layer[a:b]) + (wb.embedding if i == 0 else 0) + (wb.lm_head if i == 1 else 0)
                for i, (a, b) in enumerate(stages)]
    # replicated under TP: norms and routers, and a tied embedding (an untied embedding and head split by vocab)
    shared = wb.other + (wb.embedding if cfg.tie_word_embeddings else 0.0)
    tp_bytes = (total - shared) / 2 + shared
    # PP: one sequence visits the stages in turn, so the step streams every weight once, plus the hops;
    # TP: each rank streams its shard at the same time, plus two all-reduces per layer
    pp_t = t1 + comm_seconds_per_token(cfg, hw, "pp", 2)
    tp_t = t1 * tp_bytes / total + comm_seconds_per_token(cfg, hw, "tp", 2)
    return {"one": {"bytes": [total], "tok_s": 1 / t1}, "pp": {"bytes": pp_bytes, "tok_s": 1 / pp_t},
            "tp": {"bytes": [tp_bytes, tp_bytes], "tok_s": 1 / tp_t}}


def spark_pair(folder: Path) -> list[dict]:
    """Expected figures for two DGX Sparks joined by ConnectX-7, from the planner and the catalog's link numbers."""
    from ember.config import ModelConfig
    from ember.hardware import PROFILES
    from ember.planner import Workload, decode_step_seconds, weight_bytes
    from ember.planner.parallel import comm_seconds_per_token

    cfg = ModelConfig.from_file(folder)
    one = PROFILES["dgx-spark"]
    pair = one.times(2)
    wl = Workload(context=4096, batch=1, dtype="bf16")
    t1, _ = decode_step_seconds(cfg, one, wl, 2048)
    wb = weight_bytes(cfg, "bf16")
    shared = wb.other + (wb.embedding if cfg.tie_word_embeddings else 0.0)
    rows = [{"run": "1 Spark", "tok_s": 1 / t1, "comm_us": 0.0}]
    for mode in ("pp", "tp"):
        comm = comm_seconds_per_token(cfg, pair, mode, 2)
        share = 1.0 if mode == "pp" else ((wb.total - shared) / 2 + shared) / wb.total
        rows.append({"run": f"2 Sparks {mode.upper()}", "tok_s": 1 / (t1 * share + comm), "comm_us": comm * 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--new", type=int, default=32, help="tokens to generate per run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="cores shared by the processes of a run (each gets threads / processes)")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args()
    dims = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "model"
        write_checkpoint(folder, dims, torch.bfloat16)
        runs = {"one": run(folder, "one", 1, args.new, work, args.threads)}
        for mode in ("pp", "tp"):
            runs[mode] = run(folder, mode, 2, args.new, work, args.threads)
        link = runs["pp"]["link"]
        pred = predictions(folder, link)
        spark = spark_pair(folder)
    one = runs["one"]["rows"][0]
    base = one["rss_after"] - one["rss_base"]  # the model's share of one process's resident memory
    rows = []
    for mode, r in runs.items():
        same = all(x["tokens"] == runs["one"]["rows"][0]["tokens"] for x in r["rows"])
        for x in r["rows"]:
            rows.append({"run": mode, "rank": x["rank"], "rss_loaded": x["rss_loaded"], "rss_after": x["rss_after"],
                         "rss_model": x["rss_after"] - x["rss_base"],
                         "rss_ratio": (x["rss_after"] - x["rss_base"]) / base, "decode_tok_s": x["decode_tok_s"],
                         "pred_weight_bytes": pred[mode]["bytes"][x["rank"]], "pred_tok_s": pred[mode]["tok_s"],
                         "same_tokens": same})
    from ember.hardware import cpu_name

    machine = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nScale-out on one host, {args.size} Llama ({dims['num_hidden_layers']} layers, hidden "
          f"{dims['hidden_size']}), bf16, {args.new} new tokens, {args.threads} threads per run; {machine}")
    if link:
        print(f"loopback (gloo): latency {link['latency_s'] * 1e6:.0f} us, bandwidth {link['bandwidth'] / 1e9:.2f} GB/s")
    print("RSS: resident memory after generating; model: less the process before loading (torch, ember)")
    print(f"{'run':<5}{'rank':>5}{'RSS GiB':>9}{'model':>7}{'x one':>7}{'pred W GiB':>11}{'tok/s':>8}{'pred':>8}  same tokens")
    for r in rows:
        print(f"{r['run']:<5}{r['rank']:>5}{r['rss_after'] / 2**30:>9.2f}{r['rss_model'] / 2**30:>7.2f}{r['rss_ratio']:>7.2f}"
              f"{r['pred_weight_bytes'] / 2**30:>11.2f}{r['decode_tok_s']:>8.1f}{r['pred_tok_s']:>8.1f}  {r['same_tokens']}")
    print("\nExpected for two DGX Sparks (planner, ConnectX-7 200 Gb/s link from the catalog), bf16, 2048 cached:")
    for s in spark:
        print(f"  {s['run']:<14} {s['tok_s']:>7.1f} tok/s   link {s['comm_us']:.0f} us/token")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "size": args.size, "dims": dims,
                               "new_tokens": args.new, "threads": args.threads, "link": link, "rows": rows, "spark_pair": spark,
                               "time": time.time()}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
