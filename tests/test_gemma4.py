"""Gemma 4 (``gemma4_text`` and the multimodal ``gemma4``) against HF transformers' ``modeling_gemma4``.

Tiny random checkpoints written by ``save_pretrained``, in the shapes of the released models: the dense one (31B:
sliding/full layers with their own head shapes and k = v on the full layers), the MoE one (26B-A4B: experts beside
the dense MLP), the small ones (E2B/E4B: per-layer input embeddings, keys/values shared by the last layers,
double-width MLPs there) and the multimodal wrapper with vision and audio towers. Norm weights, router scales and
layer scalars are randomised so a missing factor shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, save_word_tokenizer
from ember.cache import StaticKVCache
from ember.loading import load_model
from test_families import check_continuous_batching, check_greedy, check_lora_against_peft, check_padded_logits
_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
           "full_attention"]
_BASE = dict(head_dim=16, global_head_dim=32, sliding_window=8, num_hidden_layers=6, layer_types=_LAYERS,
             hidden_size_per_layer_input=0, final_logit_softcapping=30.0)
CASES: dict[str, dict] = {
    "dense-keqv": {**_BASE, "attention_k_eq_v": True, "num_global_key_value_heads": 1},
    "dense": {**_BASE, "attention_k_eq_v": False},
    "moe": {**_BASE, "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
            "attention_k_eq_v": True, "num_global_key_value_heads": 1},
    "ple-shared": {**_BASE, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": TINY["vocab_size"],
                   "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "tie_word_embeddings": False},
    "multimodal": {**_BASE, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": TINY["vocab_size"],
                   "num_kv_shared_layers": 2},
}


def _hf_config(name: str):
    import transformers

    kw = {**TINY, **CASES[name]}
    if name == "multimodal":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
        audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                     output_proj_dims=32)
        return transformers.Gemma4Config(text_config=kw, vision_config=vision, audio_config=audio)
    return transformers.Gemma4TextConfig(**kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(name: str):
        if name not in made:
            import transformers

            torch.manual_seed(0)
            cfg = _hf_config(name)
            cls = transformers.Gemma4ForConditionalGeneration if name == "multimodal" else transformers.Gemma4ForCausalLM
            hf = cls(cfg).float().eval()
            with torch.no_grad():
                for n, p in hf.named_parameters():
                    if n.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                        p.copy_(0.3 * torch.randn_like(p) + 1.0)
                for n, b in hf.named_buffers():
                    if n.endswith("layer_scalar"):
                        b.copy_(torch.rand_like(b) + 0.5)
            folder = Path(tmp_path_factory.mktemp(f"gemma4-{name}"))
            hf.save_pretrained(folder)
            save_word_tokenizer(folder)
            made[name] = (folder, hf)
        return made[name]

    return make


@pytest.mark.parametrize("name", sorted(CASES))
def test_padded_prefill_and_decode_logits_match_hf(checkpoint, name, capfd):
    """Rows of 20, 15 and 9 prompt tokens (left-padded), then 8 decode steps past the window of 8."""
    folder, hf = checkpoint(name)
    check_padded_logits(folder, hf, name)
    if name == "multimodal":
        assert "the vision/audio towers are skipped" in capfd.readouterr().err


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_32_tokens_identical_to_hf_generate(checkpoint, name):
    folder, hf = checkpoint(name)
    check_greedy(folder, hf, name)


@pytest.mark.parametrize("name", ["moe", "ple-shared"])
def test_continuous_batching_equals_generate_alone(checkpoint, name):
    """The paged cache (full layers' own head shape; shared keys/values read from the producing layer's pool)."""
    folder, _ = checkpoint(name)
    check_continuous_batching(folder, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_count_equals_the_model_and_hf(checkpoint, name):
    """num_parameters counts exactly the tensors Ember builds, and those are HF's text model's."""
    folder, hf = checkpoint(name)
    ours = load_model(folder, dtype="fp32")
    real = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    text = hf.model.language_model if name == "multimodal" else hf.model
    hf_real = sum(p.numel() for p in text.parameters()) + (0 if hf.config.get_text_config().tie_word_embeddings
                                                           else hf.lm_head.weight.numel())
    assert ours.config.num_parameters() == real == hf_real


def test_full_layers_get_their_own_head_shape_and_cache():
    """config.json's per_layer_config (transformers 5) and global_head_dim (published files) read the same; the
    cache keeps each layer's own shape."""
    from ember.cache import layer_specs
    from ember.config import ModelConfig

    hf_cfg = _hf_config("dense-keqv")
    a = ModelConfig.from_dict(hf_cfg.to_dict())
    raw = {k: v for k, v in hf_cfg.to_dict().items() if k != "per_layer_config"}
    b = ModelConfig.from_dict({**raw, "global_head_dim": 32, "num_global_key_value_heads": 1})
    for cfg in (a, b):
        assert [(s.kv_heads, s.head_dim) for s in layer_specs(cfg)][1:3] == [(2, 16), (1, 32)]
        assert cfg.rope_scaling["rope_type"] == "proportional" and cfg.rotary_dim == 16


