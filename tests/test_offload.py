"""Offload (ember.offload): models bigger than their memory budget give the same tokens, with consistent statistics.

Tiny random checkpoints (``save_pretrained``) are loaded whole and with a budget below their size: MoE models
with their experts read from disk on demand (and prefetched), dense models with layers streamed; greedy decoding
must give identical tokens, the cache counters must add up, and a checkpoint that changes on disk mid-run must
give an error naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember
from ember.errors import CheckpointError, InsufficientMemoryError, QuantizationError
from ember.hardware import GiB
from ember.offload import DiskReader, ExpertCache, load_offloaded
from ember.offload.experts import is_expert_tensor

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "w5 w9 w33 w7 w100 w42"


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _expert_bytes(model) -> int:
    store = model.model.layers[0].mlp.experts.store
    return store.stored_bytes(0, 0)


def _planned_budget(folder: Path, context: int) -> int:
    """Bytes that the planner's plan for ``context`` tokens needs, less half the experts: offload must step in."""
    from ember.config import ModelConfig
    from ember.hardware import detect
    from ember.planner import Workload, plan, weight_bytes

    cfg = ModelConfig.from_file(folder)
    need = plan(cfg, detect("cpu"), Workload(context=context, dtype="fp32"), in_process=True).memory.total
    return int(need - 0.5 * weight_bytes(cfg, "fp32").experts)


def _greedy(llm, n: int = 16) -> list[int]:
    return llm.generate(PROMPT, max_new_tokens=n, temperature=0).token_ids


@pytest.fixture(scope="module")
def moe_folder(hf_checkpoint, tmp_path_factory):
    folder, _ = hf_checkpoint("qwen3-moe", num_hidden_layers=3)
    return folder


def _count_expert_uses(folder: Path, n: int) -> int:
    """Expert calls of the whole model in a greedy run of ``n`` tokens (hooks make each call visible)."""
    llm = ember.load(folder, device="cpu", dtype="fp32", offload="off")
    calls = [0]
    for layer in llm.model.model.layers:
        for e in layer.mlp.experts:
            e.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    _greedy(llm, n)
    return calls[0]


def test_moe_offload_same_tokens_and_stats_without_prefetch(moe_folder):
    whole = ember.load(moe_folder, device="cpu", dtype="fp32", offload="off")
    want = _greedy(whole)
    budget = int(0.6 * _file_bytes(moe_folder))
    model = load_offloaded(moe_folder, budget, dtype="fp32", prefetch=False)
    llm = ember.engine.Engine(model, whole.tokenizer, moe_folder)
    assert _greedy(llm) == want
    s = model.offload.stats()
    assert s["uses"] == _count_expert_uses(moe_folder, 16)
    assert s["hits"] + s["misses"] == s["uses"]
    assert s["misses"] > 0 and s["prefetch_reads"] == 0
    assert s["bytes_read"] == s["misses"] * _expert_bytes(model)
    assert model.offload.cache.used_bytes <= model.offload.cache_bytes
    assert s["evictions"] > 0  # the budget holds fewer experts than the model has
    assert model.offload.reader.buffers.reused > 0  # evicted experts' buffers were read into again: same tokens
    model.offload.close()


def test_moe_offload_prefetch_same_tokens_and_stats(moe_folder):
    whole = ember.load(moe_folder, device="cpu", dtype="fp32", offload="off")
    want = _greedy(whole)
    model = load_offloaded(moe_folder, int(0.6 * _file_bytes(moe_folder)), dtype="fp32", prefetch=True)
    llm = ember.engine.Engine(model, whole.tokenizer, moe_folder)
    assert _greedy(llm) == want
    model.offload.cache.drain()
    s = model.offload.stats()
    assert s["hits"] + s["misses"] == s["uses"]
    assert s["prefetch_reads"] > 0 and s["prefetch_hits"] > 0
    done = s["prefetch_reads"] - s["prefetch_cancelled"]
    assert s["bytes_read"] == (s["demand_reads"] + done) * _expert_bytes(model)
    assert s["prefetch_precision"] == s["prefetch_hits"] / done
    assert s["io"]["bytes"] >= s["bytes_read"] and s["io"]["max_in_flight"] >= 1
    model.offload.close()


