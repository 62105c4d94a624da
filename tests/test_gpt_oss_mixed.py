"""gpt-oss with MXFP4 experts and int8 elsewhere (``--quant mxfp4+int8``, or ``--quant int8`` on an MXFP4 folder):
loading, the fused decode blocks, ``ember quantize`` round trips and the planner's option."""

from __future__ import annotations

import json

import pytest
import torch

from ember.errors import QuantizationError
from ember.loading import load_model
from ember.quant.base import QuantizedLinear
from ember.quant.int8 import Int8Linear
from ember.quant.mxfp4 import Mxfp4Experts
from test_mxfp4 import mxfp4_gpt_oss  # noqa: F401  (the fixture: float and MXFP4 gpt-oss folders)

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def folders(mxfp4_gpt_oss):
    """(float folder, MXFP4 folder as the hub publishes it, HF model of the float folder)."""
    return mxfp4_gpt_oss


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(11))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_int8_beside_the_stored_experts_matches_hf_on_a_dequantized_copy(folders):
    """HF on a float copy holding our dequantized experts and int8 projections/head gives our logits; the router and
    sinks stay float, as llama.cpp's MXFP4_MOE keeps them."""
    import transformers

    float_folder, folder, _ = folders
    ours = load_model(folder, dtype="fp32", quant="int8")
    layer = ours.model.layers[0]
    assert isinstance(layer.mlp.experts, Mxfp4Experts) and layer.mlp.experts.gate_up_proj_blocks.dtype == torch.uint8
    assert all(type(getattr(layer.self_attn, p)) is Int8Linear for p in PROJS)
    assert not isinstance(layer.mlp.router, QuantizedLinear) and layer.self_attn.sinks.dtype == torch.float32
    assert type(ours.lm_head) is Int8Linear  # --lm-head's default under --quant
    hf = transformers.AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for mine, theirs in zip(ours.model.layers, hf.model.layers):
            deq = mine.mlp.experts.dequantized(torch.float32)
            theirs.mlp.experts.gate_up_proj.copy_(deq["gate_up_proj"])
            theirs.mlp.experts.down_proj.copy_(deq["down_proj"])
            for p in PROJS:
                getattr(theirs.self_attn, p).weight.copy_(getattr(mine.self_attn, p).dequantize(torch.float32))
        hf.lm_head.weight.copy_(ours.lm_head.dequantize(torch.float32))
        ref = hf(IDS).logits
    assert (logits(ours) - ref).abs().max().item() < 1e-4
    # int8 really is in use: the MXFP4-only load (float attention) differs
    assert (logits(load_model(folder, dtype="fp32")) - ref).abs().max().item() > 1e-4


def test_mxfp4_int8_from_a_float_folder_equals_int8_on_the_mxfp4_folder(folders):
    float_folder, folder, _ = folders
    a = logits(load_model(float_folder, dtype="fp32", quant="mxfp4+int8"))
    assert torch.equal(a, logits(load_model(folder, dtype="fp32", quant="int8")))
    assert torch.equal(a, logits(load_model(folder, dtype="fp32", quant="mxfp4+int8")))


