"""GGUF files of the hybrid families (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, Nemotron-H) as llama.cpp's converter writes them.

The files in ``tests/data/gguf_hybrid/`` were made by ``scripts/make_gguf_hybrid_fixtures.py``: tiny random HF
checkpoints (``save_pretrained``) converted by llama.cpp's own ``convert_hf_to_gguf.py``, with HF's fp32 logits
for a 70-token prompt and its greedy continuation stored beside each f32 file. Neither the converter nor
llama.cpp is needed here; where ``llama_cpp`` is importable, one more test compares against llama.cpp itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.cache import StaticKVCache
from ember.errors import EmberError, GGUFError, UnsupportedModelError
from ember.quant.gguf_linear import GGUFEmbedding, GGUFLinear

gguf = pytest.importorskip("gguf")
from ember.loading.gguf import GGUFFile, config_from_gguf, load_gguf, load_gguf_model  # noqa: E402
from ember.loading.gguf import weights as gguf_weights  # noqa: E402

DATA = Path(__file__).parent / "data" / "gguf_hybrid"
# fixture -> (Ember model_type, GGUF architecture)
F32 = {"qwen3next-f32": ("qwen3_next", "qwen3next"), "qwen35-f32": ("qwen3_5_text", "qwen35"),
       "qwen35moe-f32": ("qwen3_5_moe_text", "qwen35moe"), "nemotron_h-f32": ("nemotron_h", "nemotron_h_moe"),
       "nemotron_h_moe-f32": ("nemotron_h", "nemotron_h_moe")}


def reference(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (1, T + steps), positions (P,), HF logits (1, P, V)) stored for fixture ``name``."""
    ref = np.load(DATA / f"{name}.npz")
    return torch.from_numpy(ref["ids"]), torch.from_numpy(ref["positions"]), torch.from_numpy(ref["logits"])


def run_greedy(model, ids: torch.Tensor, positions: torch.Tensor, chunks: int = 1):
    """Prefill the prompt (the ids before the first decode position, in ``chunks`` pieces), then decode greedily
    through the cache. Returns (logits at ``positions`` (1, P, V), Ember's greedy tokens (1, steps))."""
    steps = 1  # the contiguous tail of positions: the last prompt token, then one per decode step
    while steps < len(positions) and positions[-steps - 1] == positions[-steps] - 1:
        steps += 1
    prompt_len = int(positions[-steps]) + 1
    prompt = ids[:, :prompt_len]
    cache = StaticKVCache(model.config, 1, ids.shape[1] + 1, model.model.norm.weight.dtype, "cpu")
    pieces = []
    with torch.no_grad():
        for part in torch.tensor_split(prompt, chunks, dim=1):
            pieces.append(model(part, cache=cache, start=cache.pos))
            cache.advance(part.shape[1])
        logits = [torch.cat(pieces, dim=1)]
        tokens = [logits[0][:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            out = model(tokens[-1], cache=cache, start=cache.pos)
            cache.advance(1)
            logits.append(out)
            tokens.append(out[:, -1].argmax(-1, keepdim=True))
    full = torch.cat(logits, dim=1)
    return full[:, positions], torch.cat(tokens, dim=1)


@pytest.mark.parametrize("name", sorted(F32))
def test_f32_files_match_hf_prefill_decode_and_greedy(name):
    ids, positions, want = reference(name)
    model, tokenizer = load_gguf(DATA / f"{name}.gguf", dtype="fp32")
    assert (model.config.model_type, GGUFFile.open(DATA / f"{name}.gguf").architecture) == F32[name]
    got, tokens = run_greedy(model, ids, positions)
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(tokens, ids[:, -tokens.shape[1]:])  # HF's greedy continuation, token for token
    assert tokenizer.encode("hybrid layers", add_special_tokens=False)  # the file's vocabulary loads too


@pytest.mark.parametrize("name", ["qwen35moe-f32", "nemotron_h_moe-f32"])
def test_chunked_prefill_gives_the_same_logits(name):
    ids, positions, want = reference(name)
    model = load_gguf_model(DATA / f"{name}.gguf", dtype="fp32")
    got, tokens = run_greedy(model, ids, positions, chunks=3)
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(tokens, ids[:, -tokens.shape[1]:])


def test_config_read_from_metadata():
    cfg = config_from_gguf(GGUFFile.open(DATA / "qwen35moe-f32.gguf"))
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim) == (2, 4, 16, 16, 4)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.shared_expert_intermediate_size) == (4, 2, 32, 32)
    assert cfg.partial_rotary_factor == 0.25 and cfg.tie_word_embeddings
    assert cfg.extra["gguf_v_heads_tiled"]  # 2 key heads, 4 value heads: llama.cpp's tiled order
    nem = config_from_gguf(GGUFFile.open(DATA / "nemotron_h_moe-f32.gguf"))
    assert nem.layer_types == ["linear_attention", "moe", "full_attention", "linear_attention"]
    assert (nem.extra["mamba_num_heads"], nem.extra["mamba_head_dim"], nem.extra["n_groups"],
            nem.extra["ssm_state_size"]) == (8, 8, 2, 16)
    assert nem.num_local_experts == 4 and nem.num_key_value_heads == 1 and not nem.tie_word_embeddings


