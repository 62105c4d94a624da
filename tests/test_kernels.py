"""Native CPU kernels (ember.kernels) against float64 references, for the AVX512 build and the portable one.

Tolerances: fp32 activations, fp32 accumulation in a different order than the reference: 1e-5 x max |y|.
bf16 activations: the output is rounded to bf16 once (2**-8 relative), plus fp32 accumulation: 2**-7 x max |y|.
The shapes include row counts that are not multiples of the kernels' 4-row blocks, widths that miss the
vectorised paths (so the scalar tails run), and batch sizes past the fused-kernel limits (tiled path).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import ember.runtime  # noqa: F401  (the kernels behind Linear, RMSNorm and project)
from ember import kernels
from ember.models import RMSNorm, apply_rope, project, rope_cos_sin, rope_inv_freq
from ember.config import ModelConfig
from ember.quant import nf4 as qnf4


def worst(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    d = (got.double() - ref.double()).abs()
    i = int(d.argmax())
    assert d.max() <= tol, (f"{what}: worst |diff| {d.max():.3g} at flat index {i} "
                            f"(got {got.flatten()[i]:.6g}, ref {ref.flatten()[i]:.6g}), tolerance {tol:.3g}")


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    """The kernel library built the given way (skips when no compiler is found)."""
    monkeypatch.setenv("EMBER_KERNELS", request.param)
    kernels.reset()
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    if request.param == "portable":
        assert lib.ember_kernels_isa() == 0
    yield request.param
    monkeypatch.delenv("EMBER_KERNELS")
    kernels.reset()


def tol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    return (2**-7 if dtype == torch.bfloat16 else 1e-5) * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,O,I", [(1, 67, 2048), (3, 5, 96), (8, 130, 64), (2, 9, 40)])
def test_dense(build, dtype, M, O, I, monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(O, I).to(dtype), torch.randn(M, I).to(dtype)
    y = kernels.dense(x, w)
    assert y is not None and y.dtype == dtype and y.shape == (M, O)
    ref = x.double() @ w.double().T
    worst(y, ref, tol(ref, dtype), f"dense {build} {dtype} {M}x{O}x{I}")


@pytest.mark.skipif(not kernels.AMX_BF16, reason="CPU without AMX tiles")
@pytest.mark.parametrize("M,O,I", [(5, 16, 32), (8, 130, 64), (16, 37, 2048), (17, 50, 96), (32, 67, 128)])
def test_dense_bf16_amx(M, O, I):
    # Batched bf16 rows run on AMX tiles (16-row weight blocks; the O % 16 tail on the AVX512 kernel).
    lib = kernels.load()
    assert lib is not None and lib.ember_kernels_amx() == 1 and "AMX" in kernels.status()
    torch.manual_seed(2)
    w, x = torch.randn(O, I).bfloat16(), torch.randn(M, I).bfloat16()
    y = torch.full((M, O), float("nan"), dtype=torch.bfloat16)
    assert lib.ember_dense_bf16_amx(w.data_ptr(), x.data_ptr(), y.data_ptr(), M, O, I, 1, torch.get_num_threads()) == 1
    ref = x.double() @ w.double().T
    worst(y, ref, tol(ref, torch.bfloat16), f"dense amx {M}x{O}x{I}")
    assert torch.equal(kernels.dense(x, w), y)  # the dispatch takes this path
    # What it does not take: odd input widths, more than 32 rows.
    assert lib.ember_dense_bf16_amx(w.data_ptr(), x.data_ptr(), y.data_ptr(), M, O, I - 1, 1, 1) == 0
    assert lib.ember_dense_bf16_amx(w.data_ptr(), x.data_ptr(), y.data_ptr(), 33, O, I, 1, 1) == 0


def test_dense_declines_what_it_does_not_handle():
    w = torch.randn(8, 64)
    assert kernels.dense(torch.randn(kernels.MAX_ROWS["dense"] + 1, 64), w) is None  # prefill: PyTorch's GEMM
    assert kernels.dense(torch.randn(1, 64).half(), w.half()) is None
    assert kernels.dense(torch.randn(1, 64, requires_grad=True), w) is None  # autograd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,O,I", [(1, 67, 2048), (1, 6, 80), (3, 13, 128), (9, 37, 192)])
def test_int8(build, dtype, M, O, I, monkeypatch):
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", False)  # exact against the weight; int8 activations below
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (O, I), dtype=torch.int8)
    s = torch.rand(O) * 0.01
    x = torch.randn(M, I).to(dtype)
    y = kernels.int8(x, q, s)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    worst(y, ref, tol(ref, dtype), f"int8 {build} {dtype} {M}x{O}x{I}")


def int4_reference(codes, scales, zeros, g):
    O, half = codes.shape
    q = torch.stack((codes >> 4, codes & 15), -1).view(O, 2 * half).double()  # element 2j in the high nibble
    return ((q - 8).view(O, -1, g) * scales.double()[..., None] + zeros.double()[..., None]).view(O, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("M,O,I", [(1, 67, 1024), (2, 5, 256), (1, 9, 192), (7, 21, 384)])
def test_int4(build, dtype, g, M, O, I, monkeypatch):
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", False)
    if I % g:
        pytest.skip("group does not divide the width")
    torch.manual_seed(2)
    codes = torch.randint(0, 256, (O, I // 2), dtype=torch.uint8)
    for stats in (torch.bfloat16, torch.float32):
        scales, zeros = (torch.rand(O, I // g) * 0.02).to(stats), (torch.randn(O, I // g) * 0.01).to(stats)
        x = torch.randn(M, I).to(dtype)
        y = kernels.q4(x, codes, torch.arange(16, dtype=torch.float32) - 8, g, scales=scales, zeros=zeros)
        ref = x.double() @ int4_reference(codes, scales, zeros, g).T
        worst(y, ref, tol(ref, dtype), f"int4 {build} {dtype} stats {stats} g{g} {M}x{O}x{I}")


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the VNNI kernels round it: int8 per 128 values, scale max|x| / 127, nearest-even."""
    xs = x.double().view(x.shape[0], -1, 128)
    a = xs.abs().amax(-1, keepdim=True)
    q = torch.where(a > 0, torch.round(xs * (127 / a)), torch.zeros_like(xs))
    return (q * (a / 127)).view(x.shape)


