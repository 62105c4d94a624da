"""Multi-process runs on loopback (gloo, 2 processes): pipeline and tensor parallel output equal to one
process's, data-parallel fine-tuning, and a dead or hung rank ending the run with an error in bounded time.

Workers are started as real processes (torchrun, ember's own --pp/--tp launcher, or plain processes with
torchrun's environment where a test must kill one rank).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ember
from ember.hardware import PROFILES
from ember.planner.parallel import comm_seconds_per_token, layer_bytes, split_layers

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- planner pieces (no processes)
def test_split_layers_balances_bytes_and_keeps_order():
    costs = [1.0, 1.0, 1.0, 1.0, 4.0, 1.0]
    parts = split_layers(costs, 2)
    assert parts[0][0] == 0 and parts[-1][1] == len(costs) and parts[0][1] == parts[1][0]
    assert max(sum(costs[a:b]) for a, b in parts) == 5.0  # [0,4) = 4, [4,6) = 5 is the best cut
    # an embedding on the first stage moves the cut later
    assert split_layers([1.0] * 4, 2, first_extra=2.0) == [(0, 1), (1, 4)]


def test_layer_bytes_sum_to_the_planner_weights(hf_checkpoint):
    from ember.config import ModelConfig
    from ember.planner.memory import weight_bytes

    for family in ("llama", "qwen3-moe-mixed"):
        folder, _ = hf_checkpoint(family)
        cfg = ModelConfig.from_file(folder)
        wb = weight_bytes(cfg, "bf16", "int8")
        per = layer_bytes(cfg, "bf16", "int8")
        assert len(per) == cfg.num_hidden_layers
        routers = (cfg.num_local_experts * cfg.hidden_size * 2 * sum(cfg.is_moe_layer(i) for i in
                                                                       range(cfg.num_hidden_layers)))
        assert abs(sum(per) - (wb.attention + wb.mlp + wb.experts + routers)) < 1e-6 * sum(per)


def test_comm_cost_grows_with_ranks_and_is_zero_alone(hf_checkpoint):
    from ember.config import ModelConfig

    cfg = ModelConfig.from_file(hf_checkpoint("llama")[0])
    pair = PROFILES["dgx-spark"].times(2)
    assert comm_seconds_per_token(cfg, pair, "pp", 1) == 0.0
    pp, tp = comm_seconds_per_token(cfg, pair, "pp", 2), comm_seconds_per_token(cfg, pair, "tp", 2)
    # TP pays two all-reduces per layer, PP one hop: TP costs more latency per token
    assert tp > pp > pair.interconnect_latency_s
    assert comm_seconds_per_token(cfg, pair, "tp", 4) > tp


def test_loopback_is_measured_and_prices_one_host_runs(hf_checkpoint):
    """``ember hw --measure`` records loopback latency and bandwidth (two gloo processes); the planner prices
    PP/TP on one host with them, and a pair of machines with the catalog's link."""
    import dataclasses

    from ember.config import ModelConfig
    from ember.distributed.link import measure_loopback
    from ember.hardware import Calibration

    lat, bw = measure_loopback(reps=20)
    assert 0 < lat < 0.5 and bw > 1e6  # real figures: under half a second, over 1 MB/s
    cfg = ModelConfig.from_file(hf_checkpoint("llama")[0])
    cal = Calibration(device="cpu", fingerprint="x", stream={}, copy_bandwidth=1e9, matmul_flops={},
                      layer_overhead_s={}, expert_overhead_s={}, step_overhead_s={}, runtime_bytes=0,
                      loopback_latency_s=lat, loopback_bandwidth=bw)
    host = dataclasses.replace(PROFILES["dgx-spark"], calibration=cal)
    want = (2 - 1) * (lat + cfg.hidden_size * 2 / bw) + lat + cfg.vocab_size * 4 / bw
    assert abs(comm_seconds_per_token(cfg, host, "pp", 2) - want) < 1e-12
    pair = host.times(2)  # across machines: the catalog's ConnectX-7 figures, not loopback
    assert comm_seconds_per_token(cfg, pair, "pp", 2) == comm_seconds_per_token(
        cfg, PROFILES["dgx-spark"].times(2), "pp", 2)