def test_q8_0_file_stays_in_blocks_and_is_as_close_as_its_weights_allow(monkeypatch):
    """Q8_0 projections (DeltaNet's too) and experts stay in their blocks; the kernels' logits differ from the
    same weights decoded to fp32 by well under what Q8_0 itself changes against HF's fp32 model."""
    ids, positions, hf = reference("qwen35moe-f32")
    path = DATA / "qwen35moe-q8_0.gguf"
    model = load_gguf_model(path, dtype="fp32")
    kept = {n for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert {"model.layers.0.linear_attn.in_proj_qkv", "model.layers.0.linear_attn.out_proj",
            "model.layers.1.mlp.experts.3.down_proj", "model.layers.3.self_attn.q_proj"} <= kept
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)
    got, tokens = run_greedy(model, ids, positions)
    monkeypatch.setattr(gguf_weights, "KEPT_TYPES", ())  # the same file, every tensor decoded to fp32
    decoded = load_gguf_model(path, dtype="fp32")
    assert not any(isinstance(m, GGUFLinear) for m in decoded.modules())
    ref, _ = run_greedy(decoded, ids, positions)
    quant_effect = (ref - hf).pow(2).mean().sqrt()
    assert quant_effect > 0
    assert (got - ref).pow(2).mean().sqrt() <= 0.6 * quant_effect
    assert torch.equal(tokens, ids[:, -tokens.shape[1]:])


def test_quantized_file_runs_in_bf16_through_ember_load():
    """``ember.load`` on the Q8_0 file in bf16, the DeltaNet and expert projections through the GGUF kernels' bf16
    path, stays close to the fp32 run of the same file."""
    import ember

    ids, positions, _ = reference("qwen35moe-f32")
    path = DATA / "qwen35moe-q8_0.gguf"
    model = ember.load(str(path), dtype="bf16").model
    assert model.model.norm.weight.dtype == torch.bfloat16
    got, _ = run_greedy(model, ids, positions)
    ref, _ = run_greedy(load_gguf_model(path, dtype="fp32"), ids, positions)
    assert (got.float() - ref).pow(2).mean().sqrt() < 0.05 * ref.pow(2).mean().sqrt()


def _copy_gguf(src: Path, dst: Path, arch: str | None = None, drop: tuple[str, ...] = (),
               fields: dict | None = None) -> Path:
    """``src`` rewritten: another architecture name, tensors dropped, metadata fields replaced."""
    r = gguf.GGUFReader(str(src))
    old = r.fields["general.architecture"].contents()
    arch = arch or old
    w = gguf.GGUFWriter(str(dst), arch)
    fields = fields or {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = key.replace(f"{old}.", f"{arch}.", 1)
        value = fields.pop(key, f.contents())
        if value is None:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())) if t.data.dtype == np.uint8
                         else None, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_the_architecture_name_nemotron_h_loads_the_same_model(tmp_path):
    """Older converters write dense Nemotron-H files as ``nemotron_h``: the same tensors, the same model."""
    path = _copy_gguf(DATA / "nemotron_h-f32.gguf", tmp_path / "n.gguf", arch="nemotron_h")
    ids, positions, want = reference("nemotron_h-f32")
    got, _ = run_greedy(load_gguf_model(path, dtype="fp32"), ids, positions)
    assert (got - want).abs().max() < 1e-4


def test_other_architectures_and_broken_files_are_refused(tmp_path):
    path = _copy_gguf(DATA / "qwen35-f32.gguf", tmp_path / "r.gguf", arch="rwkv7")
    with pytest.raises(UnsupportedModelError, match="architecture 'rwkv7' is not supported.*hybrid: nemotron_h"):
        load_gguf_model(path)
    path = _copy_gguf(DATA / "qwen35-f32.gguf", tmp_path / "a.gguf", drop=("blk.1.ssm_a",))
    with pytest.raises(GGUFError, match="layer 1 is linear_attention .* 'blk.1.ssm_a' is missing"):
        load_gguf_model(path)
    path = _copy_gguf(DATA / "nemotron_h-f32.gguf", tmp_path / "n.gguf", drop=("blk.0.ssm_norm.weight",))
    with pytest.raises(GGUFError, match="missing 1 tensor.*model.layers.0.mixer.norm.weight"):
        load_gguf_model(path)
    bad_a = tmp_path / "sign.gguf"
    r = gguf.GGUFReader(str(_copy_gguf(DATA / "qwen35-f32.gguf", bad_a)), "r+")
    next(t for t in r.tensors if t.name == "blk.0.ssm_a").data[:] = 1.0  # A = -exp(A_log) must be negative
    r.data.flush()
    with pytest.raises(EmberError, match="ssm_a must be negative"):
        load_gguf_model(bad_a)


