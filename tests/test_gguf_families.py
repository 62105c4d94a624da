"""GGUF files of gpt-oss, Gemma 3, GLM-4.5 MoE, DeepSeek-V3 (MLA) and MiniMax-M2 as llama.cpp's converter writes them.

The files in tests/data/gguf_families/ were made by ``convert_hf_to_gguf.py`` from tiny random HF checkpoints
(``scripts/make_gguf_fixtures.py``, which also stored HF's fp32 logits over a prompt, HF's greedy continuation
and the checkpoint's config.json). Oracles: HF on the original weights (F32 files: within 1e-4, greedy tokens
identical), HF on the checkpoint's dequantized MXFP4 experts (gpt-oss's MXFP4 file: same bounds), and for Q8_0
files HF on the original weights within the 8-bit rounding's own effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ember
from ember.config import ModelConfig
from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.gguf import GGUFFile, config_from_gguf, load_gguf_model

DATA = Path(__file__).parent / "data" / "gguf_families"
FAMILIES = ["gpt-oss", "gemma3", "glm4moe", "deepseek2", "minimax-m2"]
MODEL_TYPES = {"gpt-oss": "gpt_oss", "gemma3": "gemma3_text", "glm4moe": "glm4_moe", "deepseek2": "deepseek_v3",
               "minimax-m2": "minimax_m2"}
FP32_TOL = 1e-4
# Q8_0 against HF on the unrounded weights: |logits| here are ~1, 8-bit blocks of 32 move them by ~1e-2.
Q8_TOL = 5e-2
# Config fields that decide the computation (the rest: ids, dtype, names).
FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
          "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "sliding_window", "layer_types",
          "norm_topk_prob", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
          "n_group", "topk_group", "routed_scaling_factor", "n_shared_experts", "first_k_dense_replace",
          "query_pre_attn_scalar", "final_logit_softcapping", "rotary_dim", "swiglu_limit", "swiglu_alpha",
          "attention_bias", "use_qk_norm")


def f32(v):
    """Metadata floats are float32 in GGUF: compare at that precision (dict values too)."""
    if isinstance(v, float):
        return float(np.float32(v))
    if isinstance(v, dict):
        return {k: f32(x) for k, x in v.items()}
    return v


def reference(family: str) -> dict:
    return dict(np.load(DATA / f"{family}-reference.npz"))


def ours(path: Path, ids: list[int]) -> torch.Tensor:
    model = load_gguf_model(path, dtype="fp32")
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def worst(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_the_checkpoints(family):
    ref = reference(family)
    theirs = ModelConfig.from_dict(json.loads(str(ref["config"])))
    got = config_from_gguf(GGUFFile.open(DATA / f"{family}-f32.gguf"))
    assert got.model_type == MODEL_TYPES[family]
    diff = {f: (getattr(got, f, None), getattr(theirs, f, None)) for f in FIELDS
            if f32(getattr(got, f, None)) != f32(getattr(theirs, f, None))}
    assert not diff, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_logits_match_hf_and_greedy_is_identical(family):
    ref = reference(family)
    prompt = ref["prompt"].tolist()
    assert worst(ours(DATA / f"{family}-f32.gguf", prompt), ref["logits"]) < FP32_TOL
    llm = ember.load(DATA / f"{family}-f32.gguf", device="cpu", dtype="fp32")
    got = llm.generate(prompt, max_new_tokens=len(ref["greedy"]), temperature=0.0, ignore_eos=True).token_ids
    assert got == ref["greedy"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_file_stays_in_blocks_and_close_to_hf(family):
    from ember.quant.gguf_linear import GGUFLinear

    ref = reference(family)
    path = DATA / f"{family}-q8_0.gguf"
    model = load_gguf_model(path, dtype="fp32")
    blocks = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert blocks and all(m.qtype.name == "Q8_0" for m in blocks)
    with torch.no_grad():
        logits = model(torch.tensor([ref["prompt"].tolist()]))[0]
    assert worst(logits, ref["logits"]) < Q8_TOL


def test_gpt_oss_mxfp4_experts_are_held_as_stored_and_exact():
    """The converter keeps the hub's MXFP4 experts as ggml MXFP4: Ember multiplies those blocks (a view of the
    file, no float copy) and matches HF on the checkpoint's dequantized experts."""
    from ember.loading.gguf.family_weights import GGUFGptOssExperts

    ref = reference("gpt-oss")
    path = DATA / "gpt-oss-mxfp4.gguf"
    model = load_gguf_model(path, dtype="fp32")
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(isinstance(e, GGUFGptOssExperts) and e.ffn_up_exps[0].qtype.name == "MXFP4" for e in experts)
    gf = GGUFFile.open(path)
    held = sum(b.numel() * b.element_size() for e in experts for b in e.buffers() if b.dtype == torch.uint8)
    stored = sum(int(t.n_bytes) for name, t in gf.tensors.items() if "_exps.weight" in name)
    assert held == stored
    prompt = ref["prompt"].tolist()
    assert worst(ours(path, prompt), ref["mxfp4_logits"]) < FP32_TOL
    llm = ember.load(path, device="cpu", dtype="fp32")
    got = llm.generate(prompt, max_new_tokens=len(ref["mxfp4_greedy"]), temperature=0.0, ignore_eos=True).token_ids
    assert got == ref["mxfp4_greedy"].tolist()


def test_gpt_oss_q8_0_experts_stay_in_blocks():
    from ember.loading.gguf.family_weights import GGUFGptOssExperts

    model = load_gguf_model(DATA / "gpt-oss-q8_0.gguf", dtype="fp32")
    assert all(isinstance(layer.mlp.experts, GGUFGptOssExperts) for layer in model.model.layers)


def test_plan_prices_the_files(capsys):
    from ember.cli import main

    for family in FAMILIES:
        assert main(["plan", str(DATA / f"{family}-q8_0.gguf")]) == 0
        out = capsys.readouterr().out
        assert f": {MODEL_TYPES[family]}," in out and "Q8_0" in out, out


def test_missing_and_unsupported_are_refused_by_name(tmp_path):
    import gguf

    src = GGUFFile.open(DATA / "glm4moe-f32.gguf")
    for drop, arch, match in (("blk.1.exp_probs_b.bias", "glm4moe", "e_score_correction_bias"),
                              (None, "bert", "'bert'")):
        out = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(out, arch)
        for key, field in src.reader.fields.items():
            if key.startswith("glm4moe.") and not key.startswith("GGUF"):
                vtype = field.types[0]
                value = field.contents()
                w.add_key_value(key.replace("glm4moe.", f"{arch}."), value, vtype,
                                sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        for name, t in src.tensors.items():
            if name != drop:
                w.add_tensor(name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises((GGUFError, UnsupportedModelError), match=match):
            load_gguf_model(out, dtype="fp32")
