"""Weight-only quantization: kernels vs their own dequantized weights, error bounds, NF4 vs bitsandbytes'
algorithm, layouts, quantize -> save -> load, load_model(quant=...), generation, and clear errors.

Tolerances (why they are what they are):

* kernel vs its own dequantized weight, fp32 activations: the fallback is dequantize + fp32 matmul,
  so only summation order differs: 1e-5 relative to max |y|.
* kernel vs its own dequantized weight, bf16 activations (CPU int8/int4 kernels): fp32 accumulation,
  one bf16 rounding of the output: 2**-7 relative to max |y|.
* quantization error per weight: int8 <= scale/2; int4 <= scale/2 (fp32 scales); NF4 <= absmax x half
  the widest gap of the code book (0.1385); with double quantization the absmax itself is within
  half a step of the 8-bit dynamic map (<= 0.0071 x the 256-block's max deviation).
* tiny random models, whole-model logits vs HF fp32 (max |diff| / max |logit|): int8 3%, int4/nf4 30%
  (in_features 64-128 leaves few values per group; real models are far closer, see bench/quant.py).
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ember
from ember import kernels
from ember.errors import CheckpointError, OutputExistsError, QuantizationError
from ember.loading import load_model
from ember.models import Linear
from ember.loading.quantized import quantize_checkpoint
from ember.quant import Int4Linear, Int8Linear, NF4Linear, QuantizedLinear, quantize_model
from ember.quant import int4 as q4
from ember.quant import nf4 as qnf4
from ember.quant.cli import add_parser


def worst(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Assert max |got - ref| <= tol, printing the worst element (llm.c habit)."""
    d = (got.float() - ref.float()).abs()
    i = int(d.argmax())
    assert d.max() <= tol, (f"{what}: worst |diff| {d.max():.3g} at flat index {i} "
                            f"(got {got.flatten()[i]:.6g}, ref {ref.flatten()[i]:.6g}), tolerance {tol:.3g}")


