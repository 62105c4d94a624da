"""Nemotron-H (Mamba-2 / attention / MLP / MoE blocks) against HF transformers.

Tiny random checkpoints written with ``save_pretrained`` (under HF's published ``backbone.*`` names); fp32
logits within 1e-4 of HF at prefill (several SSD chunks) and every decode step, ragged batches, chunked prefill,
greedy generations, the scheduler's state slots, the config's legacy spellings and the parameter count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ember
from conftest import save_word_tokenizer
from ember.cache import PagedKVCache, StaticKVCache, bytes_per_sequence, layer_specs
from ember.config import ModelConfig
from ember.errors import ConfigError
from ember.loading import load_model
from ember.models.mamba2 import chunk_scan, selective_state_update
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqRequest

transformers = pytest.importorskip("transformers")

BLOCKS = ["linear_attention", "moe", "full_attention", "linear_attention", "mlp", "linear_attention"]
CONFIG = dict(vocab_size=256, hidden_size=64, layers_block_type=BLOCKS, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2,
              conv_kernel=4, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=1.5)


def _hf_model(**overrides):
    """A random HF Nemotron-H with non-trivial norms, D and router bias (defaults at 0 or 1 hide bugs)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.NemotronHConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict = {}

    def make(kind: str = "moe"):
        if kind not in cache:
            model = _hf_model(**({"moe_latent_size": 24} if kind == "latent" else {}))
            folder = Path(tmp_path_factory.mktemp(f"nemotron-h-{kind}"))
            model.save_pretrained(folder)
            save_word_tokenizer(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return make


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["moe", "latent"])
def test_prefill_and_decode_logits_match_hf(checkpoint, kind):
    folder, hf = checkpoint(kind)
    assert any(n.startswith("backbone.") for n in json.loads((folder / "model.safetensors").read_bytes()[8:][
        :int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")]))  # the published names
    model = load_model(folder, dtype="fp32")
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, 45))  # > two 16-token SSD chunks
    cache = StaticKVCache(model.config, 1, 60, torch.float32, "cpu")
    with torch.no_grad():
        out = model(ids, cache=cache)
        cache.advance(ids.shape[1])
        assert (out - _hf_logits(hf, ids)).abs().max() < 1e-4
        for _ in range(5):
            nxt = torch.randint(3, 256, (1, 1))
            ids = torch.cat([ids, nxt], 1)
            step = model(nxt, cache=cache, start=cache.pos)[:, -1]
            cache.advance(1)
            assert (step - _hf_logits(hf, ids)[:, -1]).abs().max() < 1e-4


def test_ragged_batch_matches_hf_rows(checkpoint):
    """Left-padded rows of different lengths: every row's logits equal HF's for it alone, prefill and decode."""
    from test_hybrid import check_ragged_batch_against_hf

    check_ragged_batch_against_hf(*checkpoint(), (5, 37, 20))


def test_chunked_prefill_equals_one_shot(checkpoint):
    from test_hybrid import check_chunked_prefill

    check_chunked_prefill(checkpoint()[0], (7, 40, 41, 70))


def test_chunk_scan_equals_recurrence():
    torch.manual_seed(3)
    B, H, T, P, N = 2, 3, 50, 4, 6
    x, Bm, Cm = torch.randn(B, H, T, P), torch.randn(B, H, T, N), torch.randn(B, H, T, N)
    dt, A, D = torch.rand(B, H, T), -torch.rand(H) * 2, torch.randn(H)
    s0 = torch.randn(B, H, P, N)
    y1, s1 = chunk_scan(x, dt, A, Bm, Cm, D, s0.clone(), chunk=16)
    s2 = s0.clone()
    y2 = torch.stack([selective_state_update(s2, x[:, :, t], dt[:, :, t], A, Bm[:, :, t], Cm[:, :, t], D)
                      for t in range(T)], dim=2)
    assert (y1 - y2).abs().max() < 1e-4 and (s1 - s2).abs().max() < 1e-4


def test_greedy_generation_matches_hf(checkpoint):
    from test_hybrid import check_greedy_against_hf

    check_greedy_against_hf(*checkpoint(), (6, 23))


def test_scheduler_serves_concurrent_sequences_with_state(checkpoint):
    folder, _ = checkpoint()
    llm = ember.load(folder, dtype="fp32")
    torch.manual_seed(5)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (30, 9, 23)]
    alone = [llm.generate(p, max_new_tokens=10, temperature=0, ignore_eos=True).token_ids for p in prompts]
    sched = BatchScheduler(llm, max_batch=2, block_size=8, prefill_chunk=16)  # chunked prefill, 2 state slots
    got: dict[int, list[int]] = {}
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    ids = sched.submit([SeqRequest(p, params, on_event=lambda e: got.setdefault(e.seq_id, []).append(e.token_id))
                        for p in prompts])
    sched.run_until_idle()
    assert [got[i] for i in ids] == alone
    assert sched.cache.states.num_free == 2