def act_q8_levels() -> int:
    """The native build's NF4 code-book resolution with int8 activations (0: no int8-activation kernels)."""
    lib = kernels.load()
    return lib.ember_kernels_act_q8_levels() if lib is not None else 0


act_q8 = pytest.mark.skipif(not act_q8_levels(), reason="build without int8-activation kernels (VNNI or AVX2)")


def bf16_out_tol(ref: torch.Tensor) -> float:
    # the kernel accumulates in fp32 and rounds the output to bf16: half an ulp of the largest output, and slack
    return 2**-8 * float(ref.abs().max()) * 1.05


@act_q8
@pytest.mark.parametrize("M,O,I", [(1, 67, 2048), (2, 9, 128), (4, 37, 384)])
def test_int8_with_int8_activations(M, O, I):
    # bf16 rows quantized to int8 per 128 values, multiplied as bytes: exact against that rounding of x
    torch.manual_seed(4)
    q = torch.randint(-127, 128, (O, I), dtype=torch.int8)
    s = torch.rand(O) * 0.01
    x = torch.randn(M, I).bfloat16()
    x[0, :128] = 0  # an all-zero step has scale 0
    y = kernels.int8(x, q, s)
    w = q.double() * s.double()[:, None]
    ref = quantized_activations(x) @ w.T
    worst(y, ref, bf16_out_tol(ref), f"int8 q8-activations {M}x{O}x{I}")
    # and within the activation rounding (about 0.4% of a typical entry per value) of the exact product
    exact = x.double() @ w.T
    worst(y, exact, 0.03 * float(exact.abs().max()), f"int8 q8-activations vs exact {M}x{O}x{I}")