@pytest.mark.parametrize("name", ["moe", "ple-shared"])
def test_quant_on_load_and_ember_quantize_round_trip(checkpoint, tmp_path, name):
    """int8 on load equals the model with each quantized layer's dequantized weight (the router's projection
    left in float), and `ember quantize`'s folder (per-expert names) loads back as stored with the same logits.
    (Against fp32 the random tiny model drifts more than Llama's: scale-1 attention over normed q/k and the
    routers amplify rounding, so the check is the exact one.)"""
    from ember.loading.quantized import quantize_checkpoint
    from ember.quant import QuantizedLinear

    folder, _ = checkpoint(name)
    ids = torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(folder, dtype="fp32")(ids)
        on_load = load_model(folder, dtype="fp32", quant="int8")
        got = on_load(ids)
    assert not torch.equal(got, ref)
    assert isinstance(on_load.model.layers[0].mlp.up_proj, QuantizedLinear)
    if name == "moe":
        assert type(on_load.model.layers[0].router.proj) is torch.nn.Linear
        assert isinstance(on_load.model.layers[0].experts[1].down_proj, QuantizedLinear)
    out, _ = quantize_checkpoint(folder, tmp_path / "q", "int8")
    with torch.no_grad():
        assert torch.equal(load_model(out, dtype="fp32")(ids), got)
        for name, m in list(on_load.named_modules()):
            if isinstance(m, QuantizedLinear):
                lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
                lin.weight.data = m.dequantize()
                on_load.set_submodule(name, lin)
        dense = on_load(ids)
    assert (got - dense).abs().max() < 1e-4 * dense.abs().max()