def test_mixtral_offload_through_load(hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    want = _greedy(ember.load(folder, device="cpu", dtype="fp32", offload="off"))
    llm = ember.load(folder, device="cpu", dtype="fp32", context=64, offload="experts",
                     max_memory=0.7 * _file_bytes(folder) / GiB)
    assert _greedy(llm) == want
    assert llm.model.offload.mode == "experts" and llm.model.offload.stats()["uses"] > 0


def test_dense_layer_streaming_same_tokens(hf_checkpoint):
    folder, _ = hf_checkpoint("llama", num_hidden_layers=6, vocab_size=256)
    whole = ember.load(folder, device="cpu", dtype="fp32", offload="off")
    want = _greedy(whole)
    non_layer = 2 * 256 * 64 * 4 + 64 * 4
    budget = non_layer + int(0.7 * (_file_bytes(folder) - non_layer))  # some layers resident, the rest streamed
    for ahead in (0, 2):
        model = load_offloaded(folder, budget, dtype="fp32", mode="layers", ahead=ahead)
        off = model.offload
        assert 0 < len(off.offloaded) < 6
        assert _greedy(ember.engine.Engine(model, whole.tokenizer, folder)) == want
        s = off.stats()
        assert s["hits"] + s["misses"] == s["uses"]
        steps = s["uses"] // len(off.offloaded)
        assert s["uses"] == steps * len(off.offloaded) and steps >= 16  # every streamed layer once per forward
        if ahead:
            assert s["hits"] > 0
        else:
            assert s["hits"] == 0 and s["bytes_read"] == steps * sum(off.streamer.layer_bytes(i) for i in off.offloaded)
        off.close()


def test_truncated_checkpoint_mid_run_names_the_file(moe_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(moe_folder, folder)
    model = load_offloaded(folder, int(0.5 * _file_bytes(folder)), dtype="fp32", prefetch=False)
    llm = ember.engine.Engine(model, ember.tokenizer.Tokenizer.from_dir(folder), folder)
    _greedy(llm, 2)
    f = folder / "model.safetensors"
    os.truncate(f, 4096)
    with pytest.raises(CheckpointError, match=str(f).replace(".", r"\.") + ".*truncated"):
        for _ in range(8):  # some step misses the cache and reads past the new end
            _greedy(llm, 8)


def test_removed_checkpoint_mid_run_keeps_running(moe_folder, tmp_path):
    """The files stay open from load: removing one does not disturb the run (POSIX keeps its data)."""
    folder = tmp_path / "m"
    shutil.copytree(moe_folder, folder)
    want = _greedy(ember.load(folder, device="cpu", dtype="fp32", offload="off"))
    model = load_offloaded(folder, int(0.5 * _file_bytes(folder)), dtype="fp32")
    llm = ember.engine.Engine(model, ember.tokenizer.Tokenizer.from_dir(folder), folder)
    (folder / "model.safetensors").unlink()
    assert _greedy(llm) == want


def test_reader_reads_tensors_as_stored(moe_folder):
    from ember.loading import Checkpoint

    ckpt = Checkpoint(moe_folder)
    names = [n for n in ckpt.names() if is_expert_tensor(n)][:5] + ["model.norm.weight"]
    reader = DiskReader({ckpt.info(n).file for n in names})
    got = reader.read([ckpt.info(n) for n in names])
    for n, t in zip(names, got):
        assert torch.equal(t, ckpt.get(n)), n
    assert reader.counters.tensor_bytes == sum(ckpt.info(n).end - ckpt.info(n).begin for n in names)
    reader.close()


def test_lfu_keeps_the_most_used():
    cache = ExpertCache(3 * 10, policy="lfu")
    load = lambda: (torch.nn.Identity(), 10, 10, 0.0)  # noqa: E731
    for key, n in (("a", 5), ("b", 1), ("c", 3)):
        for _ in range(n):
            cache.get(key, load)
    cache.get("d", load)  # evicts b: fewest uses
    assert sorted(cache.resident()) == ["a", "c", "d"]
    lru = ExpertCache(2 * 10, policy="lru")
    for key in "aab":
        lru.get(key, load)
    lru.get("a", load)
    lru.get("c", load)  # evicts b: least recently used
    assert sorted(lru.resident()) == ["a", "c"]
    assert lru.stats.hits + lru.stats.misses == lru.stats.uses == 5


def test_budget_too_small_is_refused(moe_folder):
    with pytest.raises(InsufficientMemoryError, match="raise --max-memory"):
        load_offloaded(moe_folder, 1000, dtype="fp32")


def test_quant_with_offload_is_refused(moe_folder):
    with pytest.raises(QuantizationError, match="ember quantize"):
        ember.load(moe_folder, device="cpu", quant="int8", offload="experts", max_memory=0.001)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_folder_offloads_its_experts_as_stored(hf_checkpoint, tmp_path, mode):
    """A folder from ``ember quantize`` offloads its experts quantized: same tokens as loading it whole, and the
    bytes read are the quantized experts' stored bytes."""
    from ember.loading.quantized import quantize_checkpoint

    folder, _ = hf_checkpoint("mixtral")
    out, _ = quantize_checkpoint(folder, tmp_path / mode, mode, group_size=32 if mode == "int4" else None)
    whole = ember.load(out, device="cpu", dtype="fp32", offload="off")
    want = _greedy(whole)
    model = load_offloaded(out, int(0.6 * _file_bytes(out)), dtype="fp32", prefetch=False)
    llm = ember.engine.Engine(model, whole.tokenizer, out)
    assert _greedy(llm) == want
    s = model.offload.stats()
    store = model.model.layers[0].mlp.experts.store
    assert store.quant.mode == mode
    assert s["bytes_read"] == s["misses"] * store.stored_bytes(0, 0)
    assert store.stored_bytes(0, 0) < _expert_bytes(load_offloaded(folder, _file_bytes(folder), dtype="fp32")) / 2


def test_memory_size_parsing():
    from ember.commands.common import memory_size

    assert memory_size("12GiB") == 12
    assert memory_size("800MB") == pytest.approx(800e6 / GiB)
    assert memory_size("1.5") == 1.5
    for bad in ("12XB", "-1", "GiB", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(bad)


def test_planner_offers_offload(moe_folder, hf_checkpoint):
    from ember.config import ModelConfig
    from ember.hardware import profile
    from ember.planner import Workload, plan, weight_bytes

    hw = profile("dgx-spark")
    cfg = ModelConfig.from_file(moe_folder)
    whole = plan(cfg, hw, Workload(context=64, dtype="fp32"), in_process=True)
    assert whole.fits and whole.offload is None
    cap = whole.memory.total - 0.5 * weight_bytes(cfg, "fp32").experts
    p = plan(cfg, hw, Workload(context=64, dtype="fp32"), max_memory=cap, in_process=True)
    assert not p.fits and p.runnable and p.offload.mode == "experts"
    assert 0 < p.offload.hit_rate < 1 and p.offload.disk_bytes_per_token > 0
    assert p.offload.decode_tok_s < p.decode_tok_s  # disk reads only add time
    dense = ModelConfig.from_file(hf_checkpoint("llama", num_hidden_layers=6, vocab_size=256)[0])
    whole = plan(dense, hw, Workload(context=64, dtype="fp32"), in_process=True)
    p = plan(dense, hw, Workload(context=64, dtype="fp32"), max_memory=0.8 * whole.memory.total, in_process=True)
    assert not p.fits and p.runnable and p.offload.mode == "layers"


def test_cli_generate_offloads_with_a_notice(moe_folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "ember", "generate", str(moe_folder), PROMPT, "-n", "8", "--context", "64",
            "--dtype", "fp32"]
    whole = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    size = f"{_planned_budget(moe_folder, 64)}B"
    off = subprocess.run(base + ["--max-memory", size], capture_output=True, text=True, env=env, timeout=300)
    assert whole.returncode == 0 and off.returncode == 0, off.stderr
    assert off.stdout == whole.stdout
    assert "running with offload" in off.stderr and "hit rate" in off.stderr and "GB read/token" in off.stderr
    refused = subprocess.run(base + ["--max-memory", size, "--offload", "off"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert refused.returncode != 0 and "--offload auto" in refused.stderr


def test_disk_read_rate_is_measured(tmp_path):
    from ember.offload.disk import disk_read_rate

    rate, direct = disk_read_rate(tmp_path, size=8 << 20, block=1 << 20)
    assert rate > 0 and isinstance(direct, bool)
    assert not list(tmp_path.iterdir())  # the probe file is gone


def test_eval_and_serve_run_offloaded(moe_folder, tmp_path, capsys):
    """`ember eval ppl` and the server over an offloaded model give what the whole model gives."""
    from fastapi.testclient import TestClient

    from ember.cli import main
    from ember.server.app import ServerSettings, create_app

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 200 + 3}" for i in range(80)))
    base = ["eval", "ppl", str(moe_folder), "--text", str(text), "--window", "32", "--stride", "16", "--json", "-q",
            "--dtype", "fp32"]
    assert main(base + ["--offload", "off"]) == 0
    want = json.loads(capsys.readouterr().out)["ppl"]
    assert main(base + ["--offload", "experts", "--max-memory", f"{_planned_budget(moe_folder, 32)}B"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["ppl"] == pytest.approx(want, rel=1e-5) and "running with offload" in out.err

    whole = ember.load(moe_folder, device="cpu", dtype="fp32", offload="off")
    llm = ember.load(moe_folder, device="cpu", dtype="fp32", offload="experts", context=64,
                     max_memory=_planned_budget(moe_folder, 64) / GiB)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(llm, ServerSettings(model_name="m", num_blocks=64))) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == whole.generate(PROMPT, max_new_tokens=8, temperature=0).text
    assert llm.model.offload.stats()["uses"] > 0


@pytest.mark.parametrize("name", ["glm4_moe", "deepseek_v3", "minimax_m2"])
def test_routed_moe_families_offload(name, tmp_path):
    """Sigmoid/group-limited routers, shared experts, MLA: offloading the routed experts changes no token."""
    import transformers

    from conftest import save_word_tokenizer
    from test_families import _hf_config

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(name), dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    whole = ember.load(tmp_path, device="cpu", dtype="fp32", offload="off")
    model = load_offloaded(tmp_path, int(0.7 * _file_bytes(tmp_path)), dtype="fp32")
    assert _greedy(ember.engine.Engine(model, whole.tokenizer, tmp_path), 12) == _greedy(whole, 12)
    assert model.offload.stats()["misses"] > 0


# ---------------------------------------------------------------------------------------------- the I/O threads


def _safetensors_file(path: Path, tensors: dict[str, torch.Tensor]) -> list:
    from safetensors.torch import save_file

    from ember.loading import Checkpoint

    save_file(tensors, str(path / "model.safetensors"))
    ckpt = Checkpoint(path)
    return [ckpt.info(n) for n in tensors]


def test_background_read_error_names_file_and_tensor(tmp_path):
    """A read that fails on an I/O thread (the file was truncated) raises a CheckpointError naming the file and
    tensor from the request's result, for one-chunk and many-chunk spans, and the pool keeps serving."""
    from ember.offload.reader import CHUNK

    infos = _safetensors_file(tmp_path, {"small": torch.randn(64), "big": torch.ones(CHUNK + CHUNK // 2, dtype=torch.uint8)})
    reader = DiskReader({infos[0].file})
    want = reader.submit(infos).result()
    assert want[1].shape == (CHUNK + CHUNK // 2,) and reader.pool.counters.chunks == 2  # one span, 2 chunks
    os.truncate(infos[0].file, infos[1].begin + CHUNK + 4096)  # the big tensor's span loses its tail
    req = reader.submit([infos[1]])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated.*'big'"):
        req.result()
    assert torch.equal(reader.read([infos[0]])[0], want[0])  # what is still there reads fine
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader.read([infos[0]])


def test_io_pool_runs_demand_first_and_cancels_unstarted_guesses(tmp_path):
    from ember.offload.aio import DEMAND, SPECULATIVE, IOPool

    infos = _safetensors_file(tmp_path, {"a": torch.randn(1024), "b": torch.randn(1024)})
    reader = DiskReader({infos[0].file}, threads=1)
    gate, entered, order = __import__("threading").Event(), __import__("threading").Event(), []
    blocker = reader.submit([infos[0]], then=lambda t: (entered.set(), gate.wait(30)))  # holds the only I/O thread
    assert entered.wait(30)
    guess = reader.submit([infos[1]], then=lambda t: order.append("guess"), priority=SPECULATIVE)
    later = reader.submit([infos[1]], then=lambda t: order.append("late guess"), priority=SPECULATIVE)
    need = reader.submit([infos[0]], then=lambda t: order.append("demand"), priority=DEMAND)
    assert guess.cancel() and not blocker.cancel()
    gate.set()
    need.result(timeout=30), later.result(timeout=30)
    assert order == ["demand", "late guess"] and guess.future.cancelled()
    assert reader.pool.counters.cancelled == 1 and isinstance(reader.pool, IOPool)
    reader.close()


def _io_threads() -> set:
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("ember-offload-io")}


def test_io_threads_end_with_the_session(moe_folder):
    """Closing the offload, or dropping the model, ends its I/O threads."""
    import gc

    from ember.engine import Engine
    from ember.tokenizer import Tokenizer

    before = _io_threads()
    model = load_offloaded(moe_folder, int(0.6 * _file_bytes(moe_folder)), dtype="fp32")
    Engine(model, Tokenizer.from_dir(moe_folder), moe_folder).generate(PROMPT,
                                                                                                 max_new_tokens=3)
    mine = _io_threads() - before
    assert mine and all(t.daemon for t in mine)
    model.offload.close()
    assert not any(t.is_alive() for t in mine)
    model = load_offloaded(moe_folder, int(0.6 * _file_bytes(moe_folder)), dtype="fp32")
    mine = _io_threads() - before
    assert mine
    model.offload.cache.drain()
    del model
    gc.collect()
    for t in mine:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in mine)


def test_truncated_checkpoint_with_prefetch_raises_not_hangs(moe_folder, tmp_path):
    """With reads on the I/O threads (demand and speculative), a truncated file still ends the run with the
    CheckpointError naming it, raised in the forward, instead of a hang."""
    import threading

    from ember.engine import Engine
    from ember.tokenizer import Tokenizer

    folder = tmp_path / "m"
    shutil.copytree(moe_folder, folder)
    model = load_offloaded(folder, int(0.5 * _file_bytes(folder)), dtype="fp32", prefetch=True)
    llm = Engine(model, Tokenizer.from_dir(folder), folder)
    _greedy(llm, 2)
    os.truncate(folder / "model.safetensors", 4096)
    got = []

    def run():
        try:
            for _ in range(8):
                _greedy(llm, 8)
        except BaseException as e:  # noqa: BLE001
            got.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the run hung on a failed background read"
    assert got and isinstance(got[0], CheckpointError) and "model.safetensors" in str(got[0])
    model.offload.close()
