"""Mixture of experts (Mixtral, Qwen3-MoE): HF parity, on-disk layouts, routing, sparse reads, counts.

The families' plain prefill/decode parity, greedy-32 and parameter-count tests run with every other
family (``FAMILIES`` rows in conftest); this file covers what is particular to MoE.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ember
from conftest import make_hf_model
from ember.config import ModelConfig
from ember.errors import CheckpointError, ConfigError
from ember.cache import StaticKVCache
from ember.loading import load_model
from ember.models import MLP, Linear, SparseMoE
from test_engine import hf_greedy
from test_model import BF16_TOL, FP32_TOL, assert_close

MOE_FAMILIES = ["mixtral", "qwen3-moe", "qwen3-moe-mixed"]


def prefill_then_decode(model, ids: torch.Tensor, n_prefill: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``n_prefill`` tokens, then of each later token decoded one at a time."""
    B, T = ids.shape
    cache = StaticKVCache(model.config, B, T, torch.float32, "cpu")
    with torch.no_grad():
        out = [model(ids[:, :n_prefill], cache=cache, start=0)]
        cache.advance(n_prefill)
        for t in range(n_prefill, T):
            out.append(model(ids[:, t:t + 1], cache=cache, start=cache.pos))
            cache.advance(1)
    return out


def check_parity(ours, hf, what: str, n_prefill: int = 16, total: int = 24) -> None:
    ids = torch.randint(0, hf.config.vocab_size, (2, total), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    got = prefill_then_decode(ours, ids, n_prefill)
    assert_close(got[0], ref[:, :n_prefill], FP32_TOL, f"{what} prefill")
    for i, step in enumerate(got[1:]):
        assert_close(step, ref[:, n_prefill + i:n_prefill + i + 1], FP32_TOL, f"{what} decode step {i}")


# ---------------------------------------------------------------------------------------------- layouts
def safetensors_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family, expert_name", [
    ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w1.weight"),
    ("qwen3-moe", "model.layers.0.mlp.experts.3.gate_proj.weight"),
])
def test_default_save_is_classic_per_expert_layout_and_loads(hf_checkpoint, family, expert_name):
    """transformers 5 fuses experts in memory but save_pretrained writes the hub's per-expert names."""
    folder, hf = hf_checkpoint(family)
    names = safetensors_names(folder)
    assert expert_name in names and not any(n.endswith("gate_up_proj") for n in names)
    check_parity(load_model(folder, dtype="fp32"), hf, f"{family} classic layout")


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_fused_transformers5_layout_loads(tmp_path, hf_checkpoint, family):
    """``save_original_format=False`` writes 3-D ``experts.gate_up_proj``/``down_proj``; Ember slices them."""
    _, hf = hf_checkpoint(family)
    hf.save_pretrained(tmp_path, save_original_format=False)
    names = safetensors_names(tmp_path)
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.experts.down_proj" in names
    ours = load_model(tmp_path, dtype="fp32")
    fused = hf.model.layers[1].mlp.experts
    im = hf.config.moe_intermediate_size if family == "qwen3-moe" else hf.config.intermediate_size
    expert = ours.model.layers[1].mlp.experts[5]
    assert torch.equal(expert.gate_proj.weight, fused.gate_up_proj[5, :im])
    assert torch.equal(expert.up_proj.weight, fused.gate_up_proj[5, im:])
    assert torch.equal(expert.down_proj.weight, fused.down_proj[5])
    check_parity(ours, hf, f"{family} fused layout")


def test_sharded_mixtral_checkpoint_loads(tmp_path, hf_checkpoint):
    """Hub Mixtral checkpoints are sharded: renamed tensors are found across shards via the index."""
    _, hf = hf_checkpoint("mixtral")
    hf.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    check_parity(load_model(tmp_path, dtype="fp32"), hf, "mixtral sharded")