@act_q8
@pytest.mark.parametrize("g", [32, 64, 128])
# one row: the decode kernel (q4_vnni_row), with partial 16-group vectors (I 384, 2560) and a short last block
@pytest.mark.parametrize("M,O,I", [(1, 67, 1024), (1, 13, 384), (1, 7, 2560), (2, 5, 256), (3, 9, 384), (8, 21, 128)])
def test_int4_with_int8_activations(g, M, O, I, monkeypatch):
    monkeypatch.setitem(kernels.MAX_ROWS, "q4", 8)  # the fused kernel's whole range
    torch.manual_seed(5)
    codes = torch.randint(0, 256, (O, I // 2), dtype=torch.uint8)
    for stats in (torch.bfloat16, torch.float32):
        scales, zeros = (torch.rand(O, I // g) * 0.02).to(stats), (torch.randn(O, I // g) * 0.01).to(stats)
        x = torch.randn(M, I).bfloat16()
        y = kernels.q4(x, codes, torch.arange(16, dtype=torch.float32) - 8, g, scales=scales, zeros=zeros)
        w = int4_reference(codes, scales, zeros, g)
        # the (q - 8) * s part takes the int8 activations, the zero term the bf16 ones
        z = zeros.double().repeat_interleave(g, 1)
        ref = quantized_activations(x) @ (w - z).T + x.double() @ z.T
        worst(y, ref, bf16_out_tol(ref), f"int4 q8-activations stats {stats} g{g} {M}x{O}x{I}")


@act_q8
@pytest.mark.parametrize("double_quant", [True, False])
# one row with 6, 40 and 88 groups a row: double-quant blocks of 256 groups start inside a 16-group vector, and
# 88 groups take two 64-code map lookups
@pytest.mark.parametrize("M,O,I", [(1, 67, 1024), (1, 67, 384), (1, 13, 2560), (1, 11, 5632), (2, 5, 256), (8, 21, 128)])
def test_nf4_with_int8_activations(double_quant, M, O, I, monkeypatch):
    # the code book rounded to 1/L, the activations to int8 per 128: exact against both roundings
    monkeypatch.setitem(kernels.MAX_ROWS, "q4", 8)
    torch.manual_seed(7)
    lin = torch.nn.Linear(I, O, bias=False)
    with torch.no_grad():  # the last rows 8x larger: blocks of 256 absmax values get different double-quant scales
        lin.weight[2 * O // 3:] *= 8
    m = qnf4.NF4Linear.from_linear(lin, double_quant=double_quant, dtype=torch.float32)
    x = torch.randn(M, I).bfloat16()
    if double_quant:
        y = kernels.q4(x, m.weight, qnf4.NF4_CODE, 64, am_code=m.absmax, am_dyn=qnf4.DYNAMIC_CODE,
                       am_scale2=m.absmax_scale, am_offset=float(m.absmax_offset))
    else:
        y = kernels.q4(x, m.weight, qnf4.NF4_CODE, 64, absmax=m.absmax)
    w = m.dequantize().double()
    code = qnf4.NF4_CODE.double()
    # per weight: value = absmax * c; the kernel multiplies absmax * round(L c) / L (L = 127 VNNI, 63 AVX2)
    L = act_q8_levels()
    ratio = torch.where(code != 0, torch.round(L * code) / L / torch.where(code != 0, code, 1), 1.0)
    idx = torch.stack([m.weight >> 4, m.weight & 15], -1).view(O, I).long()
    ref = quantized_activations(x) @ (w * ratio[idx]).T
    worst(y, ref, bf16_out_tol(ref), f"nf4 q8-activations dq={double_quant} {M}x{O}x{I}")
    exact = x.double() @ w.T
    worst(y, exact, 0.03 * float(exact.abs().max()), f"nf4 q8-activations vs exact {M}x{O}x{I}")


def test_int8_activations_can_be_switched_off(monkeypatch):
    torch.manual_seed(6)
    q, s, x = torch.randint(-127, 128, (5, 256), dtype=torch.int8), torch.rand(5), torch.randn(1, 256).bfloat16()
    on = kernels.int8(x, q, s)
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", False)
    off = kernels.int8(x, q, s)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    worst(off, ref, bf16_out_tol(ref), "int8 without int8 activations")  # only the output's rounding
    if act_q8_levels():
        assert not torch.equal(on, off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M,O,I", [(1, 67, 1024), (2, 6, 128), (1, 3, 192), (5, 11, 256)])
def test_nf4(build, dtype, double_quant, M, O, I, monkeypatch):
    monkeypatch.setattr(kernels.matmul, "INT8_ACTIVATIONS", False)  # exact against the weight; int8 activations above
    torch.manual_seed(3)
    lin = torch.nn.Linear(I, O, bias=False)
    m = qnf4.NF4Linear.from_linear(lin, double_quant=double_quant, dtype=torch.float32)
    x = torch.randn(M, I).to(dtype)
    if double_quant:
        y = kernels.q4(x, m.weight, qnf4.NF4_CODE, 64, am_code=m.absmax, am_dyn=qnf4.DYNAMIC_CODE,
                       am_scale2=m.absmax_scale, am_offset=float(m.absmax_offset))
    else:
        y = kernels.q4(x, m.weight, qnf4.NF4_CODE, 64, absmax=m.absmax)
    ref = x.double() @ m.dequantize().double().T
    # bf16 activations use the code book rounded to bf16 (relative error <= 2**-9 per weight)
    worst(y, ref, tol(ref, dtype) * (2 if dtype == torch.bfloat16 else 1), f"nf4 {build} {dtype} {M}x{O}x{I}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H", [192, 200])  # 16-lane vectors only, and a scalar tail
def test_rms_norm_matches_the_torch_path(build, dtype, H):
    torch.manual_seed(4)
    norm = RMSNorm(H, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, H) * 4).to(dtype)
    with torch.no_grad():
        got = kernels.rms_norm(x, norm.weight, norm.eps)
        h = x.float()
        ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)  # HF's formula
    if dtype == torch.float32:
        worst(got, ref, 1e-6 * float(ref.abs().max()), "rms_norm fp32")
    else:  # the same two roundings; the fp32 statistics may differ in the last bit
        worst(got, ref, 2**-7 * float(ref.abs().max()), "rms_norm bf16")
        assert (got != ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", [32, 40, 128])  # halves of 16-lane vectors, of scalars, of two vectors
def test_rope_in_place_equals_apply_rope(build, dtype, hd):
    cfg = ModelConfig(model_type="llama", hidden_size=4 * hd, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    torch.manual_seed(5)
    x = (torch.randn(2, 3, 4, hd) * 3).to(dtype)  # (B, T, heads, hd)
    positions = torch.tensor([[0, 1, 2], [7, 8, 9]])
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), positions, dtype)  # (B, T, hd)
    ref = apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None]).transpose(1, 2)
    got = x.clone()
    assert kernels.rope_(got, cos, sin)
    assert torch.equal(got, ref), f"worst {(got.float() - ref.float()).abs().max():.3g}"


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    out = g.clone()
    kernels.load().ember_silu_mul(out.data_ptr(), u.data_ptr(), out.numel(), int(g.dtype is torch.bfloat16))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_has_the_same_bits_in_every_build(dtype, monkeypatch):
    """The MLP blocks' silu(g) * u: the vector lanes (16 with AVX512, 8 with AVX2) give the portable scalar loop's
    bits, clamped exponents, infinities and NaN included, and stay within the two roundings of float64."""
    torch.manual_seed(9)
    g = torch.cat([torch.randn(997) * 6, torch.tensor([-200., -88., -87.5, 87.5, 90., 200., 0., -0.,
                                                       float("inf"), float("-inf"), float("nan")])]).to(dtype)
    u = (torch.randn(g.numel()) * 2).to(dtype)
    got = {}
    for build in ("native", "portable"):
        monkeypatch.setenv("EMBER_KERNELS", build)
        kernels.reset()
        if kernels.load() is None:
            pytest.skip(f"native kernels unavailable: {kernels.status()}")
        got[build] = _silu_mul(g, u)
    monkeypatch.delenv("EMBER_KERNELS")
    kernels.reset()
    a, b = got["native"].view(torch.int16 if dtype is torch.bfloat16 else torch.int32), got["portable"].view(
        torch.int16 if dtype is torch.bfloat16 else torch.int32)
    assert torch.equal(a, b), f"native and portable differ at {int((a != b).nonzero()[0])}"
    g64, u64 = g.double(), u.double()
    ref = g64 * torch.sigmoid(g64) * u64
    finite = ref.isfinite() & g64.isfinite()
    rel = 2**-7 if dtype is torch.bfloat16 else 1e-6
    worst(got["native"][finite], ref[finite], 2 * rel * float(ref[finite].abs().max()), f"silu_mul {dtype}")
    assert got["native"][~g64.isfinite() & ~g64.isinf()].isnan().all()


def test_disabled_kernels_fall_back_to_torch(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "0")
    kernels.reset()
    try:
        assert kernels.load() is None and kernels.dense(torch.randn(1, 64), torch.randn(8, 64)) is None
        assert "off" in kernels.status()
        from ember.models import Linear

        lin = Linear(64, 8)
        x = torch.randn(1, 64)
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    finally:
        monkeypatch.delenv("EMBER_KERNELS")
        kernels.reset()


@pytest.mark.parametrize("native", [True, False])
def test_wide_bf16_products_where_bf16_gemms_are_emulated(native, monkeypatch):
    # prefill-sized bf16 products: fp32 GEMMs (rounded to bf16) where PyTorch's bf16 GEMM is emulated
    monkeypatch.setattr(kernels.matmul, "_native_bf16", native)
    torch.manual_seed(8)
    x, w = torch.randn(40, 128).bfloat16(), (torch.randn(24, 128) * 0.1).bfloat16()
    ref = x.double() @ w.double().T
    y = kernels.wide_linear(x, w, None)
    if native:
        assert y is None
    else:
        assert y.dtype == torch.bfloat16
        worst(y, ref, bf16_out_tol(ref), "wide bf16 linear in fp32")
        # tiles of weight rows converted at a time (here 16 rows: two tiles), a bias, leading dims kept
        monkeypatch.setattr(kernels.matmul, "TILE_BYTES", 16 * 128 * 4)
        b = torch.randn(24).bfloat16()
        y = kernels.wide_linear(x.view(4, 10, 128), w, b)
        ref = (x.double() @ w.double().T + b.double()).view(4, 10, 24)
        assert y.shape == (4, 10, 24) and y.dtype == torch.bfloat16
        worst(y, ref, bf16_out_tol(ref), "wide bf16 linear in fp32, tiled, bias")
    codes = torch.randint(0, 256, (24, 64), dtype=torch.uint8)
    scales, zeros = torch.rand(24, 1) * 0.02, torch.randn(24, 1) * 0.01
    y = kernels.q4(x, codes, torch.arange(16, dtype=torch.float32) - 8, 128, scales=scales, zeros=zeros)
    assert y is not None and y.dtype == torch.bfloat16
    wq = int4_reference(codes, scales, zeros, 128)
    ref = x.double() @ wq.to(torch.bfloat16).double().T if native else x.double() @ wq.T
    worst(y, ref, 2 * bf16_out_tol(ref), f"tiled int4, native bf16 {native}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,nh,nkv,hd,S", [(1, 32, 4, 64, 200), (3, 8, 8, 128, 37), (2, 16, 2, 64, 1),
                                           (1, 4, 1, 256, 300), (2, 6, 3, 40, 17)])
def test_attn_decode_matches_sdpa(build, dtype, B, nh, nkv, hd, S):
    # One query token per row against views of a larger cache (non-contiguous batch/head strides), with no
    # mask, a padding-style mask per row and a broadcast sliding-window-style mask; hd 40 misses the AVX512 path.
    torch.manual_seed(9)
    q = torch.randn(B, 1, nh, hd).to(dtype)
    k = torch.randn(B, nkv, S + 50, hd).to(dtype)[:, :, :S]
    v = torch.randn(B, nkv, S + 50, hd).to(dtype)[:, :, :S]
    padded = torch.rand(B, 1, 1, S) > 0.3
    padded[..., -1] = True  # the row's own (newest) slot is always visible
    window = (torch.arange(S) >= S - 5)[None, None, None]
    for mask in (None, padded, window):
        got = kernels.attn_decode(q, k, v, mask)
        assert got is not None and got.shape == (B, 1, nh * hd) and got.dtype == dtype
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        ref = ref.transpose(1, 2).reshape(B, 1, nh * hd)
        worst(got, ref, tol(ref, dtype), f"attn_decode {build} {dtype} mask {None if mask is None else mask.shape}")


def test_attn_decode_declines_what_it_does_not_handle():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 8, 16)
    assert kernels.attn_decode(q, k, k, None) is None  # two query tokens
    assert kernels.attn_decode(q[:, :1], k.half(), k.half(), None) is None  # another dtype
    assert kernels.attn_decode(q[:, :1], k, k, torch.zeros(1, 1, 1, 8)) is None  # a float (additive) mask


def test_linear_kernels_add_the_bias_and_follow_their_weights():
    from ember.models import Linear
    from ember.quant import int4 as qint4, int8 as qint8

    torch.manual_seed(10)
    x = torch.randn(2, 1, 128).bfloat16()
    dense = Linear(128, 24, bias=True).bfloat16()
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), dense.weight.double()) + dense.bias.double()
        worst(dense(x), ref, tol(ref, torch.bfloat16), "dense kernel with bias")
        assert dense.cpu_kernel() is dense.cpu_kernel()  # made once
        dense.weight = torch.nn.Parameter(dense.weight * 2)  # a new tensor: the kernel is remade
        worst(dense(x), 2 * ref - dense.bias.double(), 2 * tol(ref, torch.bfloat16), "dense kernel after a swap")
        lin = torch.nn.Linear(128, 24).bfloat16()
        for mod in (qint8.Int8Linear.from_linear(lin, dtype=torch.bfloat16),
                    qint4.Int4Linear.from_linear(lin, group_size=32, dtype=torch.bfloat16)):
            assert mod.cpu_kernel() is not None, type(mod).__name__
            y = mod(x)
            ref = x.double() @ mod.dequantize().double().T + mod.bias.double()
            worst(y, ref, 0.02 * float(ref.abs().max()), f"{type(mod).__name__} kernel with bias")


