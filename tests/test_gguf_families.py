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
F32_FILES = [*FAMILIES, "deepseek2-yarn"]  # DeepSeek-V3's YaRN (mscale) without q_lora: an F32 file only
MODEL_TYPES = {"gpt-oss": "gpt_oss", "gemma3": "gemma3_text", "glm4moe": "glm4_moe", "deepseek2": "deepseek_v3",
               "deepseek2-yarn": "deepseek_v3", "minimax-m2": "minimax_m2"}
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


@pytest.mark.parametrize("family", F32_FILES)
def test_config_is_the_checkpoints(family):
    ref = reference(family)
    theirs = ModelConfig.from_dict(json.loads(str(ref["config"])))
    got = config_from_gguf(GGUFFile.open(DATA / f"{family}-f32.gguf"))
    assert got.model_type == MODEL_TYPES[family]
    diff = {f: (getattr(got, f, None), getattr(theirs, f, None)) for f in FIELDS
            if f32(getattr(got, f, None)) != f32(getattr(theirs, f, None))}
    assert not diff, diff


@pytest.mark.parametrize("family", F32_FILES)
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
    # Held within 1.1x the file's bytes, but for DeepSeek's kv_b_proj, rebuilt in the compute dtype from the split
    # attn_k_b (stored transposed, so its blocks cannot serve kv_b's rows) and attn_v_b.
    tensors = {t.data_ptr(): t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.numel() and "kv_b_proj" not in n}  # a tied head's blocks: once
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    stored = sum(int(t.n_bytes) for n, t in GGUFFile.open(path).tensors.items()
                 if ".attn_k_b." not in n and ".attn_v_b." not in n)
    assert held <= 1.1 * stored


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