def test_config_legacy_pattern_counts_and_state_pricing(checkpoint, tmp_path):
    folder, hf = checkpoint()
    raw = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_file(folder)
    assert cfg.layer_types == BLOCKS and cfg.num_hidden_layers == 6 and cfg.rms_norm_eps == 1e-5
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert [cfg.is_moe_layer(i) for i in range(6)] == [t == "moe" for t in BLOCKS]
    # the older spelling: hybrid_override_pattern and mamba_* names
    legacy = {k: v for k, v in raw.items() if k not in ("layers_block_type", "n_groups", "conv_kernel")}
    legacy.update(hybrid_override_pattern="ME*M-M", num_hidden_layers=6, mamba_n_groups=2, mamba_d_conv=4)
    old = ModelConfig.from_dict(legacy)
    assert old.layer_types == BLOCKS and old.num_parameters() == cfg.num_parameters()
    with pytest.raises(ConfigError, match="hybrid_override_pattern"):
        ModelConfig.from_dict({k: v for k, v in legacy.items() if k != "hybrid_override_pattern"})
    with pytest.raises(ConfigError, match="n_groups"):
        ModelConfig.from_dict({**raw, "n_groups": 3})
    specs = layer_specs(cfg)
    assert [s.kind for s in specs] == ["recurrent", "recurrent", "full_attention", "recurrent", "recurrent",
                                       "recurrent"]
    conv = 8 * 8 + 2 * 2 * 16
    expect = (conv * 3 + 8 * 8 * 16) * 4  # fp32 conv window + SSM state
    assert bytes_per_sequence(specs[0], torch.bfloat16, 10) == bytes_per_sequence(specs[0], torch.bfloat16, 10**5) \
        == expect
    assert bytes_per_sequence(specs[1], torch.bfloat16, 10**5) == 0  # the MoE block keeps nothing
    assert PagedKVCache.bytes_per_token(cfg, torch.bfloat16) == 2 * 2 * 16 * 2  # one attention layer's k/v


def test_decode_with_native_state_kernel_matches_hf(checkpoint):
    """Decode steps through the runtime's native Mamba-2 state update still equal HF's logits."""
    from test_hybrid import check_decode_through_state_kernel

    from ember import kernels
    from ember.runtime import install

    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    install()
    check_decode_through_state_kernel(*checkpoint(), "mamba2_step", 3, rows=2)


