"""Hybrid models with recurrent state (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) against HF transformers.

Tiny random checkpoints written with ``save_pretrained``; fp32 logits within 1e-4 of HF at prefill and every
decode step, ragged batches, chunked prefill, greedy generations, and the scheduler's state slots.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ember
from conftest import save_word_tokenizer
from ember.cache import PagedKVCache, StaticKVCache, bytes_per_sequence, layer_specs
from ember.config import ModelConfig
from ember.loading import load_model
from ember.models.gated_deltanet import chunk_gated_delta_rule, recurrent_gated_delta_rule
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqRequest

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)


def _hf_model(family: str):
    """A random HF model of ``family`` with non-trivial norm weights (norms init at 0 or 1 hide bugs)."""
    torch.manual_seed(0)
    if family == "qwen3_next":
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3NextConfig(**TEXT, **MOE))
    elif family == "qwen3_5_text":
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(**TEXT))
    elif family == "qwen3_5_moe_text":
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE))
    elif family == "qwen3_5":  # the multimodal wrapper
        cfg = transformers.Qwen3_5Config(text_config=TEXT, vision_config=VISION)
        model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    elif family == "qwen3_5_moe":
        cfg = transformers.Qwen3_5MoeConfig(text_config={**TEXT, **MOE}, vision_config=VISION)
        model = transformers.Qwen3_5MoeForConditionalGeneration(cfg)
    else:
        raise KeyError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p) + (1.0 if "linear_attn.norm" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict = {}

    def make(family: str):
        if family not in cache:
            model = _hf_model(family)
            folder = Path(tmp_path_factory.mktemp(f"hybrid-{family}"))
            model.save_pretrained(folder)
            save_word_tokenizer(folder)
            cache[family] = (folder, model)
        return cache[family]

    return make


FAMILIES = ["qwen3_next", "qwen3_5_text", "qwen3_5", "qwen3_5_moe"]


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_hf(checkpoint, family):
    folder, hf = checkpoint(family)
    model = load_model(folder, dtype="fp32")
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, 90))  # > one 64-token chunk of the delta rule
    cache = StaticKVCache(model.config, 1, 100, torch.float32, "cpu")
    with torch.no_grad():
        out = model(ids, cache=cache)
        cache.advance(ids.shape[1])
        assert (out - _hf_logits(hf, ids)).abs().max() < 1e-4
        for _ in range(4):
            nxt = torch.randint(3, 256, (1, 1))
            ids = torch.cat([ids, nxt], 1)
            step = model(nxt, cache=cache, start=cache.pos)[:, -1]
            cache.advance(1)
            assert (step - _hf_logits(hf, ids)[:, -1]).abs().max() < 1e-4


def check_ragged_batch_against_hf(folder, hf, lengths) -> None:
    """Left-padded rows of ``lengths``: every row's logits equal HF's for it alone, prefill and 3 decode steps."""
    model = load_model(folder, dtype="fp32")
    torch.manual_seed(2)
    rows = [torch.randint(3, 256, (n,)) for n in lengths]
    longest, B = max(len(r) for r in rows), len(rows)
    ids = torch.zeros(B, longest, dtype=torch.long)
    valid = torch.zeros(B, longest + 3, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = r
        valid[i, longest - len(r):] = True
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp_min(0)
    cache = StaticKVCache(model.config, B, longest + 3, torch.float32, "cpu")
    with torch.no_grad():
        out = model(ids, positions, cache, 0, valid, last_only=True)[:, -1]
        cache.advance(longest)
        nxt = torch.randint(3, 256, (B, 3))
        steps = []
        for t in range(3):
            pos = positions[:, -1:] + 1 + t
            steps.append(model(nxt[:, t:t + 1], pos, cache, cache.pos, valid)[:, -1])
            cache.advance(1)
    for i, r in enumerate(rows):
        assert (out[i] - _hf_logits(hf, r[None])[0, -1]).abs().max() < 1e-4
        for t in range(3):
            full = torch.cat([r, nxt[i, :t + 1]])[None]
            assert (steps[t][i] - _hf_logits(hf, full)[0, -1]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_ragged_batch_matches_hf_rows(checkpoint, family):
    check_ragged_batch_against_hf(*checkpoint(family), (7, 70, 33))


def check_chunked_prefill(folder, cuts: tuple[int, ...]) -> None:
    """A prompt fed in pieces ending at ``cuts`` gives the logits of one pass."""
    model = load_model(folder, dtype="fp32")
    n = cuts[-1]
    ids = torch.randint(3, 256, (2, n))
    with torch.no_grad():
        whole = model(ids)
        cache = StaticKVCache(model.config, 2, n, torch.float32, "cpu")
        parts = []
        for a, b in zip((0,) + cuts[:-1], cuts):
            parts.append(model(ids[:, a:b], cache=cache, start=a))
            cache.advance(b - a)
    assert (torch.cat(parts, 1) - whole).abs().max() < 1e-4


def test_chunked_prefill_equals_one_shot(checkpoint):
    check_chunked_prefill(checkpoint("qwen3_5_text")[0], (10, 80, 81, 150))


def test_chunked_delta_rule_equals_recurrence():
    torch.manual_seed(3)
    B, H, T, dk, dv = 2, 3, 150, 8, 4
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, dk), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, dv)
    g, beta = -torch.rand(B, H, T) * 3, torch.rand(B, H, T)
    s0 = torch.randn(B, H, dk, dv)
    o1, s1 = chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk=16)
    o2, s2 = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    assert (o1 - o2).abs().max() < 1e-4 and (s1 - s2).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_greedy_generation_matches_hf(checkpoint, family):
    check_greedy_against_hf(*checkpoint(family), (5, 29))


def check_greedy_against_hf(folder, hf, lengths) -> None:
    """32 greedy tokens after prompts of ``lengths``, batched in Ember, equal HF's generate for each alone."""
    llm = ember.load(folder, dtype="fp32")
    torch.manual_seed(4)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in lengths]
    results = llm.generate(prompts, max_new_tokens=32, temperature=0, ignore_eos=True)
    for p, r in zip(prompts, results):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert r.token_ids == ref