# ----------------------------------------------------------------------------- exactness against one process
WORKER = r'''
import json, sys, torch
import ember.distributed as ed
from ember.distributed import group

out, cases = sys.argv[1], json.loads(sys.argv[2])
d = group.init("pp", "cpu")
res = {}
for i, (mode, folder, quant) in enumerate(cases):
    d.mode = mode
    eng = ed.load(folder, dtype="fp32", quant=quant)
    with torch.inference_mode():
        logits = eng.model(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    toks = eng.generate([5, 6, 7], max_new_tokens=12, temperature=0).token_ids
    if d.rank == 0:
        res[str(i)] = (logits.float(), toks)
if d.rank == 0:
    torch.save(res, out)
group.shutdown()
'''

CASES = [("pp", "llama", None), ("pp", "llama-tied", None), ("pp", "qwen3-moe", None), ("pp", "llama", "int8"),
         ("pp", "llama.gguf", None), ("tp", "llama", None), ("tp", "qwen3-moe", None), ("tp", "llama", "int8"),
         ("tp", "mixtral", "int8"), ("tp", "llama.Q8_0.gguf", None), ("tp", "qwen3-moe.Q4_0.gguf", None),
         ("tp", "llama.int4-folder", None), ("tp", "qwen3-moe.int8-folder", None)]


def test_pipeline_and_tensor_parallel_match_one_process(hf_checkpoint, tmp_path):
    """PP and TP on 2 ranks: fp32 logits within 1e-5 of one process and the same greedy tokens, for dense,
    tied, MoE and int8 models, GGUF files (TP: Q8_0 / Q4_0 blocks split by whole rows and whole blocks) and
    folders written by ``ember quantize`` (TP: int4 groups and int8 rows split as stored)."""
    from test_gguf import write_model_gguf

    from ember.loading.quantized import quantize_checkpoint

    folders = {fam: str(hf_checkpoint(fam)[0]) for _, fam, _ in CASES if "." not in fam}
    for name in (fam for _, fam, _ in CASES if fam.endswith(".gguf")):
        family, _, qtype = name.removesuffix(".gguf").partition(".")
        folders[name] = str(write_model_gguf(tmp_path / name, hf_checkpoint(family)[1], family, qtype or "F32"))
    for name in (fam for _, fam, _ in CASES if fam.endswith("-folder")):  # written by `ember quantize`
        family, _, mode = name.removesuffix("-folder").partition(".")
        folders[name] = str(quantize_checkpoint(hf_checkpoint(family)[0], tmp_path / name, mode, 32 if mode == "int4"
                                                else None)[0])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "res.pt"
    cases = [(mode, folders[fam], q) for mode, fam, q in CASES]
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                           str(out), json.dumps(cases)], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out)
    for i, (mode, fam, q) in enumerate(CASES):
        ref = ember.load(folders[fam], dtype="fp32", quant=q, check_memory=False)
        with torch.inference_mode():
            want = ref.model(torch.tensor([[5, 6, 7, 8, 9, 10]])).float()
        toks = ref.generate([5, 6, 7], max_new_tokens=12, temperature=0).token_ids
        got, got_toks = res[str(i)]
        err = (got - want).abs().max().item()
        assert err < 1e-5, f"{mode} {fam} {q}: max |logit diff| {err:.2e} (tolerance 1e-5)"
        assert got_toks == toks, f"{mode} {fam} {q}: greedy tokens differ"


def test_gguf_blocks_split_by_whole_blocks_or_refused():
    """A row-parallel cut of GGUF block rows keeps whole blocks (decoded: the full tensor's columns); a cut inside
    a block is refused naming the tensor, its type and block size."""
    import gguf
    from ember.distributed.tensor import GGUFCut
    from ember.errors import DistributedError

    QT = gguf.GGMLQuantizationType
    w = torch.randn(6, 256).numpy()
    raw = torch.from_numpy(gguf.quants.quantize(w, QT.Q8_0))[None]   # (1 expert, rows, row bytes)
    full = torch.from_numpy(gguf.quants.dequantize(raw[0].numpy(), QT.Q8_0))
    part = GGUFCut("w", 1, 64, 192).blocks(raw, QT.Q8_0)
    got = torch.from_numpy(gguf.quants.dequantize(part[0].numpy(), QT.Q8_0))
    assert torch.equal(got, full[:, 64:192])
    assert torch.equal(GGUFCut("w", 0, 2, 4).blocks(raw, QT.Q8_0), raw[:, 2:4])
    with pytest.raises(DistributedError, match=r"model.layers.0.mlp.down_proj.weight.*Q4_K.*256"):
        GGUFCut("model.layers.0.mlp.down_proj.weight", 1, 128, 256).blocks(torch.zeros(1, 6, 144 * 2, dtype=torch.uint8),
                                                                       QT.Q4_K)