def test_quantize_to_mxfp4_int8_reloads_as_stored(folders, tmp_path):
    from ember.loading.quantized import quantize_checkpoint

    float_folder, folder, _ = folders
    out, info = quantize_checkpoint(float_folder, tmp_path / "q", "mxfp4+int8")
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "mxfp4" and raw["quantization"]["method"] == "int8"
    assert "model.layers.0.mlp.router" in raw["quantization"]["not_quantized"]
    assert info["section"]["method"] == "mxfp4+int8" and info["bytes_after"] < info["bytes_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # atomic: no temp folder left beside it
    reloaded = load_model(out, dtype="fp32")
    assert type(reloaded.model.layers[1].self_attn.o_proj) is Int8Linear
    want = logits(load_model(float_folder, dtype="fp32", quant="mxfp4+int8"))
    assert torch.equal(logits(reloaded), want)
    # from the published MXFP4 folder: its experts copied as stored, the rest int8: the same tensors
    out2, _ = quantize_checkpoint(folder, tmp_path / "q2", "int8")
    assert torch.equal(logits(load_model(out2, dtype="fp32")), want)
    with pytest.raises(QuantizationError, match="already MXFP4"):
        quantize_checkpoint(folder, tmp_path / "q3", "mxfp4")


def test_cli_quantize_to_mxfp4_int8(folders, tmp_path, capsys):
    from ember.cli import main

    float_folder, _, _ = folders
    assert main(["quantize", str(float_folder), "--to", "mxfp4+int8", "-o", str(tmp_path / "o")]) == 0
    assert "mxfp4+int8" in capsys.readouterr().err
    assert (tmp_path / "o" / "tokenizer.json").is_file()


@pytest.mark.parametrize("quant", ["int8", "mxfp4+int8"])
def test_cli_generate_with_int8_beside_the_stored_experts(folders, quant, capsys):
    """End to end (preflight, load, runtime, sampling): `ember generate MXFP4_FOLDER --quant int8` runs, where it
    was refused before, and greedy tokens equal those of the same load through the Python API."""
    import ember
    from ember.cli import main

    _, folder, _ = folders
    assert main(["generate", str(folder), "w3 w4 w5", "-n", "4", "--quant", quant, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.strip()
    llm = ember.load(folder, quant="mxfp4+int8")
    want = llm.generate("w3 w4 w5", max_new_tokens=4, temperature=0).text.strip()
    assert want and want in printed


def test_mxfp4_int8_is_gpt_oss_only(hf_checkpoint, capsys):
    from ember.cli import main

    folder, _ = hf_checkpoint("llama")
    with pytest.raises(QuantizationError, match="gpt-oss.*llama"):
        load_model(folder, dtype="fp32", quant="mxfp4+int8")
    assert main(["plan", "llama-3.1-8b", "--on", "dgx-spark", "--quant", "mxfp4+int8"]) != 0
    assert "gpt-oss's layout" in capsys.readouterr().err


def test_nf4_beside_the_stored_experts(folders):
    from ember.quant.nf4 import NF4Linear

    _, folder, _ = folders
    ours = load_model(folder, dtype="fp32", quant="nf4", lm_head="none")
    layer = ours.model.layers[2]
    assert type(layer.self_attn.v_proj) is NF4Linear and isinstance(layer.mlp.experts, Mxfp4Experts)
    assert not isinstance(ours.lm_head, QuantizedLinear)
    ref = logits(load_model(folder, dtype="fp32"))
    assert torch.nn.functional.cosine_similarity(logits(ours).flatten(), ref.flatten(), dim=0) > 0.9


def test_fused_decode_blocks_take_the_int8_attention(folders, monkeypatch):
    """The runtime's gpt-oss blocks (sink attention on the int8 kernels, MXFP4 MoE) are built for the int8 load, and
    a decode through them gives the logits of one whole-sequence forward."""
    from ember import kernels
    from ember.cache import StaticKVCache
    from ember.runtime.blocks import layer_blocks

    if kernels.load() is None:
        pytest.skip("no native kernels in this build")
    _, folder, _ = folders
    ours = load_model(folder, dtype="fp32", quant="int8")
    x = torch.zeros(1, 1, ours.config.hidden_size)
    blocks = layer_blocks(ours.model.layers[0], x)
    assert blocks is not None and blocks[0] is not None and blocks[0].kind == "sink_attn"
    ids = IDS[:1]
    ref = logits(ours, ids)
    ran = []  # the fused steps or blocks that took a decode step
    for name in ("run_decode_layers", "run_attn_block"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _n=name, **k: ran.append((_n, r := _real(*a, **k))) or r)
    with torch.no_grad():
        cache = StaticKVCache(ours.config, 1, ids.shape[1], torch.float32, "cpu")
        ours(ids[:, :4], cache=cache, start=0)
        cache.advance(4)
        for t in range(4, ids.shape[1]):
            step = ours(ids[:, t:t + 1], cache=cache, start=cache.pos, session=cache)
            cache.advance(1)
            assert (step - ref[:, t:t + 1]).abs().max().item() < 1e-4, f"decode at position {t}"
    assert any(r for _, r in ran), f"no fused block ran: {ran}"


def test_planner_prices_mxfp4_int8_as_the_loaded_model_holds_it(folders):
    from ember import planner

    _, folder, _ = folders
    ours = load_model(folder, dtype="bf16", quant="int8")
    sd = ours.state_dict()

    def held(pred) -> int:
        return sum(t.numel() * t.element_size() for k, t in sd.items() if pred(k))

    wb = planner.weight_bytes(ours.config, "bf16", "mxfp4+int8", "int8")
    assert wb.experts == held(lambda k: k.endswith(("_blocks", "_scales")))
    assert wb.attention == held(lambda k: ".self_attn." in k and k.endswith(("proj.weight", "proj.scales")))
    assert wb.lm_head == held(lambda k: k.startswith("lm_head.")) and wb.head_quant == "int8"
    # fewer bytes per token than the MXFP4-only option (bf16 attention and head)
    assert wb.read_per_step(1, 128) < planner.weight_bytes(ours.config, "bf16", "mxfp4", "int8").read_per_step(1, 128)
    with pytest.raises(ValueError, match="gpt-oss"):
        planner.weight_bytes(planner.resolve_model("llama-3.1-8b").config, "bf16", "mxfp4+int8")


@pytest.mark.parametrize("model,published", [("gpt-oss-120b", 59.0), ("gpt-oss-20b", 82.7)])
def test_plan_shows_and_ranks_mxfp4_int8_near_the_published_spark_figures(model, published, capsys):
    """The option is in `ember plan`'s table, ranked after the published MXFP4 weights, and its decode prediction on
    one DGX Spark is within 25% of the published llama.cpp figure (MXFP4 experts, Q8_0 elsewhere)."""
    from ember import hardware, planner
    from ember.cli import main

    assert main(["plan", model, "--on", "dgx-spark"]) == 0
    assert "| mxfp4+int8 (bf16)" in capsys.readouterr().out
    cfg = planner.resolve_model(model).config
    spark = hardware.profile("dgx-spark")
    plans = {p.workload.quant: p for p in planner.options(cfg, spark, planner.Workload(context=8192))}
    assert planner.quant_quality(cfg, "mxfp4") < plans["mxfp4+int8"].quality < planner.quant_quality(cfg, "int8")
    assert abs(plans["mxfp4+int8"].decode_tok_s_start / published - 1) <= 0.25
    assert plans["mxfp4+int8"].decode_tok_s_start > plans["mxfp4"].decode_tok_s_start
    llama = planner.resolve_model("llama-3.1-8b").config
    assert "mxfp4+int8" not in {p.workload.quant for p in planner.options(llama, spark, planner.Workload())}


def test_preflight_prices_what_the_load_will_hold(folders, tmp_path):
    from ember.loading.quantized import quantize_checkpoint
    from ember.planner.preflight import preflight

    float_folder, folder, _ = folders
    assert preflight(folder, "cpu", "bf16", context=64).workload.quant == "mxfp4"
    assert preflight(folder, "cpu", "bf16", quant="int8", context=64).workload.quant == "mxfp4+int8"
    assert preflight(float_folder, "cpu", "bf16", quant="mxfp4+int8", context=64).workload.quant == "mxfp4+int8"
    out, _ = quantize_checkpoint(float_folder, tmp_path / "q", "mxfp4+int8")
    plan = preflight(out, "cpu", "bf16", context=64)
    assert plan.workload.quant == "mxfp4+int8" and plan.workload.head_quant == "int8"