def test_wrapper_config_and_mtp_weights_kept(checkpoint, tmp_path):
    folder, _ = checkpoint("qwen3_5")
    cfg = ModelConfig.from_file(folder)
    assert cfg.model_type == "qwen3_5_text" and cfg.multimodal and cfg.partial_rotary_factor == 0.25
    # a published checkpoint also carries the multi-token-prediction head: it loads and is kept, not rejected
    import shutil

    copy = tmp_path / "with-mtp"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    model = load_model(copy, dtype="fp32")
    assert torch.equal(model.extra_weights["mtp.fc.weight"], tensors["mtp.fc.weight"])


def test_state_is_priced_per_sequence():
    cfg = ModelConfig.from_dict({"model_type": "qwen3_5_text", **TEXT,
                                 "layer_types": ["linear_attention"] * 3 + ["full_attention"]})
    specs = layer_specs(cfg)
    assert [s.kind for s in specs] == ["recurrent"] * 3 + ["full_attention"]
    conv = 2 * 2 * 16 + 4 * 16
    expect = (conv * 3 + 4 * 16 * 16) * 4  # fp32 state
    assert bytes_per_sequence(specs[0], torch.bfloat16, 10) == expect
    assert bytes_per_sequence(specs[0], torch.bfloat16, 100_000) == expect
    assert PagedKVCache.bytes_per_token(cfg, torch.bfloat16) == 2 * 2 * 32 * 2  # one attention layer's k/v


def test_scheduler_serves_concurrent_sequences_with_state(checkpoint):
    folder, _ = checkpoint("qwen3_next")
    llm = ember.load(folder, dtype="fp32")
    torch.manual_seed(5)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (40, 9, 23)]
    alone = [llm.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids for p in prompts]
    sched = BatchScheduler(llm, max_batch=2, block_size=8, prefill_chunk=16)  # chunked prefill, 2 state slots
    got: dict[int, list[int]] = {}
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ids = sched.submit([SeqRequest(p, params, on_event=lambda e: got.setdefault(e.seq_id, []).append(e.token_id))
                        for p in prompts])
    sched.run_until_idle()
    assert [got[i] for i in ids] == alone
    assert sched.cache.states.num_free == 2 and sched.metrics()["prefix_hit_tokens"] == 0

    # cancel frees the slot: a cancelled sequence's slot goes to the next one, whose output is unaffected
    got.clear()
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    first = sched.submit([SeqRequest(prompts[0], long, on_event=lambda e: got.setdefault(e.seq_id, []).append(1))])
    for _ in range(3):
        sched.step()
    assert sched.cache.states.num_free == 1
    sched.cancel(first[0])
    sched.step()
    assert sched.cache.states.num_free == 2
    again = sched.submit([SeqRequest(prompts[1], params, on_event=lambda e: got.setdefault(e.seq_id, []).append(
        e.token_id))])
    sched.run_until_idle()
    assert got[again[0]] == alone[1] and sched.cache.states.num_free == 2