GRID_WORKER = r'''
import json, sys, torch
import ember.distributed as ed
from ember.distributed import group

out, cases = sys.argv[1], json.loads(sys.argv[2])
d = group.init("pp", "cpu", tp=2)
res = {}
for i, (folder, quant) in enumerate(cases):
    eng = ed.load(folder, dtype="fp32", quant=quant)
    with torch.inference_mode():
        logits = eng.model(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    res[str(i)] = (logits.float(), eng.generate([5, 6, 7], max_new_tokens=12, temperature=0).token_ids,
                   eng.shard.describe())
torch.save(res, f"{out}.{d.rank}")
group.shutdown()
'''


def test_pp_and_tp_together_match_one_process(hf_checkpoint, tmp_path):
    """``--pp 2 --tp 2`` (4 processes: two stages, each split over two ranks with a group of its own): every
    rank's fp32 logits within 1e-5 of one process and the same greedy tokens, dense and MoE with int8."""
    cases = [(str(hf_checkpoint("llama")[0]), None), (str(hf_checkpoint("qwen3-moe")[0]), "int8")]
    script = tmp_path / "grid.py"
    script.write_text(GRID_WORKER)
    out = tmp_path / "res"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script),
                           str(out), json.dumps(cases)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [torch.load(f"{out}.{r}") for r in range(4)]
    assert got[3]["0"][2].startswith("pipeline stage 2/2") and got[3]["0"][2].endswith("tensor shard 2/2")
    for i, (folder, q) in enumerate(cases):
        ref = ember.load(folder, dtype="fp32", quant=q, check_memory=False)
        with torch.inference_mode():
            want = ref.model(torch.tensor([[5, 6, 7, 8, 9, 10]])).float()
        toks = ref.generate([5, 6, 7], max_new_tokens=12, temperature=0).token_ids
        for r in range(4):
            logits, got_toks, _ = got[r][str(i)]
            err = (logits - want).abs().max().item()
            assert err < 1e-5, f"{folder} {q} rank {r}: max |logit diff| {err:.2e} (tolerance 1e-5)"
            assert got_toks == toks, f"{folder} {q} rank {r}: greedy tokens differ"