def copy_gguf(src: Path, out: Path, arch: str | None = None, drop: str | None = None,
              extra: dict[str, np.ndarray] | None = None) -> Path:
    """``src`` rewritten (metadata and tensors as stored) under another architecture name, less one tensor, or
    with extra F32 tensors."""
    import gguf

    gf = GGUFFile.open(src)
    old = gf.architecture
    w = gguf.GGUFWriter(out, arch or old)
    for key, field in gf.reader.fields.items():
        if key.startswith(f"{old}."):
            vtype = field.types[0]
            w.add_key_value(key.replace(f"{old}.", f"{arch or old}."), field.contents(), vtype,
                            sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for name, t in gf.tensors.items():
        if name != drop:
            w.add_tensor(name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_missing_and_unsupported_are_refused_by_name(tmp_path):
    src = DATA / "glm4moe-f32.gguf"
    missing = copy_gguf(src, tmp_path / "m.gguf", drop="blk.1.exp_probs_b.bias")
    with pytest.raises(GGUFError, match="missing.*e_score_correction_bias"):
        load_gguf_model(missing, dtype="fp32")
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported; supported: deepseek2, gemma3"):
        load_gguf_model(copy_gguf(src, tmp_path / "b.gguf", arch="bert"), dtype="fp32")
    gone = copy_gguf(DATA / "deepseek2-f32.gguf", tmp_path / "d.gguf", drop="blk.1.attn_v_b.weight")
    with pytest.raises(GGUFError, match="blk.1.attn_v_b.weight' is missing"):
        load_gguf_model(gone, dtype="fp32")


def test_glm_multi_token_prediction_layers_are_skipped(tmp_path):
    """Released GLM-4.5 files carry their MTP layer (blk.<n>, counted in block_count): Ember runs the rest."""
    ref = reference("glm4moe")
    gf = GGUFFile.open(DATA / "glm4moe-f32.gguf")
    n = gf.get("glm4moe.block_count") - gf.get("glm4moe.nextn_predict_layers")
    mtp = {f"blk.{n}.{k}": np.array(gf.tensors[f"blk.1.{k}"].data) for k in ("attn_norm.weight", "attn_q.weight")}
    mtp[f"blk.{n}.nextn.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    path = copy_gguf(DATA / "glm4moe-f32.gguf", tmp_path / "mtp.gguf", extra=mtp)
    assert worst(ours(path, ref["prompt"].tolist()), ref["logits"]) < FP32_TOL

def tensor_table(path: Path) -> dict[str, tuple]:
    gf = GGUFFile.open(path)
    return {name: (gf.tensor_shape(name), int(t.tensor_type)) for name, t in gf.tensors.items()}


def hparams(path: Path, arch: str) -> dict:
    gf = GGUFFile.open(path)
    return {k: f32(gf.get(k)) for k in gf.reader.fields if k.startswith(f"{arch}.")}


@pytest.mark.parametrize("family", ["gpt-oss", "gemma3"])
def test_export_writes_what_the_converter_writes(family, tmp_path):
    """``write_gguf`` of a loaded gpt-oss / Gemma 3 gives the converter's tensor table and metadata, and reads back
    to the same logits."""
    from ember.loading.gguf import load_gguf
    from ember.loading.gguf.writer import write_gguf

    ref = reference(family)
    src = DATA / f"{family}-f32.gguf"
    model, tok = load_gguf(src, dtype="fp32")
    out = write_gguf(model, tok, tmp_path / "w.gguf", "f32").path
    assert tensor_table(out) == tensor_table(src)
    theirs, mine = hparams(src, family), hparams(out, family)
    assert {k: mine.get(k) for k in theirs} == theirs
    assert worst(ours(out, ref["prompt"].tolist()), ref["logits"]) < FP32_TOL


def test_export_of_gpt_oss_held_in_mxfp4_blocks_round_trips(tmp_path):
    from ember.loading.gguf import load_gguf
    from ember.loading.gguf.writer import write_gguf

    ref = reference("gpt-oss")
    src = DATA / "gpt-oss-mxfp4.gguf"
    model, tok = load_gguf(src, dtype="fp32")
    out = write_gguf(model, tok, tmp_path / "w.gguf", "f32").path
    assert tensor_table(out) == tensor_table(src)  # the experts stay MXFP4, as the converter writes them
    a, b = GGUFFile.open(out), GGUFFile.open(src)
    assert all(np.array_equal(a.tensors[n].data, b.tensors[n].data) for n in b.tensors if "_exps.weight" in n)
    assert worst(ours(out, ref["prompt"].tolist()), ref["mxfp4_logits"]) < FP32_TOL
    q8 = write_gguf(model, tok, tmp_path / "q8.gguf", "q8_0").path
    assert worst(ours(q8, ref["prompt"].tolist()), ref["mxfp4_logits"]) < Q8_TOL


@pytest.mark.parametrize("family", ["gpt-oss", "gemma3"])
def test_cli_export_of_an_hf_checkpoint_matches_hf(family, tmp_path):
    """`ember export DIR --gguf` and `ember quantize DIR --to gguf-q8_0` on an HF folder (gpt-oss with the hub's
    MXFP4 experts), read back against HF on the same weights."""
    import transformers

    from ember.cli import main
    from ember.loading.quantized import quantize_checkpoint
    from test_gguf_write import byte_level_tokenizer, save_checkpoint

    tok = byte_level_tokenizer()
    cfg = json.loads(str(reference(family)["config"]))
    cfg.update(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.float32)
    folder = save_checkpoint(tmp_path / "hf", hf.eval(), tok, bos_token="<|begin_of_text|>")
    if family == "gpt-oss":  # as the hub ships it; HF's reference then runs the dequantized experts
        from ember.quant.mxfp4 import dequantize_mxfp4
        from safetensors.torch import load_file

        quantize_checkpoint(folder, tmp_path / "mx", "mxfp4", lm_head=None)
        folder = tmp_path / "mx"
        stored = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
        with torch.no_grad():
            for i, layer in enumerate(hf.model.layers):
                for kind in ("gate_up_proj", "down_proj"):
                    p = f"model.layers.{i}.mlp.experts.{kind}"
                    w = dequantize_mxfp4(stored[f"{p}_blocks"], stored[f"{p}_scales"]).transpose(1, 2)
                    getattr(layer.mlp.experts, kind).copy_(w)
    prompt = [3, 50, 7, 99, 12, 300, 41, 8, 77, 5, 150, 21]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    assert main(["export", str(folder), "--gguf", str(tmp_path / "f.gguf"), "--type", "f32"]) == 0
    gf = GGUFFile.open(tmp_path / "f.gguf")
    assert gf.architecture == family
    assert family != "gpt-oss" or gf.tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == "MXFP4"
    assert worst(ours(tmp_path / "f.gguf", prompt), want) < FP32_TOL
    assert main(["quantize", str(folder), "--to", "gguf-q8_0", str(tmp_path / "q.gguf")]) == 0
    assert worst(ours(tmp_path / "q.gguf", prompt), want) < Q8_TOL


# ==================================================================== llama.cpp itself, where installed
# The files' own runtime: llama-cpp-python is an optional bench extra, absent in CI.
LLAMA_FILES = ["gpt-oss-f32", "gemma3-f32", "glm4moe-f32", "deepseek2-f32", "minimax-m2-f32",
               "gpt-oss-mxfp4", "gpt-oss-q8_0", "gemma3-q8_0", "glm4moe-q8_0", "deepseek2-q8_0", "minimax-m2-q8_0"]


@pytest.mark.parametrize("name", LLAMA_FILES)
def test_llama_cpp_runs_the_same_file_to_the_same_logits(name):
    """F32 files: llama.cpp's logits within 1e-3 of Ember's and the same greedy tokens; quantized files: within
    3e-2 (llama.cpp rounds the activations to 8 bits for its Q8_0 and MXFP4 products; Ember's fp32 path does not)."""
    check_llama_cpp(name, 1e-3, 3e-2)


def check_llama_cpp(name: str, f32_tol: float, quant_tol: float) -> None:
    """llama.cpp's logits over the reference prompt within ``f32_tol`` (F32 files, greedy tokens identical too) or
    ``quant_tol`` of Ember's on ``DATA/<name>.gguf``; skipped where llama-cpp-python is not installed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = reference(name.rsplit("-", 1)[0])["prompt"].tolist()
    llm = llama_cpp.Llama(str(DATA / f"{name}.gguf"), logits_all=True, verbose=False, n_ctx=64, n_threads=2, seed=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    f32 = name.endswith("-f32")
    assert worst(ours(DATA / f"{name}.gguf", ids), theirs) < (f32_tol if f32 else quant_tol)
    if f32:
        seq = list(ids)
        llm.reset()
        llm.eval(seq)
        for _ in range(16):
            seq.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([seq[-1]])
        got = ember.load(DATA / f"{name}.gguf", device="cpu", dtype="fp32").generate(
            ids, max_new_tokens=16, temperature=0.0, ignore_eos=True).token_ids
        assert got == seq[len(ids):len(ids) + 16]


@pytest.mark.parametrize("src", ["gpt-oss-mxfp4", "gemma3-f32"])
@pytest.mark.parametrize("to", ["f32", "q8_0"])
def test_llama_cpp_runs_what_ember_writes(src, to, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from ember.loading.gguf import load_gguf
    from ember.loading.gguf.writer import write_gguf

    ids = reference(src.rsplit("-", 1)[0])["prompt"].tolist()
    model, tok = load_gguf(DATA / f"{src}.gguf", dtype="fp32")
    out = write_gguf(model, tok, tmp_path / "w.gguf", to).path
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=64, n_threads=2, seed=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    exact = to == "f32" and "mxfp4" not in src
    assert worst(ours(out, ids), theirs) < (1e-3 if exact else 3e-2)