@pytest.mark.parametrize("mode,bound", [("int8", 0.03), ("nf4", 0.3)])
def test_quantized_close_to_hf_and_checkpoint_round_trips(checkpoint, tmp_path, mode, bound):
    """--quant keeps the Mamba parameters and the router in float; ``ember quantize`` reloads to identical logits."""
    from ember.loading.quantized import quantize_checkpoint
    from ember.quant import QuantizedLinear

    folder, hf = checkpoint()
    model = load_model(folder, dtype="fp32", quant=mode)
    mixer = model.model.layers[0].mixer
    assert isinstance(mixer.in_proj, QuantizedLinear) and isinstance(mixer.out_proj, QuantizedLinear)
    assert isinstance(model.model.layers[1].mixer.experts[0].up_proj, QuantizedLinear)
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == mixer.conv1d.weight.dtype == torch.float32
    assert model.model.layers[1].mixer.gate.weight.dtype == torch.float32
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, ref = model(ids), _hf_logits(hf, ids)
    assert (got - ref).abs().max() < bound * ref.abs().max()
    out, _ = quantize_checkpoint(folder, tmp_path / "q", mode)
    with torch.no_grad():
        assert torch.equal(load_model(out, dtype="fp32")(ids), got)


def test_lora_training_matches_peft(checkpoint, tmp_path):
    """Loss and LoRA gradients of Ember's training forward equal HF + PEFT's; Ember's adapter loads in PEFT.
    (HF keeps the routed experts as 3-D parameters, which PEFT does not adapt: they are left out here too.)"""
    from test_hybrid import check_lora_training_against_peft

    from ember.train.tune import ALL_LINEAR_AS

    folder, hf = checkpoint()
    assert check_lora_training_against_peft(folder, hf, ALL_LINEAR_AS["nemotron_h"], tmp_path) == 11


def test_tune_writes_an_adapter_peft_loads(checkpoint, tmp_path):
    """``ember tune`` end to end on Nemotron-H: "all-linear" becomes the modules PEFT adapts, the loss is finite,
    and the adapter loads in PEFT."""
    import copy

    import peft

    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder, hf = checkpoint()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{3 + (i * 7 + j) % 200}" for j in range(20))}) + "\n"
                            for i in range(8)))
    cfg = TrainConfig(rank=4, alpha=8, steps=2, batch=2, seq_len=32, dtype="fp32", lr=1e-3)
    result = tune(folder, data, tmp_path / "out", cfg, progress=False, log=lambda s: None)
    adapter = next(p.parent for p in (tmp_path / "out").rglob("adapter_config.json"))
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 11 and not any("out_proj" in t or ".experts." in t for t in targets)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules()) == 11
    assert all(m.loss == m.loss and m.loss > 0 for m in result.metrics) and len(result.metrics) == 2


def test_tune_refuses_packing_across_recurrent_state(checkpoint):
    from ember.errors import TrainingError
    from ember.train.trainer import TrainConfig
    from ember.train.tune import check_trainable

    folder, _ = checkpoint()
    check_trainable(folder, TrainConfig())
    with pytest.raises(TrainingError, match="without --pack"):
        check_trainable(folder, TrainConfig(pack=True))


@pytest.mark.parametrize("kind", ["moe", "latent", "qwen3_5_moe", "qwen3_next"])
def test_planner_weight_breakdown_equals_the_model(checkpoint, kind):
    """The planner's weights equal the model's parameters, the recurrent mixers' projections as their own part."""
    from ember import planner
    from ember.models import Transformer

    if kind in ("moe", "latent"):
        cfg = ModelConfig.from_file(checkpoint(kind)[0])
    else:
        from test_hybrid import MOE, TEXT

        types = ["linear_attention"] * 3 + ["full_attention"]
        cfg = ModelConfig.from_dict({"model_type": kind.removesuffix("_moe") + ("_moe_text" if "3_5" in kind else ""),
                                     **TEXT, **MOE, "layer_types": types})
    with torch.device("meta"):
        model = Transformer(cfg)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    wb = planner.weight_bytes(cfg, "bf16")
    assert wb.total == 2 * real and cfg.num_parameters() == real
    mixers = [getattr(layer, "linear_attn", None) or layer.mixer for layer in model.model.layers
              if layer.attention_type == "linear_attention"]
    assert wb.recurrent == 2 * sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                                   for x in mixers for m in x.modules() if isinstance(m, torch.nn.Linear)) > 0