def test_ember_names_load_as_they_are(tmp_path, hf_checkpoint):
    """A Mixtral checkpoint already under Ember's names (e.g. written by Ember itself) needs no map."""
    folder, hf = hf_checkpoint("mixtral")
    ours = load_model(folder, dtype="fp32")
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in safetensors_names(tmp_path)
    check_parity(load_model(tmp_path, dtype="fp32"), hf, "mixtral in Ember names")


def test_fused_tensor_with_wrong_rank_is_named(tmp_path, hf_checkpoint):
    _, hf = hf_checkpoint("qwen3-moe")
    hf.save_pretrained(tmp_path, save_original_format=False)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = "model.layers.0.mlp.experts.down_proj"
    tensors[bad] = tensors[bad].flatten(0, 1)  # (E*H, I): not 3-D
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"fused expert tensor 'model\.layers\.0\.mlp\.experts\.down_proj' has shape"):
        load_model(tmp_path, dtype="fp32")


def test_missing_expert_is_named(tmp_path, hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.block_sparse_moe.experts.6.w3.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight"):
        load_model(tmp_path, dtype="fp32")


def test_experts_are_plain_linear_modules_under_hf_names(hf_checkpoint):
    """Quantization and LoRA find experts as they find every other projection (docs/design.md, principle 3)."""
    ours = load_model(hf_checkpoint("qwen3-moe")[0], dtype="fp32")
    names = {n for n, m in ours.named_modules() if type(m) is Linear and ".experts." in n}
    assert len(names) == ours.config.num_hidden_layers * ours.config.num_local_experts * 3
    assert "model.layers.1.mlp.experts.7.down_proj" in names
    assert type(ours.model.layers[0].mlp.gate) is Linear  # the router is a Linear too


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_bf16_logits_close_to_hf(hf_checkpoint, family):
    folder, hf = hf_checkpoint(family, dtype=torch.bfloat16)
    ours = load_model(folder, dtype="bf16")  # asked for: auto gives fp32 on a CPU without native bf16
    assert ours.model.layers[0].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, BF16_TOL, f"{family} bf16")