def test_project_is_the_modules_one_by_one():
    from ember.models import Linear
    from ember.quant import nf4 as qnf4_

    torch.manual_seed(11)
    mods = [Linear(64, 32, bias=False).bfloat16(), Linear(64, 8, bias=True).bfloat16(),
            qnf4_.NF4Linear.from_linear(torch.nn.Linear(64, 16, bias=False), dtype=torch.bfloat16)]
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.no_grad():
        alone = [m(x) for m in mods]
        together = project(x, mods)
        assert [t.shape for t in together] == [a.shape for a in alone]
        assert all(torch.equal(t, a) for t, a in zip(together, alone))
        seen = []
        mods[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # hooks must see their call
        assert all(torch.equal(t, a) for t, a in zip(project(x, mods), alone)) and seen == [(1, 1, 8)]


def test_project_runs_quantized_weights_of_one_format_in_one_region_bit_for_bit():
    # q/k/v-like groups of int8 or 4-bit weights (row counts off the row blocks, a bias, NF4 with and without
    # double quantization mixed) go through one parallel region: the same bits as each weight alone
    from ember.quant import Int4Linear, Int8Linear
    from ember.quant import nf4 as qnf4_

    torch.manual_seed(12)
    x = torch.randn(1, 1, 384).bfloat16()
    shapes = [(67, False), (16, True), (9, False)]
    groups = [[qnf4_.NF4Linear.from_linear(torch.nn.Linear(384, o, bias=b), double_quant=i != 2, dtype=torch.bfloat16)
               for i, (o, b) in enumerate(shapes)]]
    groups += [[Int4Linear.from_linear(torch.nn.Linear(384, o, bias=b), group_size=g, dtype=torch.bfloat16)
                for o, b in shapes] for g in (32, 128)]
    groups += [[Int8Linear.from_linear(torch.nn.Linear(384, o, bias=b), dtype=torch.bfloat16) for o, b in shapes]]
    with torch.no_grad():
        for mods in groups:
            alone = [m(x) for m in mods]
            together = project(x, mods)
            assert all(torch.equal(t, a) for t, a in zip(together, alone)), type(mods[0]).__name__
            ref = x.double() @ mods[0].dequantize().double().T
            worst(together[0], ref, 0.03 * float(ref.abs().max()), f"{type(mods[0]).__name__} in a group")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_project_runs_dense_weights_in_one_region_bit_for_bit(dtype):
    # q/k/v-like groups of bf16 or fp32 weights (row counts off the 4-row blocks, a bias): the same bits as alone
    from ember.models import Linear

    torch.manual_seed(13)
    x = torch.randn(1, 1, 384).to(dtype)
    mods = [Linear(384, o, bias=b).to(dtype) for o, b in [(67, False), (16, True), (9, False)]]
    with torch.no_grad():
        alone = [m(x) for m in mods]
        together = project(x, mods)
        assert all(torch.equal(t, a) for t, a in zip(together, alone))
        ref = x.double() @ mods[1].weight.double().T + mods[1].bias.double()
        worst(together[1], ref, tol(ref, dtype), f"dense {dtype} in a group")


def test_the_native_build_compiles_where_there_is_a_compiler():
    # the kernel tests skip where the library is unavailable: a source that no longer compiles must fail here
    if kernels._compiler() is None or kernels._mode() in ("0", "off", "false", "no", "torch"):
        pytest.skip("no C++ compiler, or the kernels are turned off")
    assert kernels.build().is_file()  # raises RuntimeError with the compiler's output
    assert kernels.build(portable=True).is_file()
    # and on x86 the -march=native flags themselves compile: a source error under them falls back to a build
    # without intrinsics, which would still load and pass the other tests at portable speed
    if kernels._cpu_has("avx512_bf16") or kernels._cpu_has("avx2"):
        flags = kernels._flag_sets(False)[0]
        for src in kernels.sources():
            proc = subprocess.run([kernels._compiler(), *flags, "-fsyntax-only", str(src)],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{src.name}: {proc.stderr[-2000:]}"