@pytest.mark.parametrize("name,targets", [
    ("dense-keqv", "all-linear"), ("ple-shared", "all-linear"),
    ("moe", ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
])
def test_training_forward_loss_and_lora_grads_match_hf_peft(checkpoint, tmp_path, name, targets):
    """Loss and LoRA gradients equal HF + PEFT's (with and without gradient checkpointing); the saved adapter
    loads in PEFT (per-layer inputs and shared keys/values included)."""
    folder, hf = checkpoint(name)
    check_lora_against_peft(folder, hf, targets, tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planner_bytes_equal_the_model_and_its_cache(name):
    """The planner's weight bytes count exactly the model's parameters (per-layer head shapes, k = v, shared
    keys/values, the dense MLP beside the experts, per-layer inputs), and its KV bytes what the cache allocates."""
    from ember import planner
    from ember.config import ModelConfig
    from ember.models import Transformer

    cfg = ModelConfig.from_dict(_hf_config(name).to_dict())
    with torch.device("meta"):
        model = Transformer(cfg)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert planner.weight_bytes(cfg, "bf16").total == 2 * real
    cache = StaticKVCache(cfg, 2, 40, torch.bfloat16, "cpu")
    assert planner.kv_cache_bytes(cfg, 40, 2, "bf16") == cache.nbytes()


def _plan(capsys, *argv: str) -> dict:
    import argparse
    import json

    from ember.plan_cli import add_parser

    ap = argparse.ArgumentParser(prog="ember")
    add_parser(ap.add_subparsers(dest="verb"))
    args = ap.parse_args(["plan", *argv, "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_catalog_plans_for_gemma4_and_minimax_m2_on_one_spark(capsys):
    """Gemma 4 26B-A4B: published 25.2B total / 3.8B active; int4 fits one DGX Spark. MiniMax-M2 in int4 does not
    fit one (its weights alone pass the usable memory) and fits two: the plan says so."""
    from ember import catalog

    cfg = catalog.get("gemma-4-26b-a4b").config
    assert abs(cfg.num_parameters() - 25.2e9) < 0.01 * 25.2e9 and abs(cfg.active_parameters() - 3.8e9) < 0.05e9
    assert cfg.multimodal and cfg.layer_head_dim(5) == 512 and cfg.layer_kv_heads(5) == 2
    (gemma,) = _plan(capsys, "gemma-4-26b-a4b", "--on", "dgx-spark", "--quant", "int4")["options"]
    assert gemma["fits"]
    (one,) = _plan(capsys, "minimax-m2", "--on", "dgx-spark", "--quant", "int4")["options"]
    (two,) = _plan(capsys, "minimax-m2", "--on", "2xdgx-spark", "--quant", "int4")["options"]
    assert not one["fits"] and two["fits"] and two["nodes"] == 2


def test_kv_shared_layers_allocate_no_cache_buffers():
    """Layers that reuse an earlier layer's keys/values hold no buffers in the static or the paged cache, and the
    planner counts only the layers that make their own (a hand count from the config)."""
    from ember import planner
    from ember.cache import PagedKVCache, layer_specs
    from ember.config import ModelConfig

    cfg = ModelConfig.from_dict(_hf_config("ple-shared").to_dict())
    assert [s.kind for s in layer_specs(cfg)] == ["sliding_attention"] * 2 + ["full_attention", "sliding_attention",
                                                                             "shared", "shared"]
    nkv = cfg.num_key_value_heads
    full, sliding = 2 * nkv * 32 * 4, 2 * nkv * (16 + 16 + 16) * 4  # K and V per token: layer 2; layers 0, 1, 3 (fp32)
    static = StaticKVCache(cfg, 2, 40, torch.float32, "cpu")  # the sliding layers keep their window of 8
    assert [static.k[i].numel() for i in (4, 5)] == [0, 0] and static.nbytes() == 2 * (40 * full + 8 * sliding)
    paged = PagedKVCache(cfg, 10, 16, torch.float32, "cpu")  # the window pool: as many blocks (10 < its cap)
    assert [paged.k[i].numel() for i in (4, 5)] == [0, 0] and paged.nbytes() == 10 * 16 * (full + sliding)
    assert planner.kv_block_bytes(cfg, torch.float32, 16) == 16 * full
    assert planner.kv_cache_bytes(cfg, 40, 2, "fp32") == static.nbytes()
    assert planner.kv_cache_bytes(cfg, 40, 2, "fp32", cap_window=False) == 2 * 40 * (full + sliding)


@pytest.mark.parametrize("name, own_full, own_sliding, kv_heads", [("gemma-4-e2b", 3, 12, 1), ("gemma-4-e4b", 4, 20, 2)])
def test_plan_for_gemma4_e2b_e4b_counts_only_the_layers_that_keep_keys(capsys, name, own_full, own_sliding, kv_heads):
    """`ember plan gemma-4-e2b|e4b`: of 35 / 42 layers only the first 15 / 24 keep keys and values (the rest reuse
    them); full layers at 512 channels a head at the whole context, sliding ones at 256 over their window of 512
    (bf16)."""
    from ember import catalog

    cfg = catalog.get(name).config
    first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    own = [cfg.layer_window(i) is None for i in range(first_shared)]
    assert (own.count(True), own.count(False)) == (own_full, own_sliding)
    assert cfg.hidden_size_per_layer_input == 256 and cfg.layer_kv_heads(0) == kv_heads
    (opt,) = _plan(capsys, name, "--on", "dgx-spark", "--quant", "none", "--context", "131072")["options"]
    assert cfg.sliding_window == 512
    full, sliding = 2 * kv_heads * own_full * 512 * 2, 2 * kv_heads * own_sliding * 256 * 2
    assert opt["memory_bytes"]["kv_cache"] == full * 131072 + sliding * 512 and opt["fits"]