def rand_linear(out_f: int, in_f: int, bias: bool = True, dtype=torch.float32, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[:, :3] *= 8  # a few outlier columns, as real LLM weights have
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def build(mode: str, lin: nn.Linear, **kw) -> QuantizedLinear:
    if mode == "int8":
        return Int8Linear.from_linear(lin, **kw)
    if mode.startswith("int4"):
        return Int4Linear.from_linear(lin, int(mode[5:] or 128), **kw)
    return NF4Linear.from_linear(lin, **kw)


MODES = ["int8", "int4-32", "int4-64", "int4-128", "nf4"]


# ============================================================================ kernels vs own dequant
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode, small batch, past the CPU kernels' row limit
def test_kernel_equals_own_dequantized_weight_fp32(mode, rows):
    m = build(mode, rand_linear(96, 256))
    x = torch.randn(2, rows, 256)
    ref = nn.functional.linear(x, m.dequantize(), m.bias)
    worst(m(x), ref, 1e-5 * ref.abs().max(), f"{mode} fp32 rows={rows}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("int8_activations", [False, True])
def test_kernel_equals_own_dequantized_weight_bf16(mode, rows, int8_activations, monkeypatch):
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", int8_activations)
    m = build(mode, rand_linear(96, 256, dtype=torch.bfloat16))
    if mode.startswith("int4"):  # the fused CPU kernel is what is under test
        native = "blocks" if mode == "int4-32" else "native"  # group 32, bf16: Q4_G32 blocks (test_quant_int4_blocks.py)
        assert m.layout == (native if kernels.load() else "cpu" if q4.cpu_kernel_block() else "plain")
    x = torch.randn(rows, 256).to(torch.bfloat16)
    ref = nn.functional.linear(x.float(), m.dequantize(), m.bias.float())
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    # int8 activations (VNNI builds, int8/int4, few rows) round x to 8 bits per 128 values: ~0.5% of an output
    worst(y, ref, (0.03 if int8_activations else 2**-7) * ref.abs().max(), f"{mode} bf16 rows={rows}")


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int4_aten_cpu_kernel_equals_own_dequantized_weight(rows):
    """The tinygemm CPU layout (used where Ember's native kernels cannot be built)."""
    if not q4.cpu_kernel_block():
        pytest.skip(f"no int4 CPU kernel layout on this ISA ({torch.backends.cpu.get_cpu_capability()})")
    m = Int4Linear.from_linear(rand_linear(96, 256, dtype=torch.bfloat16), 64, layout="cpu")
    assert m.layout == "cpu"
    x = torch.randn(rows, 256).to(torch.bfloat16)
    ref = nn.functional.linear(x.float(), m.dequantize(), m.bias.float())
    worst(m(x), ref, 2**-7 * ref.abs().max(), f"int4 aten-cpu bf16 rows={rows}")
    again = Int4Linear.from_canonical({k: v for k, v in m.state_dict().items() if k != "bias"}, 256, 96, m.bias,
                                      torch.bfloat16, group_size=64)
    assert torch.equal(again.dequantize(), m.dequantize())  # the layouts hold the same weight


def test_int8_error_bound_and_format():
    lin = rand_linear(64, 192)
    m = Int8Linear.from_linear(lin)
    assert m.weight.dtype == torch.int8 and m.weight.abs().max() <= 127 and m.scales.shape == (64,)
    err = (m.dequantize() - lin.weight).abs()
    worst(err, torch.zeros_like(err), float(m.scales.max()) / 2 * (1 + 1e-5), "int8 |w - w_hat|")
    assert (err <= m.scales[:, None] / 2 * (1 + 1e-5) + 1e-8).all()


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_error_bound_and_format(g):
    lin = rand_linear(48, 256)
    m = Int4Linear.from_linear(lin, g)
    st = m.state_dict()
    assert st["weight"].dtype == torch.uint8 and st["weight"].shape == (48, 128)
    assert st["scales"].shape == st["zeros"].shape == (48, 256 // g)
    scale = st["scales"].repeat_interleave(g, dim=1)
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-7).all(), f"worst {err.max():.3g} vs scale/2 {scale.max() / 2:.3g}"
    # asymmetric: every group's min and max are reproduced within half a step
    w = lin.weight.view(48, -1, g)
    lo = (st["zeros"] - 8 * st["scales"])
    assert torch.allclose(lo, w.amin(-1), atol=1e-6)


def test_int4_codes_and_nibble_order_are_the_documented_ones():
    lin = rand_linear(16, 64, bias=False)
    m = Int4Linear.from_linear(lin, 32)
    st = m.state_dict()
    s, z = st["scales"].repeat_interleave(32, 1), st["zeros"].repeat_interleave(32, 1)
    q = ((lin.weight - z) / s + 8).round().clamp(0, 15).to(torch.uint8)
    assert torch.equal(st["weight"], (q[:, 0::2] << 4) | q[:, 1::2])  # element 2j in the high nibble


def test_int4_cpu_layout_matches_aten_packer_and_unpacks():
    block = q4.cpu_kernel_block()
    if block is None:
        pytest.skip(f"no int4 CPU kernel layout on this ISA ({torch.backends.cpu.get_cpu_capability()})")
    codes = torch.randint(0, 16, (block * 2 + 16, 96), dtype=torch.int32)  # full blocks + a tail
    packed = q4.pack_cpu(codes.to(torch.uint8), block)
    assert torch.equal(packed.view(-1), torch._convert_weight_to_int4pack_for_cpu(codes, 1).view(-1))
    for a, b in [(0, codes.shape[0]), (5, 150), (block * 2, block * 2 + 16), (3, 4)]:
        assert torch.equal(q4.unpack_cpu(packed, codes.shape[0], 96, block, a, b), codes[a:b].to(torch.uint8))


def test_int4_cuda_layout_pack_unpack_roundtrip():
    canon = torch.randint(0, 256, (24, 256), dtype=torch.int32).to(torch.uint8)
    for ikt in (2, 4, 8):
        packed = q4.pack_cuda(canon, ikt)
        assert packed.dtype == torch.int32 and packed.shape == (3, 512 // (ikt * 16), 32, ikt // 2)
        assert torch.equal(q4.unpack_cuda(packed, 24, 512), canon)


@pytest.mark.gpu
def test_int4_cuda_kernel_and_layout():
    ok, unpack_ok = q4.cuda_kernel_ok(torch.cuda.current_device())
    if not ok:
        pytest.skip("tinygemm needs sm80+")
    assert unpack_ok, "torch._convert_weight_to_int4pack layout differs from ember.quant.int4.pack_cuda"
    m = build("int4-64", rand_linear(128, 512, dtype=torch.bfloat16)).cuda()
    assert m.layout == "cuda"
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), m.dequantize(), m.bias.float())
    worst(m(x), ref, 2**-7 * ref.abs().max(), "int4 cuda")
    assert torch.equal(m.cpu().state_dict()["weight"], m.state_dict()["weight"].cpu())


# ============================================================================ NF4 vs bitsandbytes
# The bitsandbytes algorithm, re-implemented here from its description (bitsandbytes.functional
# quantize_4bit / quantize_blockwise / create_dynamic_map and the default torch backend), not from ours.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def bnb_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) -> torch.Tensor:
    data = []
    non_sign_bits = total_bits - (1 if signed else 0)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def bnb_quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = a.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(a.flatten(), (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().max(dim=1).values
    scaled = (padded / absmax[:, None]).flatten()[:n]
    q = torch.argmin((scaled[:, None] - code[None]).abs(), dim=-1).to(torch.uint8)
    return q, absmax


def bnb_quantize_nf4(w: torch.Tensor, compress_statistics: bool):
    code = torch.tensor(BNB_NF4)
    q, absmax = bnb_quantize_blockwise(w.flatten(), code, 64)
    packed = (q[::2] << 4) | q[1::2]
    if not compress_statistics:
        return packed, absmax, None
    offset = absmax.mean()
    qabs, absmax2 = bnb_quantize_blockwise(absmax - offset, bnb_dynamic_map(), 256)
    return packed, qabs, (absmax2, offset)


def bnb_dequantize_nf4(packed, absmax, state2, shape):
    if state2 is not None:
        absmax2, offset = state2
        absmax = bnb_dynamic_map()[absmax.long()] * absmax2.repeat_interleave(256)[: absmax.numel()] + offset
    q = torch.stack((packed >> 4, packed & 15), -1).flatten().long()
    return (torch.tensor(BNB_NF4)[q] * absmax.repeat_interleave(64)[: q.numel()]).view(shape)


def test_nf4_code_books_match_bitsandbytes():
    assert torch.equal(qnf4.NF4_CODE, torch.tensor(BNB_NF4))
    assert torch.equal(qnf4.DYNAMIC_CODE, bnb_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])  # blocks within rows; blocks straddling rows + short last
def test_nf4_packing_and_statistics_match_bitsandbytes(double_quant, shape):
    lin = rand_linear(*shape, bias=False)
    w = lin.weight.detach()
    packed, absmax, state2 = bnb_quantize_nf4(w, double_quant)
    m = NF4Linear.from_linear(lin, double_quant=double_quant)
    assert torch.equal(m.weight.flatten(), packed), "codes or nibble order differ"
    assert torch.equal(m.absmax, absmax)
    if double_quant:
        assert m.absmax.dtype == torch.uint8
        assert torch.equal(m.absmax_scale, state2[0]) and torch.equal(m.absmax_offset, state2[1])
    ref = bnb_dequantize_nf4(packed, absmax, state2, w.shape)
    worst(m.dequantize(), ref, 1e-7, "NF4 dequantize vs bitsandbytes")


def test_nf4_error_bounds():
    lin = rand_linear(64, 256, bias=False)
    w = lin.weight.detach()
    plain = NF4Linear.from_linear(lin, double_quant=False)
    half_gap = float((qnf4.NF4_CODE[1:] - qnf4.NF4_CODE[:-1]).max()) / 2
    bound = plain.absmax.repeat_interleave(64).view(w.shape) * half_gap
    assert ((plain.dequantize() - w).abs() <= bound * (1 + 1e-6)).all()
    dq = NF4Linear.from_linear(lin, double_quant=True)
    am = plain.absmax
    dev = (dq.block_absmax() - am).abs()
    assert (dev <= 0.0071 * (am - am.mean()).abs().max()).all(), f"absmax error {dev.max():.3g}"


# ============================================================================ modules: state, devices
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_roundtrip_into_another_module(mode):
    a = build(mode, rand_linear(64, 128, seed=1))
    b = build(mode, rand_linear(64, 128, seed=2))
    x = torch.randn(3, 128)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_int4_to_dtype_repacks_for_the_kernel():
    m = build("int4-64", rand_linear(64, 128, dtype=torch.bfloat16))
    native = kernels.load() is not None
    expect = "native" if native else "cpu" if q4.cpu_kernel_block() else "plain"
    assert m.layout == expect
    w = m.dequantize()
    m.float()
    assert m.layout == ("native" if native else "plain") and m.scale_tensor().dtype == torch.float32
    assert torch.equal(m.dequantize(), w)  # bf16 scales are exact in fp32
    m.to(torch.bfloat16)
    assert m.layout == expect and torch.equal(m.dequantize(), w)


def test_quantize_model_skips_head_router_and_named_layers(hf_checkpoint):
    folder, _ = hf_checkpoint("mixtral")
    model = load_model(folder, dtype="fp32")
    float_bytes = model.weight_bytes_per_token()
    quantize_model(model, "nf4", skip=("o_proj",))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.mlp.gate"] == "Linear"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Linear"
    assert kinds["model.layers.1.mlp.experts.7.down_proj"] == "NF4Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "NF4Linear"
    assert model.config.extra["quantization"]["method"] == "nf4"
    assert model.weight_bytes_per_token() < 0.6 * float_bytes


# ============================================================================ loading and saving
def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("mode,bound", [("int8", 0.03), ("int4", 0.30), ("nf4", 0.30)])
def test_load_model_quantized_close_to_hf_fp32_and_exact_vs_dequantized(hf_checkpoint, family, mode, bound):
    folder, hf = hf_checkpoint(family)
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    model = load_model(folder, dtype="fp32", quant=mode, group_size=32 if mode == "int4" else None)
    got = logits(model, ids)
    with torch.no_grad():
        ref = hf(ids).logits
    worst(got, ref, bound * ref.abs().max(), f"{family} {mode} vs HF fp32")
    # exactness at model level: the same model with every quantized layer replaced by its dequantized weight
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data, lin.bias = m.dequantize(), (nn.Parameter(m.bias) if m.bias is not None else None)
            model.set_submodule(name, lin)
    dense = logits(model, ids)
    worst(got, dense, 1e-4 * dense.abs().max(), f"{family} {mode} vs its dequantized weights")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["quantize", *map(str, argv)])
    return args.func(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_quantize_save_load_gives_identical_logits(hf_checkpoint, tmp_path, mode, dtype):
    folder, _ = hf_checkpoint("qwen3", dtype=dtype)
    out = tmp_path / "q"
    extra = ["--group-size", "64"] if mode == "int4" else []
    assert run_cli(folder, "--to", mode, "-o", out, *extra) == 0
    cfg = json.loads((out / "config.json").read_text())
    sec = cfg["quantization"]
    assert sec["method"] == mode and sec["bits"] == (8 if mode == "int8" else 4)
    assert sec["not_quantized"] == [] and sec.get("group_size") == (64 if mode == "int4" else None)
    # the untied head goes to int8 by default; only a head unlike the rest needs a version 2 reader
    assert sec["lm_head"] == "int8" and sec["format_version"] == (1 if mode == "int8" else 2)
    assert cfg["head_dim"] == 32 and cfg["model_type"] == "qwen3"  # the source config, kept
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    on_load = load_model(folder, dtype=dtype, quant=mode, group_size=64 if mode == "int4" else None)
    stored = load_model(out, dtype=dtype)
    assert type(stored.model.layers[1].mlp.up_proj) is type(on_load.model.layers[1].mlp.up_proj)
    assert type(stored.lm_head) is type(on_load.lm_head) is Int8Linear
    assert torch.equal(logits(stored, ids), logits(on_load, ids))
    # asking for the same quantization again is fine; a different one is refused
    load_model(out, dtype=dtype, quant=mode, group_size=64 if mode == "int4" else None)
    other = "int8" if mode != "int8" else "nf4"
    with pytest.raises(QuantizationError, match=f"already quantized as {mode}"):
        load_model(out, quant=other)


@pytest.mark.parametrize("head,want", [("none", Linear), ("same", Int4Linear), ("nf4", NF4Linear)])
def test_lm_head_format_is_chosen_stored_and_reloaded(hf_checkpoint, tmp_path, capsys, head, want):
    folder, _ = hf_checkpoint("llama", dtype=torch.float32)
    out = tmp_path / "q"
    assert run_cli(folder, "--to", "int4", "--group-size", "32", "--lm-head", head, "-o", out) == 0
    assert ("LM head nf4" in capsys.readouterr().err) == (head == "nf4")  # the summary names a head unlike the rest
    sec = json.loads((out / "config.json").read_text())["quantization"]
    assert sec["lm_head"] == {"none": "none", "same": "int4"}.get(head, head)
    assert sec["not_quantized"] == (["lm_head"] if head == "none" else [])
    stored = load_model(out, dtype="fp32")
    on_load = load_model(folder, dtype="fp32", quant="int4", group_size=32, lm_head=head)
    assert type(stored.lm_head) is type(on_load.lm_head) is want
    if want is Int4Linear:
        assert stored.lm_head.group_size == 32
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(stored, ids), logits(on_load, ids))


def test_int8_head_stays_close_to_the_float_head(hf_checkpoint):
    folder, _ = hf_checkpoint("llama", dtype=torch.float32)
    ids = torch.randint(3, 256, (1, 11), generator=torch.Generator().manual_seed(3))
    float_head = logits(load_model(folder, dtype="fp32", quant="int4", group_size=32, lm_head=None), ids)
    int8_head = logits(load_model(folder, dtype="fp32", quant="int4", group_size=32), ids)
    assert not torch.equal(float_head, int8_head)  # the head really changed format
    # per-channel int8 rounds each weight by at most half a step of max|w| / 127
    assert (int8_head - float_head).abs().max() <= 0.02 * float_head.abs().max()


def test_sections_without_a_head_format_load_as_before_and_newer_ones_are_checked(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama", dtype=torch.float32)
    out = tmp_path / "q"
    assert run_cli(folder, "--to", "int8", "--lm-head", "none", "-o", out) == 0
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization"]["lm_head"]  # as version 1 wrote it: quantize_lm_head false, head in not_quantized
    cfg_path.write_text(json.dumps(cfg))
    assert type(load_model(out, dtype="fp32").lm_head) is Linear
    cfg["quantization"]["lm_head"] = "int3"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="lm_head 'int3'"):
        load_model(out, dtype="fp32")


def test_quantized_weights_are_read_in_row_chunks_not_mapped(hf_checkpoint, monkeypatch):
    """Quantize-on-load reads each Linear weight with positioned reads (never the mmap-backed get)."""
    from ember.loading.safetensors import Checkpoint

    folder, _ = hf_checkpoint("llama")
    real_get = Checkpoint.get

    def get(self, name):
        assert not name.endswith("proj.weight"), f"{name} was loaded whole before quantization"
        return real_get(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)
    model = load_model(folder, dtype="fp32", quant="int4", group_size=32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)


def test_greedy_generation_with_quant_matches_dequantized_model(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, device="cpu", dtype="fp32", quant="int8")
    prompt = [5, 17, 33, 9, 100, 42]
    got = llm.generate(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert len(got.token_ids) == 12
    for name, m in list(llm.model.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = Linear(m.in_features, m.out_features, bias=False)
            lin.weight.data = m.dequantize()
            llm.model.set_submodule(name, lin)
    assert llm.generate(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True).token_ids == got.token_ids


def test_bf16_int4_generation_runs_on_the_kernel_path(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, device="cpu", dtype="bf16", quant="int4", group_size=32)
    q = llm.model.model.layers[0].mlp.up_proj
    assert isinstance(q, Int4Linear) and q.layout == ("blocks" if kernels.load() else "cpu" if q4.cpu_kernel_block() else "plain")
    res = llm.generate("w5 w6 w7", max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert len(res.token_ids) == 6


# ============================================================================ errors
def test_bad_requests_are_named():
    lin = rand_linear(32, 96)
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        quantize_model(nn.Sequential(lin), "int3")
    with pytest.raises(QuantizationError, match="group size must be one of 32, 64, 128, got 48"):
        quantize_model(nn.Sequential(lin), "int4", 48)
    model = nn.Sequential(rand_linear(32, 96))
    with pytest.raises(QuantizationError, match=r"0\.weight: in_features 96 is not a multiple of the int4 group "
                                                r"size 64; use group size 32"):
        quantize_model(model, "int4", 64)
    assert isinstance(model[0], Linear)  # nothing swapped
    with pytest.raises(QuantizationError, match="--group-size applies to int4 only"):
        quantize_model(model, "int8", 64)


def test_load_model_bad_quant_names_the_layer(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    with pytest.raises(QuantizationError, match=r"q_proj\.weight: in_features 64 is not a multiple .* 128"):
        load_model(folder, quant="int4")  # default group 128 > hidden 64
    with pytest.raises(QuantizationError, match="unknown quantization"):
        load_model(folder, quant="fp8")


@pytest.fixture
def int4_folder(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    out = tmp_path / "q4"
    quantize_checkpoint(folder, out, "int4", 32)
    return out


def test_corrupt_quantized_checkpoint_missing_tensor(int4_folder):
    sd = load_file(int4_folder / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.zeros"]
    save_file(sd, int4_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.down_proj\.zeros'"):
        load_model(int4_folder)


def test_corrupt_quantized_checkpoint_wrong_dtype_or_shape(int4_folder):
    sd = load_file(int4_folder / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"].to(torch.int8)
    save_file(sd, int4_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                              r"is torch\.int8 \[32, 32\], a int4 layer .* needs uint8"):
        load_model(int4_folder)


def test_corrupt_quantization_section(int4_folder):
    cfg_path = int4_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"]["method"] = "int3"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"config\.json: quantization\.method 'int3'"):
        load_model(int4_folder)
    cfg["quantization"] = {"method": "int4", "group_size": 100}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"config\.json: int4 group size must be one of"):
        load_model(int4_folder)


def test_float_weights_under_a_quantization_section_are_refused(hf_checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(hf_checkpoint("llama")[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"] = {"method": "int8", "not_quantized": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is torch\.float32 "
                                              r"\[64, 64\], a int8 layer"):
        load_model(folder)


def test_cli_refuses_existing_output_and_quantized_input(int4_folder, hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    with pytest.raises(OutputExistsError, match="not an empty folder"):
        run_cli(folder, "--to", "int8", "-o", int4_folder)
    with pytest.raises(QuantizationError, match="already quantized"):
        run_cli(int4_folder, "--to", "int8", "-o", tmp_path / "again")
    assert not list(tmp_path.glob("again*"))  # nothing half-written
