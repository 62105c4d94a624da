"""Ember's int4 group 32 held as Q4_G32 blocks (ember/quant/int4.py ``to_blocks``) on the GGUF block kernels.

Oracle: the int4 formula ``w = (q - 8) * scale + zero`` in float64 from the canonical codes, scales and zeros
(bit-exact once rounded to fp32: ``(q - 8) * scale`` is exact, the add is the one rounding), and ``x @ W.T``
in float64 for the products (fp32 activations: fp32 rounding; bf16 activations on the int8-activation path:
the error of quantizing activations per 32 values, as tests/test_gguf_native.py bounds it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_gguf_native import BF16_REL, FP32_REL, build, check  # noqa: F401  (build: the native/portable fixture)

from ember import kernels
from ember.loading import load_model
from ember.quant import Int4Linear, QuantizedLinear
from ember.quant import int4 as q4


def rand_int4(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random canonical codes and bf16 scales/zeros of every sign and a wide range of magnitudes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // 32, generator=g) * 2.0 ** torch.randint(-12, 2, (out_f, in_f // 32), generator=g))
    zeros = torch.randn(out_f, in_f // 32, generator=g) * 0.05
    return codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16)


def reference_weight(codes, scales, zeros) -> torch.Tensor:
    """(q - 8) * scale + zero in float64, per group of 32."""
    n = codes.shape[0]
    q = q4.split_nibbles(codes).double().view(n, -1, 32)
    return ((q - 8) * scales.double()[..., None] + zeros.double()[..., None]).view(n, -1)


def test_blocks_round_trip_and_documented_byte_layout():
    codes, s, z = rand_int4(5, 96)
    blocks = q4.to_blocks(codes, s, z)
    assert blocks.shape == (5, 3 * 20) and blocks.dtype == torch.uint8
    back = q4.from_blocks(blocks)
    for a, b in zip(back, (codes, s, z)):
        assert torch.equal(a, b)
    # row 1, group 2: bf16 scale, bf16 zero, then element i in the low nibble of byte 4 + i, i + 16 in its high one
    blk, q = blocks[1, 40:60], q4.split_nibbles(codes)[1, 64:96]
    assert blk[0:2].view(torch.bfloat16).item() == s[1, 2].item()
    assert blk[2:4].view(torch.bfloat16).item() == z[1, 2].item()
    assert torch.equal(blk[4:] & 0x0F, q[:16]) and torch.equal(blk[4:] >> 4, q[16:])


def test_group_32_bf16_holds_blocks_of_the_same_bytes_and_state(build):
    codes, s, z = rand_int4(24, 256)
    m = Int4Linear(codes, s, z, 32)
    native = Int4Linear(codes, s, z, 32, layout="native")
    assert m.layout == "blocks" and native.layout == "native"
    assert m.weight_bytes() == native.weight_bytes() == 24 * 256 // 32 * 20
    state = m.state_dict()
    assert set(state) == {"weight", "scales", "zeros"}
    for k, v in native.state_dict().items():
        assert torch.equal(state[k], v), k
    assert torch.equal(m.dequantize(), reference_weight(codes, s, z).float())
    again = Int4Linear(codes, s, z, 32, layout="native")
    again.load_state_dict(state)
    assert torch.equal(again.dequantize(), m.dequantize())


def test_kernel_decode_is_bit_exact(build):
    codes, s, z = rand_int4(12, 288)  # 9 blocks a row: the register decoder's pairs and an unpacked last block
    blocks = q4.to_blocks(codes, s, z)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(12, 288, dtype=dtype)
        assert kernels.gguf_dequant(blocks, q4.Q4_G32, 288, out)
        assert torch.equal(out, reference_weight(codes, s, z).to(dtype)), dtype
    codes, s, z = rand_int4(12, 512)  # an even block count: the register decoder on every block
    out = torch.empty(12, 512)
    assert kernels.gguf_dequant(q4.to_blocks(codes, s, z), q4.Q4_G32, 512, out)
    assert torch.equal(out, reference_weight(codes, s, z).float())


@pytest.mark.parametrize("in_f", [288, 512])  # 9 blocks (8 in registers + a tail block), 16 blocks
@pytest.mark.parametrize("rows", [1, 3, 8, 40])  # decode, the kernel's row blocks, a tiled prefill
@pytest.mark.parametrize("int8_activations", [False, True])
def test_products_match_the_float64_reference(build, in_f, rows, int8_activations, monkeypatch):
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", int8_activations)
    codes, s, z = rand_int4(37, in_f, seed=rows)  # 37 outputs: the 4-row passes and 1-3 rows left
    bias = torch.randn(37).to(torch.bfloat16)
    m = Int4Linear(codes, s, z, 32, bias=bias)
    assert m.layout == "blocks"
    w = reference_weight(codes, s, z)
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 37)
    exact = not (int8_activations and build == "native")
    check(y.float() - bias.float(), x, w, BF16_REL if not exact else 2**-7, f"bf16 rows={rows}")
    yf = m(x.float())  # fp32 activations: decoded rows dotted in fp32 (or the tiled fp32 GEMM)
    check(yf - bias.float(), x.float(), w, FP32_REL * 8, f"fp32 rows={rows}")


def test_fp32_scales_and_other_group_sizes_keep_the_native_layout(build):
    codes, s, z = rand_int4(16, 256)
    assert Int4Linear(codes, s.float(), z.float(), 32).layout == "native"  # bf16 blocks cannot hold fp32 scales
    lin = nn.Linear(256, 16).to(torch.bfloat16)
    assert Int4Linear.from_linear(lin, 64).layout == "native"
    m = Int4Linear(codes, s, z, 32)
    m32 = m.to(torch.float32)  # re-packed for fp32 compute: the native kernel, the same weights
    assert m32.layout == "native" and torch.equal(m32.dequantize(), reference_weight(codes, s, z).float())
    back = m32.to(torch.bfloat16)
    assert back.layout == "blocks" and torch.equal(back.weight, q4.to_blocks(codes, s, z))


def test_without_native_kernels_the_layouts_are_the_portable_ones(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "0")
    kernels.reset()
    try:
        codes, s, z = rand_int4(16, 256)
        m = Int4Linear(codes, s, z, 32)
        assert m.layout in ("cpu", "plain")
        x = torch.randn(2, 256).to(torch.bfloat16)
        check(m(x).float(), x, reference_weight(codes, s, z), 2**-7, "no native kernels")
    finally:
        monkeypatch.delenv("EMBER_KERNELS")
        kernels.reset()


def test_model_decodes_on_blocks_like_the_native_layout(hf_checkpoint, monkeypatch):
    """A bf16 model loaded with --quant int4 --group-size 32: every quantized projection on blocks, logits of a
    prompt and of the fused one-token decode steps close to the same model on the native layout."""
    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    folder, _ = hf_checkpoint("llama")
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    blocks = load_model(folder, dtype="bf16", quant="int4", group_size=32)
    layouts = {m.layout for m in blocks.modules() if isinstance(m, Int4Linear)}
    assert layouts == {"blocks"}
    monkeypatch.setattr(Int4Linear, "_choose_layout", lambda self, device, dtype: q4.NATIVE)
    native = load_model(folder, dtype="bf16", quant="int4", group_size=32)
    assert {m.layout for m in native.modules() if isinstance(m, Int4Linear)} == {"native"}
    for a, b in zip(blocks.modules(), native.modules()):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.dequantize(), b.dequantize())
    import ember.runtime  # noqa: F401  (fills the accel slots)
    from ember.cache import StaticKVCache
    from ember.runtime import decode as rt_decode

    outs = []
    for model in (blocks, native):
        cache = StaticKVCache(model.config, 1, 16, torch.bfloat16, "cpu")
        with torch.no_grad():
            prompt = model(ids[:, :8], None, cache, 0).float()
            cache.advance(8)
            outs.append((prompt, model(ids[:, 8:], None, cache, cache.pos).float()))
    assert blocks in rt_decode._decode_blocks, "the bf16 decode step did not take the fused blocks"
    for got, ref in zip(*outs):
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_G32", "Q4_0", "Q4_1", "MXFP4", "Q8_0"])
@pytest.mark.parametrize("in_f", [288, 512])
def test_prefill_rows_equal_one_row_at_a_time(qtype, in_f, monkeypatch):
    """Many bf16 rows (prefill) of the 4-bit block types run on the int8-activation path, four activation rows per
    decode of the codes: the same bits as each row alone (the decode kernel); Q8_0 keeps the decoded tiles."""
    from test_gguf_native import blocks

    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", True)
    if qtype == "Q4_G32":
        codes, s, z = rand_int4(37, in_f)
        raw, t, w = q4.to_blocks(codes, s, z), q4.Q4_G32, reference_weight(codes, s, z)
    else:
        from gguf import GGMLQuantizationType as QT

        from ember.quant.gguf_blocks import dequantize

        raw, t = blocks(qtype, 37, in_f), int(QT[qtype])
        w = dequantize(raw, QT[qtype], torch.float32).double()
    k = kernels.gguf_kernel(raw, t, in_f)
    for rows in (13, 14):  # 4 + 4 + 4 + 1 and 4 + 4 + 4 + 2 activation rows
        x = torch.randn(rows, in_f).to(torch.bfloat16)
        y = kernels.gguf_tiled(x, raw, t)
        alone = torch.cat([k(x[i:i + 1]) for i in range(rows)])
        check(y.float(), x, w, BF16_REL, f"{qtype} rows={rows}")
        if qtype != "Q8_0" and "AVX" in kernels.status():  # the int8-activation path, as each row's decode
            assert torch.equal(y, alone), f"{qtype} rows={rows}: prefill differs from one row at a time"
