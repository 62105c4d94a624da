"""GGUF tensors kept in their ggml blocks: the native kernels (ember/kernels/gguf.cpp, AVX512/AVX2 and portable
builds), the torch fallback, the loaded model (every projection, the embedding and a tied LM head kept as
blocks, memory held within 1.1x of the file's tensors) and decoding through the fused blocks.

Oracle: ``x @ dequantize(W).T`` in float64, with ``dequantize`` bit-exact against ``gguf.quants.dequantize``
(tests/test_gguf.py). fp32 activations: equal to fp32 rounding; bf16 activations on the int8-activation path:
within the error of quantizing the activations per 32 (per 256 for the K-quants and IQ4_XS) values.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import psutil
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from test_gguf import KEPT, random_blocks, write_model_gguf

from ember import kernels
from ember.loading.gguf import GGUFFile, load_gguf_model
from ember.quant import base as quant_base
from ember.quant.gguf_blocks import dequantize
from ember.quant.gguf_linear import GGUFEmbedding, GGUFLinear

# Relative to sum(|w| |x|) per output: fp32 rounding of the dot; bf16 output rounding plus activations on 127
# levels per 32 or 256 values.
FP32_REL, BF16_REL = 2e-6, 2e-2


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", request.param)
    kernels.reset()
    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    yield request.param
    monkeypatch.delenv("EMBER_KERNELS")
    kernels.reset()


def blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    block = gguf.GGML_QUANT_SIZES[QT[qtype]][0]
    return torch.from_numpy(random_blocks(QT[qtype], rows, cols // block, seed))


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float, what: str) -> None:
    ref = x.double() @ w.double().T
    bound = rel * (x.double().abs() @ w.double().abs().T) + 1e-30
    excess = ((y.double() - ref).abs() / bound)
    i = int(excess.argmax())
    assert excess.max() <= 1, (f"{what}: worst |diff| {(y.double() - ref).abs().flatten()[i]:.3g} at flat index {i} "
                               f"(got {y.flatten()[i]:.6g}, ref {ref.flatten()[i]:.6g}), bound {bound.flatten()[i]:.3g}")


@pytest.mark.parametrize("qtype", KEPT)
def test_kernel_matches_dequantized_weight(build, qtype):
    big = gguf.GGML_QUANT_SIZES[QT[qtype]][0] == 256
    for O, I in ((13, 768), (5, 256)) if big else ((13, 96), (7, 32)):  # odd rows, a last 32-value tail
        raw = blocks(qtype, O, I, seed=O)
        w = dequantize(raw, QT[qtype])
        for M in (1, 3, 9, 40):  # kernel rows, and the tiled path past MAX_ROWS
            x = torch.randn(M, I, generator=torch.Generator().manual_seed(M))
            y = GGUFLinear(raw, QT[qtype], None, torch.float32)(x)
            check(y, x, w, FP32_REL, f"{build} {qtype} fp32 ({M}, {O}, {I})")
            xb = x.bfloat16()
            yb = GGUFLinear(raw, QT[qtype], None, torch.bfloat16)(xb)
            assert yb.dtype is torch.bfloat16
            check(yb, xb, w, BF16_REL, f"{build} {qtype} bf16 ({M}, {O}, {I})")


def test_kernel_takes_bias_and_leading_dims(build):
    raw = blocks("Q4_K", 6, 512)
    bias = torch.randn(6)
    lin = GGUFLinear(raw, QT.Q4_K, bias, torch.float32)
    x = torch.randn(2, 3, 512)
    y = lin(x)
    assert y.shape == (2, 3, 6)
    ref = torch.nn.functional.linear(x.double(), dequantize(raw, QT.Q4_K).double(), bias.double())
    assert (y.double() - ref).abs().max() < 1e-6 * ref.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "IQ4_XS", "MXFP4"])
def test_torch_fallback_in_row_chunks(qtype, monkeypatch):
    """EMBER_KERNELS=0 (and CUDA): rows decoded a chunk at a time, never the whole float weight."""
    monkeypatch.setenv("EMBER_KERNELS", "0")
    kernels.reset()
    monkeypatch.setattr(quant_base, "_CPU_CHUNK_ELEMENTS", 512 * 3)  # 3 rows per chunk
    decoded = []
    orig = GGUFLinear.dequantize_rows
    monkeypatch.setattr(GGUFLinear, "dequantize_rows", lambda self, a, b: decoded.append(b - a) or orig(self, a, b))
    try:
        raw = blocks(qtype, 10, 512)
        lin = GGUFLinear(raw, QT[qtype], None, torch.float32)
        assert lin.cpu_kernel() is None
        for M in (1, 5):
            x = torch.randn(M, 512)
            check(lin(x), x, dequantize(raw, QT[qtype]), FP32_REL, f"fallback {qtype} M={M}")
        assert max(decoded) == 3
    finally:
        monkeypatch.delenv("EMBER_KERNELS")
        kernels.reset()


@pytest.mark.parametrize("qtype", KEPT)
def test_register_kernels_row_blocks_and_block_tails(qtype):
    """The register-decoding kernels' edges (gguf_simd.h): passes of 4 weight rows plus 1-3 left over, 8-block
    chunks of the 32-value types plus a tail of 1-7 blocks, several activation rows and an all-zero one."""
    big = gguf.GGML_QUANT_SIZES[QT[qtype]][0] == 256
    for O, I in ((9, 1280), (6, 256)) if big else ((9, 608), (3, 256), (6, 64)):
        raw = blocks(qtype, O, I, seed=O + I)
        w = dequantize(raw, QT[qtype])
        x = torch.randn(6, I, generator=torch.Generator().manual_seed(I))
        x[1] = 0.0
        xb = x.bfloat16()
        for M in (1, 2, 6):
            yb = GGUFLinear(raw, QT[qtype], None, torch.bfloat16)(xb[:M])
            check(yb, xb[:M], w, BF16_REL, f"{qtype} bf16 ({M}, {O}, {I})")
            assert torch.equal(yb[1:2] if M > 1 else yb[:0], torch.zeros_like(yb[1:2] if M > 1 else yb[:0]))


def test_dequant_kernel_is_bit_exact(build):
    for qtype in KEPT:
        raw = blocks(qtype, 5, 512)
        out = torch.empty(5, 512)
        assert kernels.gguf_dequant(raw, int(QT[qtype]), 512, out)
        assert torch.equal(out, dequantize(raw, QT[qtype])), qtype


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="not Q8_1"):
        GGUFLinear(torch.zeros(2, 36, dtype=torch.uint8), QT.Q8_1, None, torch.float32)


# ==================================================================== models


WIDE = dict(hidden_size=256, intermediate_size=512)  # rows that K-quant blocks (256) fit


@pytest.fixture(scope="module")
def wide_gguf(hf_checkpoint, tmp_path_factory):
    cache: dict = {}

    def make(family: str, qtype: str):
        if (family, qtype) not in cache:
            _, hf = hf_checkpoint(family, **WIDE)
            path = tmp_path_factory.mktemp("gguf-native") / f"{family}-{qtype}.gguf"
            cache[family, qtype] = (write_model_gguf(path, hf, family, qtype), hf)
        return cache[family, qtype]

    return make


def dequantized_copy(model):
    """``model`` with every block module replaced by its float equivalent: the oracle."""
    import copy

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, GGUFLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight = torch.nn.Parameter(m.dequantize(), requires_grad=False)
            if m.bias is not None:
                lin.bias = torch.nn.Parameter(m.bias.float(), requires_grad=False)
            ref.set_submodule(name, lin)
        elif isinstance(m, GGUFEmbedding):
            ref.set_submodule(name, torch.nn.Embedding.from_pretrained(m.dequantize()))
    return ref


def held_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("family,qtype", [("llama-tied", "Q4_K"), ("llama-bias", "Q6_K"), ("qwen3", "Q8_0"),
                                          ("llama", "MXFP4"), ("llama", "IQ4_XS"), ("llama", "Q2_K")])
def test_model_keeps_blocks_and_equals_its_dequantized_weights(wide_gguf, family, qtype):
    path, hf = wide_gguf(family, qtype)
    model = load_gguf_model(path, dtype="fp32")
    lins = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(lins) == 7 * hf.config.num_hidden_layers + 1  # every projection and the LM head
    emb = model.model.embed_tokens
    assert isinstance(emb, GGUFEmbedding)
    if hf.config.tie_word_embeddings:
        assert model.lm_head.qweight.data_ptr() == emb.qweight.data_ptr()  # one copy of the table
    gf = GGUFFile.open(path)
    file_bytes = sum(int(t.n_bytes) for t in gf.tensors.values())
    assert held_bytes(model) <= 1.1 * file_bytes, f"holds {held_bytes(model)} bytes for {file_bytes} in the file"
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, ref = model(ids), dequantized_copy(model)(ids)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err < 1e-4 * max(1.0, scale), f"{family} {qtype}: kept blocks vs dequantized: max |diff| {err:.3g} " \
                                         f"(|logits| up to {scale:.3g})"


def test_embedding_decodes_only_the_rows_it_looks_up(wide_gguf, monkeypatch):
    path, _ = wide_gguf("llama", "Q4_K")
    emb = load_gguf_model(path, dtype="fp32").model.embed_tokens
    seen = []
    orig = kernels.gguf_dequant
    monkeypatch.setattr(kernels, "gguf_dequant", lambda raw, *a: seen.append(raw.shape[0]) or orig(raw, *a))
    ids = torch.tensor([[5, 9, 5]])
    out = emb(ids)
    assert out.shape == (1, 3, 256) and seen in ([3], [])  # the three rows asked for (torch path when no kernels)
    assert torch.equal(out[0], emb.dequantize()[ids[0]])


def test_bf16_decode_runs_the_fused_blocks_on_the_blocks(wide_gguf):
    """One-token decode in bf16 goes through DecodeBlocks (every layer's projections on the gguf kernel) and
    stays close to the fp32 model with the same weights."""
    if kernels.load() is None:
        pytest.skip("native kernels unavailable")
    import ember.runtime  # noqa: F401  (fills the accel slots)
    from ember.cache import StaticKVCache
    from ember.runtime import decode as rt_decode

    path, hf = wide_gguf("llama", "Q4_K")
    low, ref = load_gguf_model(path, dtype="bf16"), load_gguf_model(path, dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    outs = []
    for model, dt in ((low, torch.bfloat16), (ref, torch.float32)):
        cache = StaticKVCache(model.config, 1, 16, dt, "cpu")
        with torch.no_grad():
            model(ids[:, :5], None, cache, 0)
            cache.advance(5)
            outs.append(model(ids[:, 5:], None, cache, cache.pos).float())
    assert low in rt_decode._decode_blocks, "the bf16 decode step did not take the fused blocks"
    err = (outs[0] - outs[1]).abs().max().item()
    scale = outs[1].abs().max().item()
    assert err < 0.05 * scale + 0.05, f"bf16 decode vs fp32: max |diff| {err:.3g} (|logits| up to {scale:.3g})"


def test_resident_memory_stays_near_the_file_size(wide_gguf):
    path, _ = wide_gguf("llama", "Q4_K")
    proc = psutil.Process(os.getpid())
    before = proc.memory_info().rss
    model = load_gguf_model(path, dtype="bf16")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    grown = proc.memory_info().rss - before
    size = os.path.getsize(path)
    # the file mapped (at most its size) plus small per-module state; a dequantized bf16 copy would be ~3.5x
    assert grown < 1.1 * size + (8 << 20), f"RSS grew {grown / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
    assert np.isfinite(grown)


def _mapped_rss(path) -> int:
    """Bytes of ``path``'s memory maps resident in this process (/proc/self/smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split(" ", 1)[0]:
            ours = line.rstrip().endswith(str(path))
        elif ours and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_unpermuted_q_k_are_read_not_mapped(hf_checkpoint, tmp_path):
    """llama's q/k rows are un-permuted into a copy read from the file: the map's pages of those tensors are never
    touched, so the process does not hold them twice (they were ~10% of a Q6_K 1.1B Llama's resident memory)."""
    from ember.loading.gguf import unpermute_rope_rows

    _, hf = hf_checkpoint("llama", hidden_size=1024, intermediate_size=256, num_attention_heads=8,
                          num_key_value_heads=2)
    path = write_model_gguf(tmp_path / "llama-q6_k.gguf", hf, "llama", "Q6_K")
    model = load_gguf_model(path, dtype="bf16")
    resident = _mapped_rss(path)
    qk_bytes = sum(m.qweight.numel() for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj")))
    gf = GGUFFile.open(path)
    # header pages, the float norms (with the kernel's fault-around) and nothing of the q/k tensors
    data_start = min(int(t.data_offset) for t in gf.tensors.values())
    assert qk_bytes > 1 << 20 and resident < data_start + qk_bytes // 2, f"{resident} bytes of the map resident"
    for n in [n for n in gf.tensors if n.endswith(("attn_q.weight", "attn_k.weight"))]:  # the map's rows un-permuted
        heads = hf.config.num_attention_heads if "attn_q" in n else hf.config.num_key_value_heads
        assert torch.equal(gf.raw(n, heads), unpermute_rope_rows(torch.from_numpy(gf.tensors[n].data), heads)), n


def test_bf16_file_computes_in_bf16_on_views_of_the_map(wide_gguf):
    """--dtype auto on a BF16 file keeps its matrices as bf16 views of the map wherever the kernels are built (also
    where bf16 GEMMs are emulated and auto otherwise means fp32: an fp32 copy would take twice the file)."""
    if kernels.load() is None:
        pytest.skip("native kernels unavailable")
    path, hf = wide_gguf("llama", "BF16")
    gf = GGUFFile.open(path)
    model = load_gguf_model(gf)
    o = model.model.layers[0].self_attn.o_proj.weight
    view = gf.tensors["blk.0.attn_output.weight"].data
    assert o.dtype is torch.bfloat16 and o.data_ptr() == view.ctypes.data  # no copy
    ref = load_gguf_model(path, dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(ids).float(), ref(ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max() + 0.05


def test_meta_build_does_not_import_dynamo(wide_gguf):
    """Building the model on the meta device skips nn.Embedding's init: torch runs a meta ``normal_`` through
    torch._refs, whose first call imports torch._dynamo (~70 MB resident, in every load)."""
    import subprocess
    import sys

    path, _ = wide_gguf("llama", "Q4_K")
    code = ("import sys; from ember.loading.gguf import load_gguf_model; load_gguf_model(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy')))[:3])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]", out.stdout


def test_plan_prices_the_files_own_types(wide_gguf, capsys):
    """``ember plan model.gguf``: inference weights are the file's quantized tensors at their bytes plus its
    float tensors in the compute dtype, not a 16-bit copy of every weight."""
    import json

    from ember.cli import main

    path, hf = wide_gguf("llama", "Q4_K")
    gf = GGUFFile.open(path)
    quant = sum(int(t.n_bytes) for t in gf.tensors.values() if t.tensor_type != QT.F32)
    floats = sum(int(t.n_elements) for t in gf.tensors.values() if t.tensor_type == QT.F32)
    main(["plan", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    plain = [o for o in out["options"] if o["workload"]["quant"] == "none" and o["workload"]["task"] == "infer"]
    assert plain, [o["option"] for o in out["options"]]
    for o in plain:
        elem = {"bf16": 2, "fp16": 2, "fp32": 4}[o["workload"]["dtype"]]
        assert o["memory_bytes"]["weights"] == pytest.approx(quant + floats * elem, rel=1e-6), o["option"]
    assert "held in their own blocks" in " ".join(out["notes"])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q8_0"])
def test_weights_sharing_a_row_run_together_with_the_bits_of_each_alone(build, qtype):
    """Several GGUF weights of one type that read the same bf16 row (q/k/v, gate/up, a token's experts' gate and
    up) run in one kernel call (``ember_linear_many``) and give each weight's own products bit for bit; so do
    dense bf16 weights (the AVX2 and portable tiers group them too)."""
    big = gguf.GGML_QUANT_SIZES[QT[qtype]][0] == 256
    I = 512 if big else 160
    lins = [GGUFLinear(blocks(qtype, O, I, seed=O), QT[qtype], None, torch.bfloat16) for O in (13, 4, 9, 32)]
    dense = [torch.randn(O, I, generator=torch.Generator().manual_seed(O)).bfloat16() for O in (7, 12)]
    x = torch.randn(1, I, generator=torch.Generator().manual_seed(1)).bfloat16()
    for ks in ([m.cpu_kernel() for m in lins], [kernels.dense_kernel(w) for w in dense]):
        assert all(k is not None for k in ks)
        together = kernels.linear_many(ks, x)
        assert together is not None, f"{build} {qtype}: the weights were not taken in one call"
        for i, (k, y) in enumerate(zip(ks, together)):
            assert torch.equal(y, k(x)), f"{build} {qtype}: weight {i} differs run together vs alone"


@pytest.mark.parametrize("qtype", ["Q4_0", "BF16"])
def test_mixtral_bf16_moe_block_matches_its_modules(wide_gguf, monkeypatch, qtype):
    """A Mixtral GGUF file decoded in bf16: the fused MoE block (its experts' gate/up weights in one kernel call,
    their down projections, each on its own row, in another) gives the logits of the plain modules."""
    if kernels.load() is None:
        pytest.skip("native kernels unavailable")
    from test_fused_families import _fused_vs_modules
    from test_model import BF16_TOL, assert_close

    from ember.runtime import blocks as blocks_module

    path, hf = wide_gguf("mixtral", qtype)
    model = load_gguf_model(path, dtype="bf16")
    kinds = []
    orig = blocks_module.layer_blocks
    monkeypatch.setattr(blocks_module, "layer_blocks",
                        lambda *a: (lambda b: kinds.append(None if b is None else b[1].kind) or b)(orig(*a)))
    ids = torch.randint(3, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    fast, plain = _fused_vs_modules(model, ids, 6, torch.bfloat16, monkeypatch)
    assert "moe" in kinds, f"the decode step did not take the fused MoE block ({kinds})"
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, BF16_TOL, f"mixtral {qtype} bf16 decode step {i}")
