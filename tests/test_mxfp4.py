"""MXFP4 (OCP Microscaling FP4): the codec against the spec's definition in float64, the CPU kernel and the tiled
fallback against the dequantized weight, gpt-oss MXFP4 checkpoints (written by ``ember quantize --to mxfp4``,
the layout the hub publishes) against HF on a dequantized copy, memory as stored, and located errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ember.errors import CheckpointError
from ember.loading import load_model
from ember.quant.mxfp4 import (Mxfp4Experts, Mxfp4Linear, dequantize_mxfp4, mxfp4_matmul, quantize_mxfp4)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX v1.0, table of FP4 E2M1 magnitudes


def spec_value(code: int) -> float:
    """E2M1 by its bit fields (s e1 e0 m, exponent bias 1; exponent 0 is subnormal), in float64."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = (m / 2) * 2.0 ** (1 - 1) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def reference_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element in float64: value = E2M1(code) * 2^(scale - 127), element 2j in the low nibble."""
    rows, G, _ = blocks.shape
    out = torch.empty(rows, G * 32, dtype=torch.float64)
    for r in range(rows):
        for g in range(G):
            x = 2.0 ** (int(scales[r, g]) - 127)
            for j in range(16):
                b = int(blocks[r, g, j])
                out[r, g * 32 + 2 * j] = spec_value(b & 15) * x
                out[r, g * 32 + 2 * j + 1] = spec_value(b >> 4) * x
    return out


def test_e2m1_bit_fields_are_the_spec_table():
    assert [spec_value(c) for c in range(8)] == E2M1
    assert [spec_value(c) for c in range(8, 16)] == [-v for v in E2M1]


def test_dequantize_equals_the_float64_spec_definition():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (5, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (5, 3), dtype=torch.uint8, generator=g)
    scales[0, 0], scales[1, 1] = 0, 252  # 2^-127 (subnormal in fp32) and 2^125 (x6 is still a finite fp32)
    got = dequantize_mxfp4(blocks, scales, torch.float32).double()
    assert torch.equal(got, reference_dequantize(blocks, scales))


def test_quantize_follows_the_spec_rounding():
    # block max 6 -> shared exponent floor(log2 6) - 2 = 0; values round to the nearest E2M1, ties to the even code
    vals = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.3, -2.9, 7.5] + [0.0] * 21)
    blocks, scales = quantize_mxfp4(vals[None])
    assert scales.tolist() == [[127 + 1]] or scales.tolist() == [[127]]
    deq = dequantize_mxfp4(blocks, scales)[0]
    x = 2.0 ** (int(scales[0, 0]) - 127)
    assert x == 2.0 ** (math.floor(math.log2(7.5)) - 2)  # the block max is 7.5: exponent 0
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, -3.0, 6.0]  # 7.5 saturates at 6
    assert deq[:11].tolist() == want
    # a random weight: within half the largest E2M1 gap (2 scale units) of its value, except values past 6 units
    # (the block max is 4..8 units by the exponent rule), which saturate at 6
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 3
    b, s = quantize_mxfp4(w)
    unit = 2.0 ** (s.float() - 127)[..., None]
    err = (dequantize_mxfp4(b, s) - w).abs().view(8, 2, 32)
    inside = w.view(8, 2, 32).abs() <= 6 * unit
    assert (err[inside] <= unit.expand_as(err)[inside] + 1e-6).all()
    assert (err <= 2 * unit + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_and_tiled_fallback_match_the_dequantized_weight(rows, dtype):
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g))
    q = Mxfp4Linear.from_linear(lin, dtype=dtype)
    x = torch.randn(rows, 128, generator=g).to(dtype)
    w = q.dequantize(torch.float64)
    ref = x.double() @ w.t() + lin.bias.detach().double()
    tol = 1e-4 if dtype == torch.float32 else 0.15 * ref.abs().max().item() / 8
    got = q(x).double()
    assert (got - ref).abs().max().item() < max(tol, 1e-4)
    # the tiled dequantize-and-multiply path (what CUDA and kernel-less CPUs run) gives the same
    import ember.quant.mxfp4 as mx
    tiled = torch.empty(rows, 96, dtype=dtype)
    for a in range(0, 96, 32):
        tiled[:, a:a + 32] = torch.nn.functional.linear(x, mx.dequantize_mxfp4(q.weight_blocks[a:a + 32],
                                                                              q.weight_scales[a:a + 32], dtype))
    assert (tiled.double() + lin.bias.detach().double() - ref).abs().max().item() < max(tol, 1e-4)