@pytest.fixture(params=["native", "portable"])
def state_kernels(request, monkeypatch):
    """The kernel library built the given way, with the runtime's state-update slots filled."""
    from ember import kernels
    from ember.models import accel
    from ember.runtime import install, recurrent

    monkeypatch.setenv("EMBER_KERNELS", request.param)
    kernels.reset()
    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    assert (kernels.load().ember_kernels_isa() == 0) == (request.param == "portable")
    install()
    assert accel.gated_delta_step is recurrent.gated_delta_step
    yield recurrent
    monkeypatch.delenv("EMBER_KERNELS")
    kernels.reset()


@pytest.mark.parametrize("dk,dv", [(16, 16), (8, 20), (128, 128)])
def test_native_delta_rule_step_equals_torch(state_kernels, dk, dv):
    torch.manual_seed(6)
    B, H = 2, 3
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, 1, dk), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(B, H, 1, dv), -torch.rand(B, H, 1) * 3, torch.rand(B, H, 1)
    s0 = torch.randn(B, H, dk, dv)
    ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    state = s0.clone()
    out = state_kernels.gated_delta_step(state, q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0])
    assert out is not None and out.shape == (B, H, dv)
    assert (out - ref[:, :, 0]).abs().max() < 1e-5 * max(1.0, ref.abs().max())
    assert (state - s_ref).abs().max() < 1e-5 * max(1.0, s_ref.abs().max())