def test_cli_pp_and_tp_print_what_one_process_prints(hf_checkpoint):
    """``ember generate --pp 2`` / ``--tp 2`` / ``--pp 2 --tp 2`` (ember starts the workers) print the
    single-process text; only rank 0 writes."""
    folder = str(hf_checkpoint("llama")[0])
    args = [PY, "-m", "ember", "generate", folder, "w5 w6 w7", "-n", "10", "--dtype", "fp32", "-q"]
    one = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    for flags in (["--pp", "2"], ["--tp", "2"], ["--pp", "2", "--tp", "2"]):  # the last: 4 processes
        run = subprocess.run(args + flags, env=_env(), capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == one.stdout, (flags, run.stdout, one.stdout)
        assert run.stderr.strip() == "", run.stderr[-2000:]


# ----------------------------------------------------------------------------- faults
def _start_ranks(folder: str, extra_env: dict, verb: list[str] | None = None) -> list[subprocess.Popen]:
    """Two ranks with torchrun's environment but no agent, so a test can kill or stop one of them."""
    port = _free_port()
    verb = verb or ["generate", folder, "w5 w6 w7", "-n", "480", "--stop-token-id", "1"]
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
        procs.append(subprocess.Popen([PY, "-m", "ember", *verb, "--dtype", "fp32", "--pp", "2"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_ends_the_other_with_an_error(hf_checkpoint, fault):
    """Rank 1 is killed (SIGKILL) or stopped (SIGSTOP) while decoding: rank 0 exits within 30 s with an error
    naming rank 1 and what rank 0 was doing."""
    folder = str(hf_checkpoint("llama", max_position_embeddings=512)[0])
    r0, r1 = _start_ranks(folder, {"EMBER_DIST_TIMEOUT": "5"})
    try:
        assert os.read(r0.stdout.fileno(), 4), r0.stderr.read()  # rank 0 streams tokens: both ranks decode
        r1.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = r0.communicate(timeout=30)
        took = time.monotonic() - t0
        assert r0.returncode == 1, err
        assert took < 30
        assert "rank 1" in err and "rank 0 (generating (pipeline stage 1/2" in err, err
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(timeout=30)


def test_verbs_that_do_not_run_distributed_say_so(hf_checkpoint):
    """A verb with no multi-process form (``plan``) refuses torchrun with a one-line error before joining a group."""
    folder = str(hf_checkpoint("llama")[0])
    proc = subprocess.run([PY, "-m", "ember", "plan", folder], env=_env(RANK="0", WORLD_SIZE="2"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "does not run over several processes yet" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- data-parallel fine-tuning
def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_data_parallel_tune_matches_one_process_and_resumes_at_another_world_size(hf_checkpoint, tmp_path):
    """``torchrun -m ember tune``: 2 processes give the 1-process losses step by step (within 1e-3), only rank 0
    writes, and a checkpoint written by the 2-process run resumes in 1 process to the same losses."""
    import random
    import shutil

    folder = str(hf_checkpoint("llama")[0])
    rng = random.Random(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(3, 256)}" for _ in range(rng.randrange(8, 30)))})
                            + "\n" for _ in range(24)))
    args = ["-m", "ember", "tune", folder, "--data", str(data), "--steps", "4", "--batch", "4", "--seq-len", "32",
            "--dropout", "0", "--lr", "1e-2", "--dtype", "fp32", "--device", "cpu", "--save-every", "2", "-q"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([PY, *args, "-o", str(one)], env=_env(), capture_output=True, text=True, timeout=180)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
                         "-o", str(two)], env=_env(), capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 1e-3, f"1 vs 2 processes: losses differ by {worst:.2e} (tolerance 1e-3): {a} {b}"
    assert len({round(v, 6) for v in a.values()}) == 4  # four different batches, four different losses
    assert (two / "adapter_model.safetensors").is_file()
    assert not list(two.rglob("*.tmp-*")) and len((two / "metrics.jsonl").read_text().splitlines()) == \
        len((one / "metrics.jsonl").read_text().splitlines())  # one writer: no duplicated rows
    # resume the 2-process run's step-2 checkpoint in one process: steps 3 and 4 as before
    again = tmp_path / "again"
    shutil.copytree(two, again)
    (again / "adapter_model.safetensors").unlink()
    r3 = subprocess.run([PY, *args, "-o", str(again), "--resume"], env=_env(), capture_output=True, text=True,
                        timeout=180)
    assert r3.returncode == 0, r3.stderr[-2000:]
    c = _losses(again)
    assert abs(c[3] - a[3]) < 1e-3 and abs(c[4] - a[4]) < 1e-3, (a, c)


def test_fsdp2_full_tune_matches_one_process_and_resumes_sharded(hf_checkpoint, tmp_path):
    """``torchrun -m ember tune --method full``: FSDP2 shards the layers; the losses and gradient norms equal one
    process's step by step (within 1e-3), the written model matches, and the 1-process step-2 checkpoint resumes
    in 2 processes (full tensors laid out as shards) to the same losses."""
    import random
    import shutil

    from safetensors.torch import load_file

    folder = str(hf_checkpoint("llama")[0])
    rng = random.Random(1)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(3, 256)}" for _ in range(rng.randrange(8, 30)))})
                            + "\n" for _ in range(24)))
    args = ["-m", "ember", "tune", folder, "--method", "full", "--data", str(data), "--steps", "4", "--batch", "3",
            "--seq-len", "32", "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu", "--save-every", "2", "-q"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    r1 = subprocess.run([PY, *args, "-o", str(one)], env=_env(), capture_output=True, text=True, timeout=180)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([*torchrun, *args, "-o", str(two)], env=_env(), capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and len({round(v, 6) for v in a.values()}) == 4
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 1e-3, f"1 vs 2 processes (FSDP2): losses differ by {worst:.2e}: {a} {b}"
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    shutil.copytree(one, again)  # the 1-process checkpoint at step 2, resumed by 2 processes
    shutil.rmtree(again / "model")
    r3 = subprocess.run([*torchrun, *args, "-o", str(again), "--resume"], env=_env(), capture_output=True, text=True,
                        timeout=240)
    assert r3.returncode == 0, r3.stderr[-2000:]
    c = _losses(again)
    assert abs(c[3] - a[3]) < 1e-3 and abs(c[4] - a[4]) < 1e-3, (a, c)


def test_chat_and_eval_under_pp_and_tp_match_one_process(hf_checkpoint, tmp_path):
    """``chat`` (rank 0 reads stdin, the other rank follows its announced generations) and ``eval ppl`` (every
    rank runs the same windows) print what one process prints."""
    from conftest import save_word_tokenizer
    from test_cli import CHATML

    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(hf_checkpoint("llama")[0], folder)
    save_word_tokenizer(folder, chat_template=CHATML)  # the same weights with a chat template
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{5 + i % 40}" for i in range(60)))
    chat = [PY, "-m", "ember", "chat", str(folder), "-n", "5", "--temperature", "0", "--dtype", "fp32"]
    ppl = [PY, "-m", "ember", "eval", "ppl", str(folder), "--text", str(text), "--window", "16", "--stride", "8",
           "--dtype", "fp32"]
    stdin = "w3 w4\nw5\n/reset\nw6\n"
    want_chat = subprocess.run(chat, input=stdin, env=_env(), capture_output=True, text=True, timeout=120)
    want_ppl = subprocess.run(ppl, env=_env(), capture_output=True, text=True, timeout=120)
    assert want_chat.returncode == 0 and want_ppl.returncode == 0, want_chat.stderr + want_ppl.stderr
    assert len(want_chat.stdout.splitlines()) == 3
    for flag in ("--pp", "--tp"):
        got = subprocess.run(chat + [flag, "2"], input=stdin, env=_env(), capture_output=True, text=True, timeout=180)
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout == want_chat.stdout, (flag, got.stdout, want_chat.stdout)
        got = subprocess.run(ppl + [flag, "2"], env=_env(), capture_output=True, text=True, timeout=180)
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout == want_ppl.stdout, (flag, got.stdout, want_ppl.stdout)


def _serve(args: list[str], port: int) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "ember", "serve", *args, "--port", str(port)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete(port: int, deadline: float, prompt: str = "w5 w6 w7") -> dict:
    import httpx

    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("flag", ["--pp", "--tp"])
def test_serve_under_pp_and_tp_answers_as_one_process(hf_checkpoint, flag):
    """``ember serve --pp 2`` / ``--tp 2``: rank 0 serves, the other rank replays its batched forwards; the
    completions of concurrent requests (under PP, decode steps of two micro-batches in flight) equal one
    process's; stopping the server stops every worker."""
    from concurrent.futures import ThreadPoolExecutor

    folder = str(hf_checkpoint("llama")[0])
    common = [folder, "--dtype", "fp32", "--model-name", "m"]
    one_port, two_port = _free_port(), _free_port()
    one, two = _serve(common, one_port), _serve(common + [flag, "2"], two_port)
    prompts = ["w5 w6 w7", "w9 w3", "w40 w41 w42 w43", "w7"]
    try:
        deadline = time.monotonic() + 120
        _complete(one_port, deadline), _complete(two_port, deadline)  # both up
        answers = []
        for port in (one_port, two_port):
            with ThreadPoolExecutor(len(prompts)) as pool:  # at once: several rows in each decode step
                answers.append(list(pool.map(lambda p: _complete(port, deadline, p)["choices"][0]["text"], prompts)))
        want, got = answers
        assert got == want and all(want), (got, want)
        two.send_signal(signal.SIGINT)
        two.wait(timeout=30)
    finally:
        for p in (one, two):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def test_serve_answers_503_naming_the_rank_once_a_rank_is_gone_then_exits(hf_checkpoint):
    """``ember serve --pp 2`` whose rank 1 is killed: the next request gets 503 with a body naming rank 1 (code
    rank_lost), and rank 0 exits with that error within 30 s (as vLLM exits when its
    engine dies), instead of hanging or answering 200."""
    import httpx

    folder = str(hf_checkpoint("llama")[0])
    port = _free_port()
    r0, r1 = _start_ranks(folder, {"EMBER_DIST_TIMEOUT": "5"},
                          ["serve", folder, "--model-name", "m", "--port", str(port)])
    try:
        assert _complete(port, time.monotonic() + 120)["choices"][0]["text"]  # both ranks serve
        r1.kill()
        r1.wait(timeout=30)
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "m", "prompt": "w5 w6", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "rank_lost" and "rank 1" in err["message"], err
        _, stderr = r0.communicate(timeout=30)
        assert time.monotonic() - t0 < 30
        assert r0.returncode == 1 and "ember: error: rank 0" in stderr and "rank 1" in stderr, stderr[-2000:]
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