# ---------------------------------------------------------------- gpt-oss checkpoints
@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory):
    """(float folder, mxfp4 folder written by `ember quantize --to mxfp4`, HF model of the float folder)."""
    from conftest import save_word_tokenizer
    from test_gpt_oss import make_hf_gpt_oss
    from ember.loading.quantized import quantize_checkpoint

    hf = make_hf_gpt_oss(seed=3)
    root = Path(tmp_path_factory.mktemp("mxfp4"))
    hf.save_pretrained(root / "float")
    save_word_tokenizer(root / "float")
    quantize_checkpoint(root / "float", root / "mxfp4", "mxfp4")
    return root / "float", root / "mxfp4", hf


def test_quantize_writes_the_published_layout(mxfp4_gpt_oss):
    from safetensors import safe_open

    _, folder, hf = mxfp4_gpt_oss
    raw = json.loads((folder / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "mxfp4" and "quantization" not in raw
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        blocks = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
        scales = f.get_tensor("model.layers.0.mlp.experts.down_proj_scales")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    assert {"model.layers.0.self_attn.sinks", "model.layers.0.mlp.router.weight"} <= names
    E, H, inter = 4, 64, 32
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (E, 2 * inter, H // 32, 16)
    assert scales.dtype == torch.uint8 and tuple(scales.shape) == (E, H, inter // 32)
    # HF's own dequantization of these tensors (integrations/mxfp4.py) equals ours
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_deq = convert_moe_packed_tensors(blocks, f_scales := safe_open(str(folder / "model.safetensors"), "pt")
                                        .get_tensor("model.layers.0.mlp.experts.gate_up_proj_scales"),
                                        dtype=torch.float32)
    ours = dequantize_mxfp4(blocks, f_scales).transpose(1, 2)
    assert torch.equal(hf_deq, ours)


def test_loads_as_stored_and_matches_hf_on_a_dequantized_copy(mxfp4_gpt_oss, tmp_path):
    import transformers

    float_folder, folder, _ = mxfp4_gpt_oss
    ours = load_model(folder, dtype="fp32")
    experts = ours.model.layers[0].mlp.experts
    assert isinstance(experts, Mxfp4Experts) and experts.gate_up_proj_blocks.dtype == torch.uint8
    # weights held <= 1.1x the checkpoint's bytes (fp32 here: the float parts are stored fp32 too)
    held = sum(t.numel() * t.element_size() for t in ours.state_dict().values())
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert held <= 1.1 * stored
    # HF on a float copy whose experts are our dequantized MXFP4 ones
    hf = transformers.AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(ours.model.layers):
            deq = layer.mlp.experts.dequantized(torch.float32)
            hf.model.layers[i].mlp.experts.gate_up_proj.copy_(deq["gate_up_proj"])
            hf.model.layers[i].mlp.experts.down_proj.copy_(deq["down_proj"])
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() < 1e-4
    # the MXFP4 model really differs from the float one (the test would notice a float fallback)
    float_model = load_model(float_folder, dtype="fp32")
    with torch.no_grad():
        assert (float_model(ids) - got).abs().max().item() > 1e-3


def test_auto_dtype_is_bf16_where_the_block_kernels_are_built(mxfp4_gpt_oss, monkeypatch):
    """On a CPU without native bf16 GEMMs ``auto`` means fp32, except for MXFP4 experts, whose kernels take bf16
    activations on byte products (as GGUF quantized files)."""
    import ember.loading.dtypes as dtypes
    from ember import kernels

    float_folder, folder, _ = mxfp4_gpt_oss
    monkeypatch.setattr(dtypes, "device_supports_bf16", lambda device: False)
    want = torch.bfloat16 if kernels.load() is not None else torch.float32
    assert load_model(folder).model.embed_tokens.weight.dtype == want
    assert load_model(folder, dtype="fp32").model.embed_tokens.weight.dtype == torch.float32  # asked for: given
    assert load_model(float_folder).model.embed_tokens.weight.dtype == torch.float32


def test_quant_mxfp4_on_load_equals_the_written_checkpoint(mxfp4_gpt_oss):
    float_folder, folder, _ = mxfp4_gpt_oss
    a = load_model(float_folder, dtype="fp32", quant="mxfp4")
    b = load_model(folder, dtype="fp32")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_quant_mxfp4_for_a_dense_family(hf_checkpoint):
    folder, hf = hf_checkpoint("llama")
    ours = load_model(folder, dtype="fp32", quant="mxfp4", lm_head="none")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Mxfp4Linear)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    # 4-bit weights: close to, not equal to, the float model
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.9


def _rewrite(src: Path, dest: Path, edit) -> Path:
    import shutil
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_malformed_mxfp4_tensors_give_located_errors(mxfp4_gpt_oss, tmp_path):
    _, folder, _ = mxfp4_gpt_oss
    key = "model.layers.1.mlp.experts.down_proj_scales"
    missing = _rewrite(folder, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_model(missing)
    assert key in str(e.value) and "\n" not in str(e.value)
    bkey = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    wrong = _rewrite(folder, tmp_path / "wrong", lambda t: t.__setitem__(bkey, t[bkey].reshape(4, 64, 1, 32)))
    with pytest.raises(CheckpointError) as e:
        load_model(wrong)
    msg = str(e.value)
    assert bkey in msg and "model.safetensors" in msg and "[4, 64, 2, 16]" in msg and "\n" not in msg


# ---------------------------------------------------------------- the MXFP4 CPU kernel (ember/kernels/mxfp4.cpp)
from test_kernels import bf16_out_tol, build, worst  # noqa: E402,F401  (build: the native/portable fixture)


def q8_per_block(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel's int8 path rounds it: int8 per block of 32, scale max|x| / 127, nearest even (fp32)."""
    xs = x.float().view(x.shape[0], -1, 32)
    a = xs.abs().amax(-1, keepdim=True)
    q = torch.where(a > 0, torch.round(xs * torch.where(a > 0, 127 / a, 0)), 0)
    return (q.double() * (a.double() / 127)).view(x.shape)


def random_mxfp4(O: int, I: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (O, I // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 130, (O, I // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("M,O,I", [(1, 67, 2880), (2, 9, 96), (3, 33, 64), (8, 5, 32)])
def test_kernel_fp32_activations_exact_against_the_dequantized_weight(build, M, O, I):
    from ember import kernels

    blocks, scales = random_mxfp4(O, I, 3)
    x = torch.randn(M, I)
    y = kernels.mxfp4(x, blocks, scales)
    assert y is not None and y.dtype == torch.float32 and y.shape == (M, O)
    ref = x.double() @ reference_dequantize(blocks, scales).T
    worst(y, ref, 1e-5 * float(ref.abs().max()), f"mxfp4 fp32 {build} {M}x{O}x{I}")


@pytest.mark.parametrize("M,O,I", [(1, 67, 2880), (2, 9, 96), (3, 33, 64), (1, 7, 32), (4, 12, 512), (5, 6, 544)])
def test_kernel_bf16_activations(build, M, O, I, monkeypatch):
    """bf16 activations: the int8 path (exact against int8-per-32 activations) where the build has it; else, or
    with int8 activations off, the fp32 path (exact against the bf16 activations)."""
    from ember import kernels

    blocks, scales = random_mxfp4(O, I, 4)
    x = torch.randn(M, I).bfloat16()
    x[0, :32] = 0  # an all-zero block has activation scale 0
    w = reference_dequantize(blocks, scales)
    exact = x.double() @ w.T
    y = kernels.mxfp4(x, blocks, scales)
    assert y is not None and y.dtype == torch.bfloat16
    if kernels.library().ember_mxfp4_int8_path() and kernels.INT8_ACTIVATIONS:
        ref = q8_per_block(x) @ w.T
        worst(y, ref, bf16_out_tol(ref), f"mxfp4 q8-activations {build} {M}x{O}x{I}")
        worst(y, exact, 0.03 * float(exact.abs().max()), f"mxfp4 q8-activations vs exact {M}x{O}x{I}")
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", False)
    worst(kernels.mxfp4(x, blocks, scales), exact, bf16_out_tol(exact), f"mxfp4 bf16 fp32-path {build} {M}x{O}x{I}")


def as_gguf_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same weight as llama.cpp's MXFP4 blocks (O, G * 17): the E8M0 byte, then 16 bytes whose low nibble is
    element j and high nibble element j + 16."""
    O, G, _ = blocks.shape
    codes = torch.stack((blocks & 15, blocks >> 4), -1).view(O, G, 32)  # natural element order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales[..., None], packed), -1).reshape(O, G * 17).contiguous()


@pytest.mark.parametrize("M,O,I", [(1, 67, 2880), (3, 13, 544), (8, 8, 256), (2, 5, 96)])
def test_int8_path_is_the_gguf_mxfp4_kernel(M, O, I):
    """The hub layout's int8 path and GGUF's MXFP4 blocks run one kernel: the same weight in either layout gives
    the same bits (full 8-block groups, the blocks past them, 4-row passes and the last rows), scale codes at the
    E8M0 extremes included (0 and 1: subnormal halves in fp32)."""
    from ember import kernels

    lib = kernels.load()
    if lib is None or not lib.ember_mxfp4_int8_path() or not lib.ember_gguf_supports(39):
        pytest.skip("no int8-activation MXFP4 path in this build")
    blocks, scales = random_mxfp4(O, I, 6)
    scales[0, :4] = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)[: scales.shape[1]]
    scales[-1, -1] = 160
    x = torch.randn(M, I).bfloat16()
    x[-1, -32:] = 0
    hub = torch.empty(M, O, dtype=torch.bfloat16)
    assert lib.ember_mxfp4(blocks.data_ptr(), scales.data_ptr(), x.data_ptr(), 1, hub.data_ptr(), 1, M, O, I, 1, 2) == 2
    raw = as_gguf_blocks(blocks, scales)
    gg = torch.empty(M, O, dtype=torch.bfloat16)
    assert lib.ember_gguf_linear(raw.data_ptr(), raw.shape[1], 39, x.data_ptr(), 1, gg.data_ptr(), M, O, I, 1, 2)
    assert torch.equal(hub.view(torch.int16), gg.view(torch.int16))
    ref = q8_per_block(x) @ reference_dequantize(blocks, scales).T
    worst(hub, ref, bf16_out_tol(ref), f"mxfp4 int8 path {M}x{O}x{I}")


def test_linear_routes_few_rows_to_the_kernel_and_many_to_tiles(monkeypatch):
    from ember import kernels

    blocks, scales = random_mxfp4(40, 64, 5)
    q = Mxfp4Linear(blocks, scales, None, torch.float32)
    calls = []
    real = kernels.mxfp4
    monkeypatch.setattr(kernels, "mxfp4", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = reference_dequantize(blocks, scales)
    for rows in (1, kernels.MAX_ROWS["mxfp4"], kernels.MAX_ROWS["mxfp4"] + 3):
        x = torch.randn(rows, 64)
        worst(q(x), x.double() @ w.T, 1e-5 * float((x.double() @ w.T).abs().max()), f"Mxfp4Linear {rows} rows")
    assert calls == [1, kernels.MAX_ROWS["mxfp4"], kernels.MAX_ROWS["mxfp4"] + 3]  # the last one declined (None)


def test_bf16_prefill_rows_take_the_int8_path_where_bf16_gemms_are_emulated(monkeypatch):
    """Past MAX_ROWS, bf16 rows stay on the int8 path (in chunks) on a CPU without native bf16 GEMMs, each row as
    it would be alone; with native bf16 GEMMs they are declined (tiles + GEMM)."""
    from ember import kernels

    lib = kernels.load()
    if lib is None or not lib.ember_mxfp4_int8_path():
        pytest.skip("no int8-activation MXFP4 path in this build")
    blocks, scales = random_mxfp4(12, 64, 7)
    x = torch.randn(kernels.matmul.MXFP4_Q8_CHUNK + 5, 64).bfloat16()
    monkeypatch.setattr(kernels.matmul, "native_bf16_gemm", lambda: False)
    y = kernels.mxfp4(x, blocks, scales)
    assert y is not None and y.shape == (x.shape[0], 12)
    for r in (0, 1, kernels.matmul.MXFP4_Q8_CHUNK - 1, kernels.matmul.MXFP4_Q8_CHUNK, x.shape[0] - 1):
        assert torch.equal(y[r], kernels.mxfp4(x[r:r + 1], blocks, scales)[0]), f"row {r}"
    monkeypatch.setattr(kernels.matmul, "native_bf16_gemm", lambda: True)
    assert kernels.mxfp4(x, blocks, scales) is None


# ---------------------------------------------------------------- the planner's MXFP4 option
def test_planner_prices_mxfp4_as_the_loaded_model_holds_it(mxfp4_gpt_oss, hf_checkpoint):
    from ember import planner
    from ember.planner.memory import linear_bytes

    assert linear_bytes(96, 128, "mxfp4", 2) == 96 * 128 * 4.25 / 8  # 4 bits + one E8M0 byte per 32
    _, folder, _ = mxfp4_gpt_oss
    ours = load_model(folder, dtype="bf16")
    sd = ours.state_dict()

    def held(pred) -> int:
        return sum(t.numel() * t.element_size() for k, t in sd.items() if pred(k))

    wb = planner.weight_bytes(ours.config, "bf16", "mxfp4", "int8")
    # gpt-oss as published: the experts' blocks and scales, everything else (head included) bf16
    assert wb.experts == held(lambda k: k.endswith(("_blocks", "_scales")))
    assert wb.attention == held(lambda k: ".self_attn." in k and k.endswith("proj.weight"))
    assert wb.lm_head == held(lambda k: k == "lm_head.weight") and wb.head_quant == "none"
    # another family: every Linear is MXFP4 (what --quant mxfp4 loads)
    dense_folder, _ = hf_checkpoint("llama")
    dense = load_model(dense_folder, dtype="bf16", quant="mxfp4")
    dwb = planner.weight_bytes(dense.config, "bf16", "mxfp4", "none")
    assert dwb.attention + dwb.mlp == sum(t.numel() for k, t in dense.state_dict().items()
                                          if k.endswith(("weight_blocks", "weight_scales")) and "lm_head" not in k)


def test_plan_cli_mxfp4_option_and_recommendation(capsys):
    from ember import hardware, planner
    from ember.cli import main
    from ember.plan_cli import resolve_model

    assert main(["plan", "gpt-oss-120b", "--on", "dgx-spark", "--quant", "mxfp4"]) == 0
    out = capsys.readouterr().out
    assert "mxfp4 (bf16)" in out and "recommended: mxfp4" in out
    spark = hardware.profile("dgx-spark")
    plans = planner.options(resolve_model("gpt-oss-120b").config, spark, planner.Workload(context=8192))
    assert planner.recommend(plans).workload.quant == "mxfp4"  # bf16 does not fit one Spark
    # the published weights rank above re-rounding them to int4; on other families int4 ranks above mxfp4
    cfg = resolve_model("gpt-oss-120b").config
    assert planner.quant_quality(cfg, "mxfp4") < planner.quant_quality(cfg, "int4")
    assert planner.quant_quality(resolve_model("llama-3.1-70b").config, "mxfp4") > \
        planner.quant_quality(cfg, "int4")