def test_mtp_blocks_are_kept_apart(tmp_path):
    """A trailing nextn block (multi-token prediction) is not a decoder layer: it is kept in extra_weights, under
    the checkpoint's mtp.* names (tests/test_gguf_mtp.py: the converter's own file, proposing)."""
    src = DATA / "qwen35-f32.gguf"
    r = gguf.GGUFReader(str(src))
    dst = tmp_path / "mtp.gguf"
    w = gguf.GGUFWriter(str(dst), "qwen35")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        if key == "qwen35.block_count":
            value = 5
        elif key == "qwen35.attention.recurrent_layers":
            value = value + [False]
        w.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    w.add_uint32("qwen35.nextn_predict_layers", 1)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
        if t.name.startswith("blk.3."):  # the MTP block is a full-attention layer plus its nextn tensors
            w.add_tensor(t.name.replace("blk.3.", "blk.4."), np.array(t.data))
    w.add_tensor("blk.4.nextn.eh_proj.weight", np.zeros((32, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = load_gguf_model(dst, dtype="fp32")
    assert model.config.num_hidden_layers == 4
    assert "mtp.fc.weight" in model.extra_weights and "mtp.layers.0.self_attn.q_proj.weight" in model.extra_weights
    ids, positions, want = reference("qwen35-f32")
    got, _ = run_greedy(model, ids, positions)
    assert (got - want).abs().max() < 1e-4


def plan_json(path: Path, context: int, capsys) -> dict:
    """``ember plan PATH --context N --dtype fp32 --json``, parsed."""
    import argparse
    import json

    from ember.plan_cli import add_parser

    ap = argparse.ArgumentParser(prog="ember")
    add_parser(ap.add_subparsers(dest="verb"))
    args = ap.parse_args(["plan", str(path), "--context", str(context), "--dtype", "fp32", "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_prices_recurrent_state_apart_from_kv(capsys):
    """``ember plan file.gguf``: the 3 DeltaNet layers' state is fixed per sequence, only the one attention layer's
    KV grows with the context; the DeltaNet projections are priced at their Q8_0 bytes."""
    path = DATA / "qwen35moe-q8_0.gguf"
    small, big = plan_json(path, 1024, capsys), plan_json(path, 2048, capsys)
    kv = [p["options"][0]["memory_bytes"]["kv_cache"] for p in (small, big)]
    per_token = 2 * 1 * 16 * 4  # one attention layer: k and v, 1 KV head of 16, fp32
    state = 3 * (128 * 3 + 4 * 16 * 16) * 4  # per DeltaNet layer: conv window (C=128, K-1=3) + (Hv, dk, dv), fp32
    assert kv[1] - kv[0] == 1024 * per_token
    assert kv[0] == state + 1024 * per_token
    gf = GGUFFile.open(path)
    q8 = sum(int(t.n_bytes) for n, t in gf.tensors.items()
             if any(k in n for k in (".attn_qkv.", ".attn_gate.", ".ssm_out.", ".ssm_alpha.", ".ssm_beta.")))
    assert small["options"][0]["memory_bytes"]["detail"]["weights.recurrent"] == q8
    assert any(n.startswith("cache: recurrent state") for n in small["notes"])


def test_llama_cpp_gives_the_same_logits():
    """llama.cpp itself on the same files (only where llama-cpp-python is installed; fp32 KV cache). The dense
    Nemotron-H file is left out: converted from a transformers 5 config.json, which always carries the MoE
    fields, it says ``nemotron_h_moe`` with zero feed-forward widths, and llama.cpp then takes its MLP layer
    for a Mamba layer; Ember reads each layer's block off its tensors."""
    llama_cpp = pytest.importorskip("llama_cpp")
    for name in ("qwen3next-f32", "qwen35-f32", "qwen35moe-f32", "nemotron_h_moe-f32"):
        ids, positions, _ = reference(name)
        prompt = ids[0, :int(positions[-1]) + 1].tolist()
        llm = llama_cpp.Llama(str(DATA / f"{name}.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                              type_k=0, type_v=0)  # GGML_TYPE_F32
        llm.eval(prompt)
        theirs = torch.tensor(np.array(llm.scores[:len(prompt)]))[positions]
        model = load_gguf_model(DATA / f"{name}.gguf", dtype="fp32")
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0, positions]
        assert (ours - theirs).abs().max() < 1e-4, name