# ------------------------------------------------------------------------------------ variants, batches
@pytest.mark.parametrize("family, overrides", [
    ("mixtral", {"sliding_window": 8}),                             # Mixtral's window applies to every layer
    ("qwen3-moe", {"decoder_sparse_step": 2, "num_hidden_layers": 4}),  # MoE in layers 1 and 3 only
])
def test_variant_parity(hf_checkpoint, family, overrides):
    folder, hf = hf_checkpoint(family, **overrides)
    ours = load_model(folder, dtype="fp32")
    ours_moe = [isinstance(layer.mlp, SparseMoE) for layer in ours.model.layers]
    assert ours_moe == [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert all(isinstance(layer.mlp, MLP) for layer, moe in zip(ours.model.layers, ours_moe) if not moe)
    check_parity(ours, hf, f"{family} {overrides}")


def test_mlp_only_layers_are_dense(hf_checkpoint):
    folder, hf = hf_checkpoint("qwen3-moe-mixed")  # 3 layers, mlp_only_layers=[1]
    ours = load_model(folder, dtype="fp32")
    assert [isinstance(layer.mlp, SparseMoE) for layer in ours.model.layers] == [True, False, True]
    assert ours.model.layers[1].mlp.gate_proj.weight.shape == (hf.config.intermediate_size, hf.config.hidden_size)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_left_padded_batch_matches_hf(hf_checkpoint, family):
    folder, hf = hf_checkpoint(family)
    ours = load_model(folder, dtype="fp32")
    ids = torch.randint(3, hf.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        cache = StaticKVCache(ours.config, 3, 24, torch.float32, "cpu")
        got = ours(ids, pos, cache, 0, k_valid=torch.nn.functional.pad(mask.bool(), (0, 4)))
        cache.advance(20)
        # one batched decode step: 3 tokens routed together through the grouped path
        nxt = torch.randint(3, hf.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(3))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        ref2 = hf(torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=(mask2.cumsum(-1) - 1).clamp_min(0)).logits
        step = ours(nxt, pos[:, -1:] + 1, cache, 20, k_valid=torch.nn.functional.pad(mask2.bool(), (0, 3)))
    assert_close(got[mask.bool()], ref[mask.bool()], FP32_TOL, f"{family} padded batch prefill")
    assert_close(step[:, 0], ref2[:, -1], FP32_TOL, f"{family} padded batch decode")


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_greedy_generate_variants_and_batches(hf_checkpoint, family):
    """Greedy 32 through ``ember.load`` (the default rows run in test_engine), plus batch == alone."""
    overrides = {"sliding_window": 8} if family == "mixtral" else {"decoder_sparse_step": 2, "num_hidden_layers": 4}
    folder, hf = hf_checkpoint(family, **overrides)
    hf.generation_config.eos_token_id = None
    llm = ember.load(folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (12, 3, 17)]
    assert llm.generate(prompts[0], max_new_tokens=32, temperature=0.0, ignore_eos=True).token_ids == \
        hf_greedy(hf, prompts[0], 32)
    batch = llm.generate(prompts, max_new_tokens=16, temperature=0.0, ignore_eos=True)
    for p, b in zip(prompts, batch):
        assert b.token_ids == llm.generate(p, max_new_tokens=16, temperature=0.0, ignore_eos=True).token_ids


# ------------------------------------------------------------------------------------------- routing
def router_choices(hf) -> list[list[torch.Tensor]]:
    """Hooks on HF's routers; each call appends (tokens, k) expert ids to its layer's list."""
    seen: list[list[torch.Tensor]] = []
    for layer in hf.model.layers:
        calls: list[torch.Tensor] = []
        seen.append(calls)
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
            layer.mlp.gate.register_forward_hook(lambda m, args, out, calls=calls: calls.append(out[2].clone()))
    return seen


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_decode_runs_only_the_top_k_experts_hf_selects(hf_checkpoint, family):
    folder, cached = hf_checkpoint(family)
    hf = make_hf_model(family)  # own copy of the same weights: its hooks must not leak into other tests
    hf.load_state_dict(cached.state_dict())
    ours = load_model(folder, dtype="fp32")
    k = ours.config.num_experts_per_tok
    calls: list[Counter] = [Counter() for _ in ours.model.layers]
    weight_reads: list[Counter] = [Counter() for _ in ours.model.layers]
    for i, layer in enumerate(ours.model.layers):
        if isinstance(layer.mlp, SparseMoE):
            for e, expert in enumerate(layer.mlp.experts):
                expert.register_forward_hook(lambda m, a, o, i=i, e=e: calls[i].update([e]))
                for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    lin.register_forward_hook(lambda m, a, o, i=i, e=e: weight_reads[i].update([e]))
    hf_routes = router_choices(hf)
    ids = torch.randint(3, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf(ids)
    cache = StaticKVCache(ours.config, 1, 9, torch.float32, "cpu")
    with torch.no_grad():
        ours(ids[:, :8], cache=cache, start=0)
        cache.advance(8)
        for c in calls + weight_reads:
            c.clear()
        ours(ids[:, 8:], cache=cache, start=8)  # one decode token
    n_moe = 0
    for i, layer in enumerate(ours.model.layers):
        if not isinstance(layer.mlp, SparseMoE):
            assert not calls[i]
            continue
        n_moe += 1
        hf_selected = set(hf_routes[i][0][-1].tolist())  # HF's top-k for the last token
        assert sorted(calls[i]) == sorted(hf_selected) and all(n == 1 for n in calls[i].values()), \
            f"layer {i}: ran experts {dict(calls[i])}, HF selected {sorted(hf_selected)}"
        assert len(calls[i]) == k and all(n == 3 for n in weight_reads[i].values()) and len(weight_reads[i]) == k
    assert n_moe > 0


def test_prefill_runs_each_selected_expert_once(hf_checkpoint):
    """Grouped path: every expert with tokens runs one matmul over all of them; others never run."""
    folder, _ = hf_checkpoint("qwen3-moe")
    ours = load_model(folder, dtype="fp32")
    moe = ours.model.layers[0].mlp
    calls: Counter = Counter()
    rows: Counter = Counter()

    def count(e: int, args: tuple) -> None:
        calls.update([e])
        rows.update({e: args[0].shape[0]})

    hooks = [expert.register_forward_hook(lambda m, a, o, e=e: count(e, a)) for e, expert in enumerate(moe.experts)]
    x = torch.randn(3, 5, ours.config.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = moe(x)
        for h in hooks:
            h.remove()
        _, ids = moe.route(x.reshape(-1, x.shape[-1]))
        # reference: the k experts of each token, one token at a time, through the decode path
        one_by_one = torch.cat([moe(t[None, None]) for t in x.reshape(-1, x.shape[-1])]).view_as(x)
    per_expert = Counter(ids.flatten().tolist())  # (token, expert) pairs per expert
    assert rows == per_expert and calls == Counter(dict.fromkeys(per_expert, 1))
    assert len(per_expert) < len(moe.experts) or ids.numel() >= len(moe.experts)
    assert_close(out, one_by_one, 1e-6, "grouped vs per-token expert path")


@pytest.mark.parametrize("norm", [False, True])
def test_router_normalisation_matches_hf(norm):
    """Qwen3-MoE renormalises top-k weights only with norm_topk_prob; Mixtral always does."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(7)
    x = torch.randn(10, 64)
    for hf_cfg, router_cls in [
        (transformers.Qwen3MoeConfig(hidden_size=64, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm),
         Qwen3MoeTopKRouter),
        (transformers.MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=3), MixtralTopKRouter),
    ]:
        cfg = ModelConfig.from_dict({**hf_cfg.to_dict(), "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 16})
        hf_router = router_cls(hf_cfg)
        torch.nn.init.normal_(hf_router.weight)
        ours = SparseMoE(cfg)
        ours.gate.weight.data.copy_(hf_router.weight.data)
        _, hf_w, hf_ids = hf_router(x)
        w, ids = ours.route(x)
        assert torch.equal(ids, hf_ids)
        assert_close(w, hf_w, 1e-7, f"{cfg.model_type} router weights (norm_topk_prob={cfg.norm_topk_prob})")
        assert torch.allclose(w.sum(-1), torch.ones(10)) == (cfg.norm_topk_prob or cfg.model_type == "mixtral")


# -------------------------------------------------------------------------------------------- config
def test_qwen3_moe_hub_and_transformers5_spellings_agree(hf_checkpoint):
    folder, hf = hf_checkpoint("qwen3-moe")
    written = json.loads((folder / "config.json").read_text())
    assert "num_local_experts" in written  # transformers 5 writes its canonical name ...
    hub = {k: v for k, v in written.items() if k != "num_local_experts"}
    hub["num_experts"] = written["num_local_experts"]  # ... the hub's config.json says num_experts
    a, b = ModelConfig.from_dict(written), ModelConfig.from_dict(hub)
    assert a == b and a.num_local_experts == 8 and "num_experts" not in b.extra
    assert a.moe_intermediate_size == 48 and a.norm_topk_prob is False
    mixtral = ModelConfig.from_file(hf_checkpoint("mixtral")[0])
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == mixtral.intermediate_size


@pytest.mark.parametrize("field, value, match", [
    ("num_experts_per_tok", 9, r"'num_experts_per_tok' must be an integer in 1\.\.8"),
    ("num_experts_per_tok", 0, r"'num_experts_per_tok'"),
    ("decoder_sparse_step", 0, r"'decoder_sparse_step' must be a positive integer"),
    ("moe_intermediate_size", -4, r"'moe_intermediate_size' must be a positive integer"),
])
def test_bad_moe_fields_are_named(hf_checkpoint, field, value, match):
    raw = json.loads((hf_checkpoint("qwen3-moe")[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({**raw, field: value}, source="m/config.json")


def hf_meta_count(hf_cfg, active_k: int | None = None) -> int:
    """Parameters of an HF model built on the meta device; experts scaled to ``active_k`` of them."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if active_k is not None and ".experts." in name:
            n = n // p.shape[0] * active_k  # fused (E, rows, cols): k experts' worth
        total += n
    return total


MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)


@pytest.mark.parametrize("cls, kw, model_type, total_b, active_b", [
    ("MixtralConfig", MIXTRAL_8X7B, "mixtral", 46.7, 12.9),       # model card: 46.7B, 12.9B active
    ("Qwen3MoeConfig", QWEN3_30B_A3B, "qwen3_moe", 30.5, 3.3),    # model card: 30.5B, 3.3B activated
    ("Qwen3MoeConfig", {**QWEN3_30B_A3B, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [5]},
     "qwen3_moe", None, None),
])
def test_total_and_active_parameters_of_real_configs(cls, kw, model_type, total_b, active_b):
    import transformers

    hf_cfg = getattr(transformers, cls)(**kw)
    cfg = ModelConfig.from_dict({**hf_cfg.to_dict(), "model_type": model_type})
    assert cfg.num_parameters() == hf_meta_count(hf_cfg)
    assert cfg.active_parameters() == hf_meta_count(hf_cfg, active_k=cfg.num_experts_per_tok)
    if total_b is not None:
        # model cards round their one-decimal figures either way (Qwen3-30B-A3B: 3.35B -> "3.3B")
        assert abs(cfg.num_parameters() / 1e9 - total_b) < 0.06
        assert abs(cfg.active_parameters() / 1e9 - active_b) < 0.06
    # one decode token reads the active weights less all but one row of the (untied) embedding table
    assert cfg.decode_bytes_per_token(2.0) == 2 * (cfg.active_parameters() - (cfg.vocab_size - 1) * cfg.hidden_size)


@pytest.mark.parametrize("family", MOE_FAMILIES + ["llama", "qwen2"])
def test_decode_bytes_equal_what_a_decode_step_touches(hf_checkpoint, family):
    """decode_bytes_per_token == bytes of every weight a one-token forward passes through (hooked)."""
    folder, _ = hf_checkpoint(family)
    ours = load_model(folder, dtype="fp32")
    touched: dict[int, int] = {}

    def note(m, args, out):
        for p in m.parameters(recurse=False):
            n = p.numel() if not isinstance(m, torch.nn.Embedding) else p.shape[1]  # a lookup reads one row
            touched[id(p)] = max(touched.get(id(p), 0), n * p.element_size())

    for m in ours.modules():
        m.register_forward_hook(note)
    with torch.no_grad():
        ours(torch.tensor([[7]]))
    assert sum(touched.values()) == ours.config.decode_bytes_per_token(4.0) == ours.weight_bytes_per_token()
    if family in MOE_FAMILIES:
        assert ours.config.active_parameters() < ours.config.num_parameters()
    else:
        assert ours.config.active_parameters() == ours.config.num_parameters()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_mixes_its_experts_alone_as_among_others(dtype):
    """Each token's expert outputs are summed in its routing order in fp32 the same way whether it is the only
    token (decode) or one of a batch grouped by expert: a verified row gets its one-token step's bits (inside
    exact_rows(), as the scheduler's verification runs, every expert product rounds per row too)."""
    from ember.models.moe import mix_experts
    from ember.runtime import ops

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=16)
    experts = torch.nn.ModuleList(MLP(cfg, 48) for _ in range(6)).to(dtype)
    x = torch.randn(7, 32).to(dtype)
    weights = torch.softmax(torch.randn(7, 3), -1)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(7)])  # routing order, not sorted
    with torch.no_grad(), ops.exact_rows():
        together = mix_experts(experts, x, weights, ids)
        for i in range(7):
            assert torch.equal(mix_experts(experts, x[i:i + 1], weights[i:i + 1], ids[i:i + 1])[0], together[i]), i
        ref = sum(experts[int(e)](x).float() * weights[:, j:j + 1] * (ids[:, j:j + 1] == e)
                  for j in range(3) for e in range(6))
    torch.testing.assert_close(together.float(), ref, atol=1e-2 if dtype is torch.bfloat16 else 1e-5, rtol=1e-2)