@pytest.mark.parametrize("P,N,G", [(8, 16, 2), (5, 19, 1), (64, 128, 8)])
def test_native_mamba2_step_equals_torch(state_kernels, P, N, G):
    from ember.models.mamba2 import selective_state_update

    torch.manual_seed(7)
    B, H = 2, 8
    x, dt, A, D = torch.randn(B, H, P), torch.rand(B, H), -torch.rand(H) * 2, torch.randn(H)
    Bm, Cm = torch.randn(B, G, N), torch.randn(B, G, N)
    s0 = torch.randn(B, H, P, N)
    s_ref = s0.clone()
    ref = selective_state_update(s_ref, x, dt, A, Bm.repeat_interleave(H // G, 1), Cm.repeat_interleave(H // G, 1), D)
    state = s0.clone()
    y = state_kernels.mamba2_step(state, x, dt, A, Bm, Cm, D)
    assert y is not None and y.shape == (B, H, P)
    assert (y - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())
    assert (state - s_ref).abs().max() < 1e-5 * max(1.0, s_ref.abs().max())


def check_decode_through_state_kernel(folder, hf, slot: str, layers: int, rows: int = 1) -> None:
    """Decode steps whose recurrent layers call the runtime's native state update (``accel.<slot>``, counted)
    equal HF's logits."""
    from ember.models import accel
    from ember.runtime import recurrent

    model = load_model(folder, dtype="fp32")
    calls = []
    real = getattr(recurrent, slot)
    setattr(accel, slot, lambda *a: calls.append(1) or real(*a))
    try:
        ids = torch.randint(3, 256, (rows, 20))
        cache = StaticKVCache(model.config, rows, 30, torch.float32, "cpu")
        with torch.no_grad():
            model(ids, cache=cache)
            cache.advance(20)
            for _ in range(3):
                nxt = torch.randint(3, 256, (rows, 1))
                ids = torch.cat([ids, nxt], 1)
                step = model(nxt, cache=cache, start=cache.pos)[:, -1]
                cache.advance(1)
                assert (step - _hf_logits(hf, ids)[:, -1]).abs().max() < 1e-4
    finally:
        setattr(accel, slot, real)
    assert len(calls) == 3 * layers  # every decode step of each recurrent layer


def test_decode_with_native_state_kernel_matches_hf(checkpoint, state_kernels):
    check_decode_through_state_kernel(*checkpoint("qwen3_5_text"), "gated_delta_step", 3)


@pytest.mark.parametrize("family,mode,bound", [("qwen3_5_moe", "int8", 0.03), ("qwen3_5", "int4", 0.3),
                                               ("qwen3_5_moe", "nf4", 0.3)])
def test_quantized_close_to_hf_and_checkpoint_round_trips(checkpoint, tmp_path, family, mode, bound):
    """--quant on load stays close to HF fp32 with the state-space pieces in float, and ``ember quantize``'s
    folder reloads to identical logits and greedy tokens."""
    from torch import nn

    from ember.loading.quantized import quantize_checkpoint
    from ember.quant import QuantizedLinear

    folder, hf = checkpoint(family)  # (the MoE's shared expert width, 48, takes no int4 group size)
    group = 32 if mode == "int4" else None
    model = load_model(folder, dtype="fp32", quant=mode, group_size=group)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    deltanet = "model.layers.0.linear_attn."
    assert issubclass(kinds[deltanet + "in_proj_qkv"], QuantizedLinear)
    assert issubclass(kinds["model.layers.3.self_attn.q_proj"], QuantizedLinear)
    for kept in ("in_proj_a", "in_proj_b"):
        assert not issubclass(kinds[deltanet + kept], QuantizedLinear)
    if family == "qwen3_5_moe":
        assert not issubclass(kinds["model.layers.0.mlp.shared_expert_gate"], QuantizedLinear)
    layer = model.model.layers[0].linear_attn
    assert layer.A_log.dtype == layer.dt_bias.dtype == layer.conv1d.weight.dtype == torch.float32
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, ref = model(ids), _hf_logits(hf, ids)
    assert (got - ref).abs().max() < bound * ref.abs().max()
    out, _ = quantize_checkpoint(folder, tmp_path / "q", mode, group)
    stored = load_model(out, dtype="fp32")
    with torch.no_grad():
        assert torch.equal(stored(ids), got)
    llm, again = ember.load(out, dtype="fp32"), ember.load(folder, dtype="fp32", quant=mode, group_size=group)
    prompt = ids[0, :12].tolist()
    assert llm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == \
        again.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids


def check_lora_training_against_peft(folder, hf, targets, tmp_path, peft_targets=None) -> int:
    """Ember's training forward with LoRA vs HF + PEFT on the same adapters: the summed loss of a right-padded
    batch, every LoRA gradient, and Ember's saved adapter loaded by PEFT giving Ember's logits. Returns the
    number of adapted modules. ``peft_targets``: what PEFT is given instead of ``targets`` ("names": the full
    names of the modules Ember adapted, as Ember's adapter file lists them)."""
    import copy

    import peft

    from ember.train.adapter_files import save_adapter
    from ember.train.data import IGNORE
    from ember.train.forward import batch_loss_sum
    from ember.train.lora import LoRAConfig, inject_lora, lora_modules

    ours = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=targets)
    inject_lora(ours, cfg, seed=0)
    mods = lora_modules(ours)
    theirs_targets = sorted(mods) if peft_targets == "names" else targets
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=theirs_targets)).eval()
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(theirs) == set(mods), "PEFT adapted a different set of modules"
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            theirs[name].lora_A["default"].weight.copy_(m.lora_A)
            theirs[name].lora_B["default"].weight.copy_(m.lora_B)
    ids = torch.randint(3, 256, (2, 70), generator=g)  # > one DeltaNet chunk; row 1 right-padded
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    ids[1, 50:], labels[1, 49:] = 0, IGNORE
    loss, n = batch_loss_sum(ours, ids, labels, torch.arange(70).expand(2, 70), None, grad_checkpoint=True)
    loss.backward()
    logits = pm(input_ids=ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
    ref.backward()
    assert n == int((labels != IGNORE).sum()) and abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for name, m in mods.items():
        for ours_p, their_p in ((m.lora_A, theirs[name].lora_A["default"].weight),
                                (m.lora_B, theirs[name].lora_B["default"].weight)):
            scale = max(1e-3, float(their_p.grad.abs().max()))
            assert (ours_p.grad - their_p.grad).abs().max() < 1e-4 * scale, f"{name}: LoRA gradients differ"
    save_adapter(ours, tmp_path / "adapter", cfg, str(folder))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (ours(ids) - loaded(input_ids=ids).logits).abs().max() < 1e-4
    return len(mods)


def test_lora_training_matches_peft(checkpoint, tmp_path):
    folder, hf = checkpoint("qwen3_5_text")
    assert check_lora_training_against_peft(folder, hf, "all-linear", tmp_path) == 3 * 5 + 4 + 4 * 3


# Adapted per model: 3 DeltaNet layers' input/output projections, 4 attention projections, and per MoE block the
# shared expert's 3 projections and its gate (the routed experts and router are 3-D parameters / not Linears in HF).
MOE_ADAPTED = {"qwen3_next": 3 * 3 + 4 + 4 * 4, "qwen3_5_moe_text": 3 * 5 + 4 + 4 * 4}


@pytest.mark.parametrize("family", sorted(MOE_ADAPTED))
def test_moe_hybrid_lora_training_matches_peft(checkpoint, tmp_path, family):
    """The MoE hybrids: all-linear adapts what PEFT can wrap as modules; loss, gradients and the saved adapter
    (full module names, so PEFT does not add its fused-expert parameters) agree with HF + PEFT."""
    from ember.train.tune import ALL_LINEAR_AS

    folder, hf = checkpoint(family)
    assert check_lora_training_against_peft(folder, hf, ALL_LINEAR_AS[family], tmp_path, "names") == \
        MOE_ADAPTED[family]


def test_tune_moe_hybrid_adapter_loads_in_peft(checkpoint, tmp_path):
    """``ember tune`` end to end on Qwen3-Next: the adapter names no routed expert or router, PEFT wraps exactly
    its modules, and PEFT's logits with it equal Ember's with the same adapter applied."""
    import copy
    import json

    import peft

    from ember.train.adapter_files import apply_adapter
    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder, hf = checkpoint("qwen3_next")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{3 + (i * 7 + j) % 200}" for j in range(20))}) + "\n"
                            for i in range(8)))
    cfg = TrainConfig(rank=4, alpha=8, steps=2, batch=2, seq_len=32, dtype="fp32", lr=1e-2)
    result = tune(folder, data, tmp_path / "out", cfg, progress=False, log=lambda s: None)
    assert all(m.loss == m.loss and m.loss > 0 for m in result.metrics) and len(result.metrics) == 2
    adapter = next(p.parent for p in (tmp_path / "out").rglob("adapter_config.json"))
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == MOE_ADAPTED["qwen3_next"] and not any(".experts." in t or t.endswith("mlp.gate")
                                                                 for t in targets)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()
    assert not getattr(pm.peft_config["default"], "target_parameters", None)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules()) == len(targets)
    ours = load_model(folder, dtype="fp32")
    apply_adapter(ours, adapter)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
        assert (ref - base).abs().max() > 1e-4, "two steps at lr 1e-2 should move the logits"
        assert (ours(ids) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("targets,module", [("gate_proj,up_proj", "model.layers.0.mlp.experts.0.gate_proj"),
                                            ("gate", "model.layers.0.mlp.gate")])
def test_tune_refuses_routed_experts_and_router(checkpoint, tmp_path, targets, module):
    from ember.errors import TrainingError
    from ember.train.trainer import TrainConfig
    from ember.train.tune import prepare_model

    folder, _ = checkpoint("qwen3_next")
    model = load_model(folder, dtype="fp32")
    with pytest.raises(TrainingError, match=module.replace(".", r"\.") + ".*routed experts and router"):
        prepare_model(model, TrainConfig(targets=targets))


def test_tune_refuses_a_multimodal_hybrid_wrapper(checkpoint):
    from ember.errors import TrainingError
    from ember.train.trainer import TrainConfig
    from ember.train.tune import check_trainable

    folder, _ = checkpoint("qwen3_5_moe")
    with pytest.raises(TrainingError, match="multimodal qwen3_5_moe_text.*ForCausalLM"):
        check_trainable(folder, TrainConfig())
