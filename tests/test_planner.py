"""The planner is a model you can check (docs/design.md, principle 4).

- memory: arithmetic worked by hand for a few configs, and the sizes of real tensors (a meta-device
  Transformer, a StaticKVCache) for every family;
- catalog: our parameter counts against the publishers' (within 1%);
- DGX Spark facts: Llama 3.1 70B QLoRA fits and 16-bit LoRA does not; Llama 3.1 405B at 4-bit fits on
  two Sparks and not on one; Qwen3 235B-A22B at 4-bit decodes far faster than dense 70B;
- hardware: profiles, multiples, calibration stored atomically and reloaded;
- check_fits: the error names what is needed, what is available and what would fit;
- ``ember plan`` / ``ember hw``: tables and JSON for catalog names, HF folders and GGUF files.

Speed and peak-RSS accuracy against real runs live in ``bench/plan_accuracy.py`` (no timed asserts here).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from ember import calibrate, catalog, hardware, planner
from ember.config import ModelConfig
from ember.errors import InsufficientMemoryError
from ember.hardware import GB, GiB, Calibration, Hardware
from ember.cache import StaticKVCache
from ember.models import Transformer
from ember.planner import Workload

from conftest import FAMILIES, TINY


def cfg_of(name: str) -> ModelConfig:
    return catalog.get(name).config


# ====================================================================== memory model by hand


def test_llama31_8b_weights_by_hand():
    cfg = cfg_of("llama-3.1-8b")
    embed = 128256 * 4096                               # 525,336,576, and an untied head of the same size
    attn = 4096 * 4096 * 2 + 1024 * 4096 * 2            # q, o + k, v (8 kv heads x 128)
    mlp = 3 * 4096 * 14336
    per_layer = attn + mlp + 2 * 4096                   # + two RMSNorm weights
    total = 2 * embed + 32 * per_layer + 4096           # + final norm
    assert total == 8_030_261_248
    assert cfg.num_parameters() == total
    wb = planner.weight_bytes(cfg, "bf16")
    assert wb.total == 2 * total
    assert wb.embedding == wb.lm_head == 2 * embed
    # One decode token reads everything but the embedding table, of which one row.
    assert wb.read_per_step(1, 4096 * 2) == 2 * (total - embed + 4096)


def test_kv_cache_by_hand():
    cfg = cfg_of("llama-3.1-8b")
    # 32 layers x 8 kv heads x 128 dims x 8192 tokens x 2 (k, v) x 2 bytes = exactly 1 GiB.
    assert planner.kv_cache_bytes(cfg, 8192, 1, "bf16") == 32 * 8 * 128 * 8192 * 2 * 2 == GiB
    assert planner.kv_cache_bytes(cfg, 1000, 4, "fp32") == 32 * 8 * 128 * 1000 * 4 * 2 * 4
    # A sliding window caps the windowed layers when the cache keeps only the window.
    mistral = ModelConfig.from_dict({**catalog.MODELS["mistral-7b"]["config"], "sliding_window": 4096})
    full = planner.kv_cache_bytes(mistral, 8192, 1, "bf16", cap_window=False)
    assert planner.kv_cache_bytes(mistral, 8192, 1, "bf16", cap_window=True) == full // 2


def test_sliding_layers_priced_at_their_window_by_hand():
    # Gemma 3 27B at 128k: every 6th of its 62 layers is global (10), the other 52 keep a 1024-token window;
    # 16 kv heads x 128 dims x 2 (k, v) x 2 bytes = 8 KiB per token per layer
    from ember.cache import StaticKVCache

    cfg = cfg_of("gemma-3-27b")
    per_token = 16 * 128 * 2 * 2
    got = planner.kv_cache_bytes(cfg, 131072, 1, "bf16")
    assert got == (10 * 131072 + 52 * 1024) * per_token
    assert planner.kv_cache_bytes(cfg, 131072, 1, "bf16", cap_window=False) == 62 * 131072 * per_token
    # what the engine's cache allocates (on the meta device: no memory), and the server's pools
    assert StaticKVCache(cfg, 1, 131072, torch.bfloat16, "meta").nbytes() == got
    assert planner.kv_block_bytes(cfg, "bf16", 16) == 10 * 16 * per_token
    blocks = 1 + 4 * (-(-(1023 + 256) // 16) + 1)  # 4 sequences, each at most its window + one 256-token chunk
    assert planner.window_pool_bytes(cfg, "bf16", 16, 4, 256) == blocks * 52 * 16 * per_token


def test_quantized_linear_bytes_by_hand():
    # int4, groups of 128 with a bf16 scale and zero each: 4 + 32/128 = 4.25 bits per weight.
    assert planner.linear_bytes(4096, 4096, "int4", 2) == 4096 * 4096 / 2 + 4096 * 32 * 2 * 2 == 8_912_896
    # NF4, blocks of 64, absmax double-quantized to 8 bits + one fp32 per 256 blocks + one fp32 offset.
    blocks = 4096 * 4096 // 64
    assert planner.linear_bytes(4096, 4096, "nf4", 2) == 4096 * 4096 / 2 + blocks + blocks // 256 * 4 + 4
    assert abs(8 * planner.linear_bytes(4096, 4096, "nf4", 2) / 4096**2 - 4.127) < 1e-3
    # int8 per output channel: one byte per weight and one bf16 scale per row.
    assert planner.linear_bytes(4096, 1024, "int8", 2) == 4096 * 1024 + 4096 * 2


def test_tiny_int8_model_by_hand():
    cfg = ModelConfig.from_dict(dict(model_type="llama", **TINY))  # h 64, i 128, 2 layers, 4 heads, 2 kv (hd 16), V 256
    # Per layer, weights n and out-channel scales: q 64x64, k/v 32x64, o 64x64, gate/up 128x64, down 64x128.
    n = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192
    scales = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    layers = 2 * (n + scales)
    embed = head = 256 * 64 * 2                          # kept in bf16
    norms = (2 * 2 + 1) * 64 * 2
    assert planner.weight_bytes(cfg, "bf16", "int8").total == layers + embed + head + norms == 141_952


def test_lora_parameters_match_peft_llama3_8b():
    # PEFT prints "trainable params: 41,943,040" for Llama-3-8B, r=16, all seven projections.
    assert planner.lora_parameters(cfg_of("llama-3.1-8b"), 16) == 41_943_040


def test_moe_experts_touched_and_read():
    cfg = cfg_of("mixtral-8x7b")
    wb = planner.weight_bytes(cfg, "bf16")
    assert wb.experts_touched(1) == pytest.approx(2)
    assert wb.experts_touched(1000) == pytest.approx(8)
    # Batch 1 reads 2 of 8 experts: the active parameters (less the embedding table, plus one row).
    embed = cfg.vocab_size * cfg.hidden_size
    assert wb.read_per_step(1, cfg.hidden_size * 2) == pytest.approx(
        2 * (cfg.active_parameters() - embed + cfg.hidden_size), rel=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_bytes_equal_real_tensor_bytes(family):
    _, extra = FAMILIES[family]
    raw = {"model_type": {"llama-tied": "llama", "llama3-rope": "llama", "llama-bias": "llama", "qwen3-moe": "qwen3_moe",
                          "qwen3-moe-mixed": "qwen3_moe"}.get(family, family), **TINY, **extra}
    cfg = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = Transformer(cfg)
    seen, real = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            real += p.numel() * 2
    assert planner.weight_bytes(cfg, "bf16").total == real


def test_kv_cache_bytes_equal_static_cache():
    cfg = ModelConfig.from_dict(dict(model_type="llama", **TINY))
    cache = StaticKVCache(cfg, 3, 77, torch.bfloat16, "cpu")
    assert planner.kv_cache_bytes(cfg, 77, 3, "bf16") == cache.nbytes()


def test_decode_speed_from_bytes_by_hand():
    cfg = cfg_of("llama-3.1-8b")
    hw = Hardware(name="ideal", device="cuda", memory_bytes=80 * GiB, bandwidth=1000 * GB, flops={"bf16": 1e18},
                  decode_efficiency=1.0, compute_efficiency=1.0, layer_overhead_s=0, expert_overhead_s=0,
                  step_overhead_s=0)
    wl = Workload(context=4096, batch=1, dtype="bf16")
    t, nbytes = planner.decode_step_seconds(cfg, hw, wl, 4096)
    weights = 2 * (cfg.num_parameters() - 128256 * 4096 + 4096)
    kv = planner.kv_cache_bytes(cfg, 4096, 1, "bf16")
    assert nbytes == weights + kv
    assert t == pytest.approx((weights + kv) / 1e12, rel=1e-9)
    # On CPU the dispatch overhead adds to the streaming time; on a GPU it overlaps it.
    slow = replace(hw, layer_overhead_s=1e-3)
    assert planner.decode_step_seconds(cfg, replace(slow, device="cpu"), wl, 4096)[0] == pytest.approx(t + 32e-3)
    assert planner.decode_step_seconds(cfg, slow, wl, 4096)[0] == pytest.approx(max(t, 32e-3))


def _train_cfg() -> ModelConfig:
    # TINY (h 64, i 128, 2 layers, 4 heads of 16, 2 kv heads) with a vocab of 32768, so that one ~32 MiB
    # fp32 loss block is 33554432 / (4 * 32768) = 256 rows and a 512-token batch takes two of them.
    return ModelConfig.from_dict(dict(model_type="llama", **{**TINY, "vocab_size": 32768}))


def test_training_activations_by_hand():
    cfg = _train_cfg()
    # Per token and layer, bf16 (b = 2), LoRA dropout 0.05 on all seven projections (int64 indices: 8 * 0.05 B
    # per adapted input element):
    norm = 4 * 64 + 2 * 64                                      # fp32 copy of the input + normed output
    attn = norm + (2 * 64 + 2 * 32) * 2 + 4 * 4 + 0.4 * (64 + 64 + 64 + 64)   # q, k, v, SDPA out, lse, dropout
    mlp = norm + 4 * 128 * 2 + 0.4 * (64 + 64 + 128)            # gate, up, silu, product, dropout
    assert (attn, mlp) == (886.4, 1510.4)
    grads = 2 * 64 * 2 + 12 * 64 + 3 * 128 * 2                  # one half's backward buffers (SwiGLU's wider)
    # Two 256-row chunks: per logit fp32 + its bf16 copy + the previous chunk's fp32 block (4 + 2 + 4).
    loss2 = 512 * (2 * 64 * 2 + norm) + 256 * 32768 * 10
    assert planner.training_activation_bytes(cfg, 1, 512, "bf16", False) == pytest.approx(
        512 * 2 * (attn + mlp) + max(loss2, 512 * grads))
    # One chunk (256 tokens): no previous block.
    loss1 = 256 * (2 * 64 * 2 + norm) + 256 * 32768 * 6
    assert planner.training_activation_bytes(cfg, 1, 256, "bf16", False) == pytest.approx(
        256 * 2 * (attn + mlp) + loss1)
    # Checkpointing keeps each half's (B, T, H) input and rebuilds the wider half in backward.
    assert planner.training_activation_bytes(cfg, 2, 256, "bf16", True) == pytest.approx(
        512 * 2 * 2 * 64 * 2 + max(loss2, 512 * (mlp + grads)))


def test_training_memory_on_cpu_counts_heap_holes_and_onednn_by_hand():
    cfg = _train_cfg()
    wl = Workload(task="tune", method="lora", context=512, batch=1, dtype="bf16", grad_checkpointing=False)
    cpu, gpu = _box(40), replace(_box(40), device="cuda", unified=False)
    m_cpu, m_gpu = planner.memory(cfg, cpu, wl), planner.memory(cfg, gpu, wl)
    # 11 (B*T, H) bf16 blocks per layer left as holes in glibc's heap, and oneDNN's 18 MiB: CPU only.
    holes = 11 * 2 * 512 * 64 * 2
    assert m_cpu.detail["workspace.heap_holes"] == holes == 1_441_792
    assert m_cpu.detail["workspace.onednn"] == 18 << 20
    assert m_cpu.activations - m_gpu.activations == holes + (18 << 20)
    assert m_gpu.activations == planner.training_activation_bytes(cfg, 1, 512, "bf16", False)
    # Blocks over glibc's 32 MiB mmap ceiling leave no holes: the term stops growing at 32 MiB / (H b) tokens.
    big = planner.cpu_training_heap_bytes(cfg, 4, 1 << 20, "bf16")
    assert big == (11 * 2 * 64 * 2 * ((32 << 20) // (64 * 2)), 18 << 20)
    assert planner.cpu_training_heap_bytes(cfg, 1, 512, "fp32") == (11 * 2 * 64 * 4 * 512, 0)
    # LoRA state: r (in + out) per projection = 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192) per layer,
    # fp32 A/B + fp32 gradients + two AdamW moments + a bf16 copy = 18 bytes each.
    n = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert planner.lora_parameters(cfg, 16) == n == 32768
    assert m_cpu.training == m_gpu.training == 18 * n


def test_training_flops_by_hand():
    cfg = _train_cfg()
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64       # q, k, v, o, gate, up, down
    P = 2 * layer + 32768 * 64                                   # + the (untied) LM head
    attn = 2 * 512 * 64 * 2                                      # causal QK^T and PV: 2 T q per token and layer
    n = 32768
    wl = Workload(task="tune", method="lora", context=512, dtype="bf16", grad_checkpointing=False)
    assert planner.train_flops_per_token(cfg, wl) == 4 * P + 3 * attn + 6 * n == 9_273_344
    # The recompute skips the o_proj/down_proj base products (and the head).
    recompute = 2 * (2 * layer - 2 * 64 * 64 - 2 * 64 * 128) + attn + 2 * n
    ckpt = replace(wl, grad_checkpointing=True)
    assert planner.train_flops_per_token(cfg, ckpt) == 4 * P + 3 * attn + 6 * n + recompute
    full = replace(wl, method="full", grad_checkpointing=True)
    assert planner.train_flops_per_token(cfg, full) == 3 * (2 * P + attn) + 2 * 2 * layer + attn


def test_training_speed_uses_the_measured_efficiency(tmp_path, monkeypatch):
    cfg = _train_cfg()
    wl = Workload(task="tune", method="lora", context=512, dtype="bf16", grad_checkpointing=False)
    cal = _fake_cal(matmul_flops={"bf16": 1e12, "fp32": 2e11}, train_efficiency={"bf16": [(512, 0.2), (2048, 0.5)]})
    hw = hardware.apply_calibration(_box(40), cal)
    flops = planner.train_flops_per_token(cfg, wl)
    assert hw.train_efficiency("bf16", 64) == 0.2                          # clamped below the smallest measured
    assert hw.train_efficiency("bf16", 1024) == pytest.approx(math.sqrt(0.2 * 0.5))   # log-log in between
    assert hw.train_efficiency("fp32", 4096) == 0.5                        # another dtype's, clamped above
    assert planner.train_tokens_per_second(cfg, hw, wl) == pytest.approx(1e12 * 0.2 / flops)
    # A calibration stored before training steps were measured still loads, and falls back to compute_efficiency.
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    old = _fake_cal().to_json()
    del old["train_efficiency"]
    stored = {"version": hardware.CALIBRATION_VERSION, "devices": {"cpu": old}}
    (tmp_path / "hardware.json").write_text(json.dumps(stored))
    back = hardware.load_calibration("cpu")
    assert back is not None and back.train_efficiency == {}
    hw_old = hardware.apply_calibration(_box(40), back)
    assert hw_old.train_efficiency("bf16", 768) == hw_old.compute_efficiency == 0.8
    assert planner.train_tokens_per_second(cfg, hw_old, wl) == pytest.approx(1e12 * 0.8 / flops)
    # ... and one with it round-trips.
    hardware.save_calibration(cal)
    assert hardware.load_calibration("cpu") == cal


# ====================================================================== catalog


@pytest.mark.parametrize("name", catalog.names())
def test_catalog_parameter_counts_match_published(name):
    e = catalog.get(name)
    ours = e.config.num_parameters()
    # 1%, or half the unit the total was published to ("8B")
    assert abs(ours / e.published_params - 1) < max(0.01, e.published_precision / 2 / e.published_params), \
        (name, ours, e.published_params)
    if e.published_active_params:
        # Active counts are published to one decimal ("3.3B" for 3.35B): allow one unit of it, else 1%.
        tol = max(0.01, 0.1e9 / e.published_active_params)
        assert abs(e.config.active_parameters() / e.published_active_params - 1) <= tol


def test_catalog_lookup_is_forgiving():
    assert catalog.get("Qwen/Qwen3-235B-A22B").name == "qwen3-235b-a22b"
    assert catalog.get("Llama-3.3-70B-Instruct").name == "llama-3.1-70b"
    assert catalog.find("no-such-model") is None
    with pytest.raises(KeyError, match="llama-3.1-8b"):
        catalog.get("no-such-model")


# ====================================================================== DGX Spark facts


def test_spark_70b_qlora_fits_and_16bit_lora_does_not():
    cfg, spark = cfg_of("llama-3.1-70b"), hardware.profile("dgx-spark")
    qlora = planner.plan(cfg, spark, Workload(task="tune", method="qlora", context=2048))
    lora = planner.plan(cfg, spark, Workload(task="tune", method="lora", context=2048))
    assert qlora.fits and qlora.memory.total < 0.6 * spark.usable_bytes
    assert not lora.fits and lora.memory.weights > spark.usable_bytes  # 141 GB of bf16 weights alone


def test_405b_at_4bit_needs_two_sparks():
    cfg = cfg_of("llama-3.1-405b")
    wl = Workload(quant="int4", context=8192)
    one = planner.plan(cfg, hardware.profile("dgx-spark"), wl)
    two = planner.plan(cfg, hardware.profile("2xdgx-spark"), wl)
    assert not one.fits and two.fits
    assert 200 * GiB < two.memory.weights < 215 * GiB  # 4.25 bits x 401.6B linear params + 16-bit embeddings
    nf4 = planner.plan(cfg, hardware.profile("2xdgx-spark"), replace(wl, quant="nf4"))
    assert nf4.fits


def test_qwen3_235b_moe_decodes_far_faster_than_dense_70b():
    two = hardware.profile("2xdgx-spark")
    moe = planner.plan(cfg_of("qwen3-235b-a22b"), two, Workload(quant="int4", context=8192))
    dense = planner.plan(cfg_of("llama-3.1-70b"), hardware.profile("dgx-spark"), Workload(quant="int4", context=8192))
    assert moe.fits and dense.fits
    assert moe.decode_tok_s > 2.5 * dense.decode_tok_s
    # 22B active of 235B: bytes per step are ~a third of the dense 70B's although the model is 3x larger.
    assert moe.bytes_per_step < 0.4 * dense.bytes_per_step


# ====================================================================== hardware


def test_profiles_and_multiples():
    spark = hardware.profile("dgx-spark")
    assert spark.unified and spark.bandwidth == 273 * GB and spark.memory_bytes == 128 * GB
    assert "nvidia.com" in spark.source
    two = hardware.profile("2xdgx-spark")
    assert two.nodes == 2 and two.usable_bytes == spark.usable_bytes
    assert hardware.profile(" 4 x H100-80G ").nodes == 4
    for name, hw in hardware.PROFILES.items():
        assert hw.memory_bytes > 0 and hw.bandwidth > 0 and hw.flops.get("bf16", 0) > 0 and hw.source, name
    with pytest.raises(KeyError, match="dgx-spark"):
        hardware.profile("tpu-v9")


def test_detect_this_machine():
    hw = hardware.detect("cpu", use_calibration=False)
    total, avail = hardware.system_memory()
    assert hw.device == "cpu" and hw.memory_bytes == total > 0 and 0 < hw.usable_bytes <= total
    assert hw.cpu_cores >= 1


def _fake_cal(**kw) -> Calibration:
    base = dict(device="cpu", fingerprint=hardware.fingerprint("cpu"),
                stream={"mv-bf16": [(16 << 20, 40e9), (1 << 30, 20e9)], "mv-fp32": [(1 << 30, 20e9)]},
                copy_bandwidth=30e9, matmul_flops={"bf16": 1e12, "fp32": 2e11},
                layer_overhead_s={"bf16": 2e-4, "fp32": 1e-4}, expert_overhead_s={"bf16": 3e-5, "fp32": 3e-5},
                step_overhead_s={"bf16": 1e-4, "fp32": 1e-4}, runtime_bytes=300 << 20)
    return Calibration(**{**base, **kw})


def test_quantized_decode_streams_the_16bit_head_at_the_float_rate():
    # A calibration where the int4 kernel streams at 10 GB/s and bf16 at 40: the projections (4-bit)
    # take bytes/10e9, the untied bf16 head and the norms bytes/40e9; the embedding row is a copy.
    cal = _fake_cal(stream={"mv-bf16": [(1, 40e9)], "mv-int4": [(1, 10e9)], "mv-fp32": [(1, 40e9)]})
    hw = Hardware(name="cal", device="cuda", memory_bytes=80 * GiB, bandwidth=1000 * GB, flops={"bf16": 1e18},
                  decode_efficiency=1.0, compute_efficiency=1.0, layer_overhead_s=0, expert_overhead_s=0,
                  step_overhead_s=0, calibration=replace(cal, layer_overhead_s={}, expert_overhead_s={},
                                                         step_overhead_s={}))
    cfg = cfg_of("llama-3.1-8b")
    wl = Workload(context=1, batch=1, dtype="bf16", quant="int4", lm_head="none")
    t, nbytes = planner.decode_step_seconds(cfg, hw, wl, 1)
    wb = planner.weight_bytes(cfg, "bf16", "int4")
    row = cfg.hidden_size * 2
    kv = planner.kv_cache_bytes(cfg, 1, 1, "bf16")
    assert nbytes == pytest.approx(wb.attention + wb.mlp + wb.lm_head + wb.other + row + kv)
    want = (wb.attention + wb.mlp) / 10e9 + (wb.lm_head + wb.other + row) / 40e9 + kv / 40e9
    assert t == pytest.approx(want, rel=1e-6)


def test_quantized_decode_streams_an_int8_head_at_the_int8_rate():
    # The loader's default under --quant int4: the head in int8, streamed at the int8 kernel's 20 GB/s.
    cal = _fake_cal(stream={"mv-bf16": [(1, 40e9)], "mv-int4": [(1, 10e9)], "mv-int8": [(1, 20e9)],
                            "mv-fp32": [(1, 40e9)]})
    hw = Hardware(name="cal", device="cuda", memory_bytes=80 * GiB, bandwidth=1000 * GB, flops={"bf16": 1e18},
                  decode_efficiency=1.0, compute_efficiency=1.0, layer_overhead_s=0, expert_overhead_s=0,
                  step_overhead_s=0, calibration=replace(cal, layer_overhead_s={}, expert_overhead_s={},
                                                         step_overhead_s={}))
    cfg = cfg_of("llama-3.1-8b")
    wl = Workload(context=1, batch=1, dtype="bf16", quant="int4")
    assert wl.head_quant == "int8" and Workload(task="tune", method="qlora").head_quant == "none"
    t, nbytes = planner.decode_step_seconds(cfg, hw, wl, 1)
    wb = planner.weight_bytes(cfg, "bf16", "int4", "int8")
    assert wb.lm_head == pytest.approx(cfg.vocab_size * (cfg.hidden_size + 2))  # int8 codes + a bf16 scale per row
    row = cfg.hidden_size * 2
    kv = planner.kv_cache_bytes(cfg, 1, 1, "bf16")
    assert nbytes == pytest.approx(wb.attention + wb.mlp + wb.lm_head + wb.other + row + kv)
    want = (wb.attention + wb.mlp) / 10e9 + wb.lm_head / 20e9 + (wb.other + row) / 40e9 + kv / 40e9
    assert t == pytest.approx(want, rel=1e-6)


def test_quantized_kernels_use_their_own_measured_stream_efficiency():
    # int4 was measured in a real quantized decode (0.9 of its streaming rate); int8 was not: it takes
    # the float dtype's (0.8), as does the float fallback when a kernel's curve is missing
    cal = _fake_cal(stream={"mv-bf16": [(1, 40e9)], "mv-int4": [(1, 10e9)], "mv-int8": [(1, 20e9)]},
                    stream_efficiency={"bf16": 0.8, "int4": 0.9})
    hw = Hardware(name="cal", device="cpu", memory_bytes=80 * GiB, bandwidth=1000 * GB, flops={"bf16": 1e12},
                  decode_efficiency=1.0, calibration=cal)
    assert hw.stream_bandwidth("mv-int4", 1 << 20, fallback="mv-bf16") == pytest.approx(9e9)
    assert hw.stream_bandwidth("mv-int8", 1 << 20, fallback="mv-bf16") == pytest.approx(16e9)
    assert hw.stream_bandwidth("mv-nf4", 1 << 20, fallback="mv-bf16") == pytest.approx(32e9)
    assert hw.stream_bandwidth("mv-bf16", 1 << 20) == pytest.approx(32e9)


def test_qlora_plans_use_the_measured_qlora_steps():
    cal = _fake_cal(train_efficiency={"bf16": [(768, 0.2), (2048, 0.4)], "bf16-qlora": [(768, 0.1), (2048, 0.2)]})
    hw = Hardware(name="cal", device="cpu", memory_bytes=80 * GiB, bandwidth=100 * GB, flops={"bf16": 1e12},
                  calibration=cal)
    assert hw.train_efficiency("bf16", 2048) == pytest.approx(0.4)
    assert hw.train_efficiency("bf16", 2048, "qlora") == pytest.approx(0.2)
    cfg = cfg_of("llama-3.2-1b")
    lora = planner.train_tokens_per_second(cfg, hw, Workload(task="tune", method="lora", context=512, dtype="bf16"))
    qlora = planner.train_tokens_per_second(cfg, hw, Workload(task="tune", method="qlora", context=512, dtype="bf16"))
    assert qlora == pytest.approx(lora / 2, rel=1e-6)
    # without a QLoRA measurement, QLoRA takes the LoRA one; a calibration with only QLoRA keeps LoRA off it
    hw_lora = replace(hw, calibration=_fake_cal(train_efficiency={"bf16": [(768, 0.2)]}))
    assert hw_lora.train_efficiency("bf16", 2048, "qlora") == pytest.approx(0.2)
    hw_q = replace(hw, calibration=_fake_cal(train_efficiency={"bf16-qlora": [(768, 0.1)]}), compute_efficiency=0.3)
    assert hw_q.train_efficiency("bf16", 768) == pytest.approx(0.3)


def test_qlora_step_efficiency_is_measured_on_nf4_weights():
    pytest.importorskip("ember.train")
    import torch

    eff = calibrate._train_step_efficiency(torch.device("cpu"), "fp32", 1e11, 64, 1, 16, steps=1, method="qlora")
    assert 0.01 <= eff <= 1.0


def test_calibration_roundtrip_and_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    cal = _fake_cal()
    path = hardware.save_calibration(cal)
    assert path == tmp_path / "hardware.json" and not list(tmp_path.glob(".hardware-*"))  # temp file renamed away
    back = hardware.load_calibration("cpu")
    assert back == cal
    # Log-linear between measured sizes, clamped outside.
    mid = back.bandwidth("mv-bf16", math.sqrt((16 << 20) * (1 << 30)))
    assert mid == pytest.approx(math.sqrt(40e9 * 20e9))
    assert back.bandwidth("mv-bf16", 1) == 40e9 and back.bandwidth("mv-bf16", 1 << 40) == 20e9
    hw = hardware.detect("cpu")
    assert hw.measured and hw.runtime_bytes == 300 << 20 and hw.peak_flops("bf16") == 1e12
    # Another machine's calibration is ignored.
    hardware.save_calibration(_fake_cal(fingerprint="some other box"))
    assert hardware.load_calibration("cpu") is None
    (tmp_path / "hardware.json").write_text("{not json")
    assert hardware.load_calibration("cpu") is None


def test_measure_quick_stores_a_usable_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    cal = calibrate.measure("cpu", quick=True)
    assert hardware.load_calibration("cpu") == cal
    assert all(b > 1e8 for pts in cal.stream.values() for _, b in pts)   # > 0.1 GB/s: numbers, not garbage
    assert cal.matmul_flops["fp32"] > 1e9 and 50 << 20 < cal.runtime_bytes < 4 << 30
    assert set(cal.layer_overhead_s) == set(cal.matmul_flops)
    (dt, pts), = cal.train_efficiency.items()                           # LoRA steps in the training dtype
    assert dt in cal.matmul_flops and all(0 < e <= 1 for _, e in pts)


# ====================================================================== check_fits / kv budget


def _box(gib: float) -> Hardware:
    return Hardware(name="box", device="cpu", memory_bytes=int(64 * GiB), available_bytes=int(gib * GiB),
                    bandwidth=50 * GB, flops={"bf16": 1e12, "fp32": 1e12}, runtime_bytes=300 << 20)


def test_check_fits_passes_and_says_what_would_fit():
    cfg = cfg_of("llama-3.1-8b")
    p = planner.check_fits(cfg, "cpu", torch.bfloat16, None, 4096, 1, hardware=_box(40))
    assert p.fits and p.memory.runtime == 0  # in-process: the runtime is already paid
    with pytest.raises(InsufficientMemoryError) as e:
        planner.check_fits(cfg, "cpu", "bf16", None, 4096, 1, hardware=_box(8))
    msg = str(e.value)
    assert "bf16 needs 1" in msg and "8.0 GiB available" in msg and "int4 (bf16) needs" in msg
    # --max-memory caps what is available and is named as the limit.
    with pytest.raises(InsufficientMemoryError, match="GiB --max-memory"):
        planner.check_fits(cfg, "cpu", "bf16", None, 4096, 1, max_memory=10, hardware=_box(40))
    # Nothing fits: say so, with the smallest weights.
    with pytest.raises(InsufficientMemoryError, match="nothing fits"):
        planner.check_fits(cfg, "cpu", "bf16", None, 4096, 1, hardware=_box(2))


def test_check_fits_suggests_a_shorter_context():
    cfg = cfg_of("llama-3.1-8b")
    with pytest.raises(InsufficientMemoryError, match="tokens of context fit") as e:
        planner.check_fits(cfg, "cpu", "bf16", "int4", 131072, 1, hardware=_box(12))
    assert "--context" in str(e.value)


def test_max_context_and_batch_are_the_edges_of_fitting():
    cfg, hw = cfg_of("llama-3.1-8b"), _box(24)
    p = planner.plan(cfg, hw, Workload(context=8192, batch=1))
    edge = planner.plan(cfg, hw, Workload(context=p.max_context, batch=1))
    over = planner.plan(cfg, hw, Workload(context=p.max_context + 1, batch=1))
    assert edge.fits and not over.fits
    assert planner.plan(cfg, hw, Workload(context=8192, batch=p.max_batch)).fits
    assert not planner.plan(cfg, hw, Workload(context=8192, batch=p.max_batch + 1)).fits


def test_kv_budget_leaves_room_for_a_prefill_chunk():
    cfg = cfg_of("llama-3.2-1b")
    budget = planner.kv_budget_bytes(cfg, "cpu", "bf16", hardware=_box(8), prefill_chunk=256)
    assert 0.8 * 8 * GiB < budget < 0.9 * 8 * GiB
    assert planner.kv_budget_bytes(cfg, "cpu", "bf16", hardware=_box(8), loaded=False) < budget - 2 * GiB


def test_recommendation_prefers_quality_that_fits():
    cfg = cfg_of("llama-3.1-8b")
    plans = planner.options(cfg, _box(40), Workload(context=4096))
    assert planner.recommend(plans).workload.quant == "none"
    plans = planner.options(cfg, _box(12), Workload(context=4096))
    assert planner.recommend(plans).workload.quant == "int8"


# ====================================================================== ember plan / ember hw


def _cli(*argv: str) -> argparse.Namespace:
    from ember.plan_cli import add_parser

    ap = argparse.ArgumentParser(prog="ember")
    add_parser(ap.add_subparsers(dest="verb"))
    return ap.parse_args(list(argv))


def test_plan_cli_table_for_catalog_model(capsys):
    args = _cli("plan", "llama-3.1-70b", "--on", "dgx-spark", "--task", "tune")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "qlora (nf4)" in out and "lora (bf16)" in out and "NO" in out and "recommended: qlora (nf4)" in out


def test_plan_cli_json(capsys):
    args = _cli("plan", "qwen3-235b-a22b", "--on", "2xdgx-spark", "--quant", "int4", "--json")
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    (opt,) = out["options"]
    assert opt["fits"] and opt["nodes"] == 2 and opt["decode_tok_s"] > 0 and out["recommended"] == "int4 (bf16)"
    assert opt["memory_bytes"]["total"] == pytest.approx(sum(opt["memory_bytes"][k] for k in
                                                             ("weights", "kv_cache", "activations", "training", "runtime")))


def test_plan_cli_reads_hf_folder_and_gguf(hf_checkpoint, tmp_path, capsys):
    folder, hf = hf_checkpoint("llama")
    args = _cli("plan", str(folder), "--context", "256", "--json")
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"][0]["params"] == ModelConfig.from_file(folder).num_parameters()
    assert any("safetensors" in n for n in out["notes"])

    from test_gguf import write_model_gguf

    path = write_model_gguf(tmp_path / "m.gguf", hf, "llama", "Q8_0")
    args = _cli("plan", str(path), "--context", "128")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "GGUF file" in out and "Q8_0" in out


def test_plan_cli_unknown_model_is_one_clear_error():
    from ember.errors import ConfigError

    args = _cli("plan", "no-such-model")
    with pytest.raises(ConfigError, match="catalog: llama-3.1-8b"):
        args.func(args)


def test_hw_cli_shows_profile_and_this_machine(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    args = _cli("hw", "--on", "dgx-spark")
    assert args.func(args) == 0
    assert "273 GB/s" in capsys.readouterr().out
    args = _cli("hw")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "system memory" in out and "ember hw --measure" in out


def test_kv_pool_is_sized_by_the_planner(hf_checkpoint):
    """One owner for KV-pool sizing: a block priced as the paged cache allocates it, the pool capped at
    max_batch full contexts, and BatchScheduler's default pool is the planner's."""
    import ember
    from ember.cache import PagedKVCache
    from ember.scheduler import BatchScheduler

    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    cfg = llm.config
    per_block = planner.kv_block_bytes(cfg, torch.float32, 16)
    cache = PagedKVCache(cfg, 3, 16, torch.float32, "cpu")
    assert per_block * 3 == cache.nbytes() and planner.kv_block_bytes(cfg, "fp32", 16) == per_block
    ctx_blocks = math.ceil(cfg.max_position_embeddings / 16)
    assert planner.kv_pool_blocks(cfg, torch.float32, 10**12, max_batch=3, block_size=16) == 3 * ctx_blocks + 1
    assert planner.kv_pool_blocks(cfg, torch.float32, 40 * per_block, max_batch=8, block_size=16) == 40  # scratch included
    with pytest.raises(InsufficientMemoryError, match="--kv-blocks"):
        planner.kv_pool_blocks(cfg, torch.float32, per_block, max_batch=1, block_size=16)
    sched = BatchScheduler(llm, max_batch=8, block_size=16, kv_memory_bytes=40 * per_block)
    assert sched.pool.num_blocks == 40 and sched.pool.capacity == 39
    # no budget given: the planner's budget for this device, capped at max_batch full contexts
    sched = BatchScheduler(llm, max_batch=2, block_size=16)
    assert sched.pool.num_blocks == planner.default_kv_pool_blocks(cfg, "cpu", torch.float32, 2, 16) == 2 * ctx_blocks + 1


def test_plan_prices_gpt_oss_sliding_layers_at_their_window(capsys):
    """`ember plan gpt-oss-120b --on dgx-spark --quant mxfp4 --context 131072`: the KV cache is the 18 full layers at
    131,072 tokens plus the 18 sliding layers at their 128-token window, counted by hand from the config."""
    args = _cli("plan", "gpt-oss-120b", "--on", "dgx-spark", "--quant", "mxfp4", "--context", "131072", "--json")
    assert args.func(args) == 0
    (opt,) = json.loads(capsys.readouterr().out)["options"]
    c = catalog.MODELS["gpt-oss-120b"]["config"]
    per_token = 2 * c["num_key_value_heads"] * c["head_dim"] * 2  # K and V, bf16
    full = c["layer_types"].count("full_attention")
    sliding = c["layer_types"].count("sliding_attention")
    assert (full, sliding) == (18, 18)
    assert opt["memory_bytes"]["kv_cache"] == per_token * (full * 131072 + sliding * c["sliding_window"])
    assert opt["fits"]


def test_main_kv_pool_leaves_ring_layers_to_the_window_pool(tmp_path):
    """A gpt-oss server's main pool prices a block with the full layers only; the sliding layers' blocks are the
    window pool's, a fixed size for max_batch sequences; both as PagedKVCache allocates them."""
    from ember.cache import PagedKVCache

    cfg = ModelConfig.from_dict({**catalog.MODELS["gpt-oss-120b"]["config"], "num_hidden_layers": 4,
                                 "layer_types": ["sliding_attention", "full_attention"] * 2})
    bs, batch, chunk = 16, 3, 64
    per_token = 2 * 8 * 64 * 4  # K and V, 8 kv heads x 64, fp32
    assert planner.kv_block_bytes(cfg, torch.float32, bs) == 2 * per_token * bs  # the 2 full layers
    # a pass of up to 64 tokens reads back 127: ceil(191 / 16) + 1 = 13 blocks per sequence, + 1 scratch
    window = planner.window_pool_bytes(cfg, torch.float32, bs, batch, chunk)
    assert window == (1 + batch * 13) * 2 * per_token * bs
    cache = PagedKVCache(cfg, 100, bs, torch.float32, "cpu", max_seqs=batch, prefill_chunk=chunk)
    assert cache.nbytes() == 100 * planner.kv_block_bytes(cfg, torch.float32, bs) + window
    budget = window + 60 * planner.kv_block_bytes(cfg, torch.float32, bs)
    assert planner.kv_pool_blocks(cfg, torch.float32, budget, batch, bs, prefill_chunk=chunk) == 60
    with pytest.raises(InsufficientMemoryError, match="sliding-window blocks"):
        planner.kv_pool_blocks(cfg, torch.float32, window, batch, bs, prefill_chunk=chunk)
