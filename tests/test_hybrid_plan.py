"""The large hybrid catalog entries (Qwen3.5-122B-A10B, Nemotron 3 Super) in the planner: recurrent state priced
once per sequence, KV only for the attention layers, and ``ember plan --on dgx-spark --quant int4`` saying so."""

from __future__ import annotations

import argparse
import json

import pytest

from ember import catalog, planner
from ember.config import ModelConfig

MiB, KiB = 2**20, 2**10


def _expected_cache(name: str) -> tuple[int, int, int, int]:
    """(fp32 state bytes per sequence, bf16 KV bytes per token, recurrent layers, attention layers), from the
    entry's config facts by the published layer formulas."""
    c = catalog.get(name).config
    raw = catalog.MODELS[catalog.get(name).name]["config"]
    if c.model_type == "nemotron_h":
        pattern = raw["hybrid_override_pattern"]
        n_rec, n_att = pattern.count("M"), pattern.count("*")
        inner = raw["mamba_num_heads"] * raw["mamba_head_dim"]
        conv = (inner + 2 * raw["n_groups"] * raw["ssm_state_size"]) * (raw["conv_kernel"] - 1)
        ssm = inner * raw["ssm_state_size"]
    else:
        types = raw["layer_types"]
        n_rec, n_att = types.count("linear_attention"), types.count("full_attention")
        kd, vd = raw["linear_num_key_heads"] * raw["linear_key_head_dim"], \
            raw["linear_num_value_heads"] * raw["linear_value_head_dim"]
        conv = (2 * kd + vd) * (raw["linear_conv_kernel_dim"] - 1)
        ssm = raw["linear_num_value_heads"] * raw["linear_key_head_dim"] * raw["linear_value_head_dim"]
    kv = n_att * raw["num_key_value_heads"] * raw["head_dim"] * 2 * 2
    return n_rec * (conv + ssm) * 4, kv, n_rec, n_att


@pytest.mark.parametrize("name,layers", [("qwen3.5-122b-a10b", (36, 12)), ("nemotron-3-super", (40, 8))])
def test_large_hybrid_state_and_kv_priced_apart(name, layers):
    state, kv, n_rec, n_att = _expected_cache(name)
    assert (n_rec, n_att) == layers
    cfg: ModelConfig = catalog.get(name).config
    # the state does not grow with the context; only the attention layers' KV does
    assert planner.kv_cache_bytes(cfg, 1, 1, "bf16") == state + kv
    assert planner.kv_cache_bytes(cfg, 131072, 1, "bf16") - planner.kv_cache_bytes(cfg, 65536, 1, "bf16") == \
        65536 * kv
    assert planner.kv_cache_bytes(cfg, 4096, 3, "bf16") == 3 * (state + 4096 * kv)


@pytest.mark.parametrize("name", ["qwen3.5-122b-a10b", "nemotron-3-super"])
def test_plan_large_hybrid_on_dgx_spark_int4(name, capsys):
    from ember.plan_cli import add_parser

    ap = argparse.ArgumentParser(prog="ember")
    add_parser(ap.add_subparsers(dest="verb"))
    state, kv, n_rec, n_att = _expected_cache(name)
    cfg = catalog.get(name).config

    args = ap.parse_args(["plan", name, "--on", "dgx-spark", "--quant", "int4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (f"cache: recurrent state {state / MiB:.1f} MiB per sequence, fixed ({n_rec} of "
            f"{cfg.num_hidden_layers} layers, fp32), plus KV {kv / KiB:.1f} KiB per token in bf16 "
            f"({n_att} attention layers)") in out

    # 131k tokens prefilled in chunks (the server's way): a 120B-class model in int4 fits a 128 GB machine with
    # room for its whole 262k context, KV being a few KiB per token
    args = ap.parse_args(["plan", name, "--on", "dgx-spark", "--quant", "int4", "--context", "131072",
                          "--prefill-chunk", "4096", "--json"])
    assert args.func(args) == 0
    (opt,) = json.loads(capsys.readouterr().out)["options"]
    assert opt["fits"] and opt["memory_bytes"]["kv_cache"] == state + 131072 * kv
    assert opt["max_context"] == cfg.max_position_embeddings and 55 * 2**30 < opt["memory_bytes"]["weights"] < 70 * 2**30


def test_latent_moe_activations_use_the_latent_width():
    """Nemotron 3 Super routes tokens in a 1024-wide latent space: the prefill estimate gathers k x latent per
    token, not k x hidden (which overstated its activations fourfold and cut its max context)."""
    cfg = catalog.get("nemotron-3-super").config
    raw = dict(catalog.MODELS["nemotron-3-super-120b-a12b"]["config"])
    raw.pop("moe_latent_size")
    wide = ModelConfig.from_dict(raw)
    k, h, d = cfg.num_experts_per_tok, cfg.hidden_size, 1024
    tokens = 8192
    diff = planner.prefill_activation_bytes(wide, tokens) - planner.prefill_activation_bytes(cfg, tokens)
    assert diff == pytest.approx(tokens * planner.K_ACT * 3 * k * (h - d) * 2)
