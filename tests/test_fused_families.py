"""The fused one-sequence CPU decode blocks for the families beyond Llama's pieces: Gemma 2/3's sandwich (1 + w)
norms, GeGLU, query scale, logit soft-capping and per-layer sliding/global attention with their own RoPE tables,
GLM-4.5's and MiniMax-M2's partial RoPE and q/k norms, DeepSeek's latent attention, the sigmoid routers, gpt-oss's
sinks and MXFP4 experts: exact against HF in fp32 and against the plain modules in bf16, past the sliding window."""

from __future__ import annotations

import collections

import pytest
import torch

import ember.runtime
from ember import kernels
from ember.loading import load_model
from test_families import checkpoint  # noqa: F401  (the fixture: tiny HF checkpoints per family)
from test_gpt_oss import gpt_oss_checkpoint  # noqa: F401
from test_model import BF16_TOL, _count_kernel_attention, _decode_matches_hf, _decode_steps, assert_close
from test_runtime import _needs_kernels


def _count_blocks(monkeypatch) -> "collections.Counter":
    """Blocks that ran (returned done) through run_mlp_block / run_attn_block, by kind."""
    calls = collections.Counter()
    run, run_attn = kernels.run_mlp_block, kernels.run_attn_block

    def count(block, *a):
        done = (run if len(a) == 1 else run_attn)(block, *a)
        calls[block.kind] += bool(done)
        return done

    monkeypatch.setattr(kernels, "run_mlp_block", count)
    monkeypatch.setattr(kernels, "run_attn_block", count)
    return calls


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3_text-softcap"])
def test_gemma3_decode_runs_every_layer_in_one_call_and_matches_hf(checkpoint, monkeypatch, name):
    # 3 layers (sliding, full, sliding; window 8, local and global RoPE bases), 6 prefilled + 14 decoded tokens:
    # the sliding layers' blocks drop keys from step 3 on
    calls, n = fp32_decode_calls(checkpoint, monkeypatch, name)
    # every layer's two blocks and Gemma's head ((1 + w) final norm, the final-logit cap where set), each step
    assert calls["steps"] == 14 and calls["returned"] == [2 * n + 1] * 14 and calls["heads"] == 14


def fp32_decode_calls(checkpoint, monkeypatch, name: str) -> tuple[dict, int]:
    """Decode 6 prefilled + 14 tokens of ``checkpoint(name)`` in fp32, each step's logits as HF's; the kernel calls
    counted (test_model._count_kernel_attention) and the layer count."""
    _needs_kernels()
    folder, hf = checkpoint(name)
    ours = load_model(folder, dtype="fp32")
    calls = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 20, 4, name)
    return calls, ours.config.num_hidden_layers


def test_gemma2_soft_capped_attention_block_matches_hf(checkpoint, monkeypatch):
    # attention logits capped at 5 (cap * tanh(logit / cap)) in the attention block, every layer and the head with
    # its final-logit cap in the whole-step call; past the window (8)
    _needs_kernels()
    folder, hf = checkpoint("gemma2")
    ours = load_model(folder, dtype="fp32")
    assert ours.config.final_logit_softcapping is not None
    calls = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 16, 2, "gemma2")
    n = ours.config.num_hidden_layers
    assert calls["returned"] == [2 * n + 1] * 10 and calls["heads"] == 10


def test_gemma3_bf16_blocks_match_the_plain_modules(checkpoint):
    _needs_kernels()
    folder, _ = checkpoint("gemma3_text")
    check_bf16_blocks_match_modules(load_model(folder, dtype="bf16"), "gemma3")


def check_bf16_blocks_match_modules(ours, label: str) -> None:
    """bf16 decode logits with the runtime's blocks within BF16_TOL of the plain modules' (runtime uninstalled)."""
    ids = torch.randint(3, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(7))
    fast = _decode_steps(ours, ids, 6, torch.bfloat16)
    ember.runtime.uninstall()
    try:
        plain = _decode_steps(ours, ids, 6, torch.bfloat16)
    finally:
        ember.runtime.install()
    for i, (a, b) in enumerate(zip(fast[1:], plain[1:])):
        assert_close(a, b, BF16_TOL, f"{label} bf16 decode step {i}")


def _fused_vs_modules(model, ids: torch.Tensor, prefill: int, dtype: torch.dtype, monkeypatch):
    """Decode logits with the runtime's blocks, then with every layer as its modules (blocks refused)."""
    from ember.runtime import blocks as blocks_module, decode as decode_module

    fast = _decode_steps(model, ids, prefill, dtype)
    with monkeypatch.context() as m:
        m.setattr(blocks_module, "layer_blocks", lambda layer, x, *rest: None)
        decode_module._decode_blocks.clear()
        plain = _decode_steps(model, ids, prefill, dtype)
    decode_module._decode_blocks.clear()
    return fast[1:], plain[1:]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpt_oss_mxfp4_moe_block_matches_the_modules(gpt_oss_checkpoint, monkeypatch, dtype):
    # sink attention with biases over a full cache or a sliding layer's ring; the MXFP4 experts (quantized on
    # load), biased router, clamped SwiGLU (limit 1.5 bites): two calls per layer
    _needs_kernels()
    folder, _ = gpt_oss_checkpoint
    ours = load_model(folder, dtype=dtype, quant="mxfp4")
    calls = _count_blocks(monkeypatch)
    # 4 prefilled + 16 decoded tokens: the sliding layers' rings (window 6) wrap twice
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    fast, plain = _fused_vs_modules(ours, ids, 4, torch_dtype, monkeypatch)
    assert calls["gptoss_moe"] == calls["sink_attn"] == 16 * ours.config.num_hidden_layers
    tol = 1e-5 if dtype == "fp32" else BF16_TOL
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, tol, f"gpt-oss {dtype} decode step {i}")


@pytest.mark.parametrize("name", ["gpt-oss-mxfp4", "gpt-oss-q8_0"])
def test_gpt_oss_gguf_experts_run_in_the_moe_block(monkeypatch, name):
    # a llama.cpp gpt-oss file's experts (MXFP4 or Q8_0 blocks, gate/up/down apart): the MoE block runs them as
    # their projections' kernels (their int8-activation path in bf16), as the modules compute them
    from ember.loading.gguf import load_gguf_model
    from test_gguf_families import DATA

    _needs_kernels()
    ours = load_gguf_model(DATA / f"{name}.gguf", dtype="bf16")
    calls = _count_blocks(monkeypatch)
    ids = torch.randint(0, ours.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(5))
    fast, plain = _fused_vs_modules(ours, ids, 4, torch.bfloat16, monkeypatch)
    assert calls["gptoss_moe"] == 10 * ours.config.num_hidden_layers
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, 0.04, f"{name} bf16 decode step {i}")  # logits <= ~0.4: bf16 roundings move ~1e-2


def test_gpt_oss_sink_attention_block_matches_hf(gpt_oss_checkpoint, monkeypatch):
    # float experts (no MoE block): the attention blocks alone, fp32 against HF past the window
    _needs_kernels()
    folder, hf = gpt_oss_checkpoint
    ours = load_model(folder, dtype="fp32")
    calls = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 20, 8, "gpt-oss")
    assert calls["blocks"] == 14 * ours.config.num_hidden_layers and calls["steps"] == 0


@pytest.mark.parametrize("name", ["glm4_moe", "glm4_moe-qknorm", "deepseek_v3", "deepseek_v3-noqlora", "deepseek_v3-yarn",
                                  "deepseek_v3-6heads"])
def test_sigmoid_routed_moe_block_matches_hf(checkpoint, monkeypatch, name):
    # group-limited sigmoid routing with correction bias, routed scaling and shared experts in the MoE block
    # (one group in glm4_moe-qknorm); fp32 against HF at every decode step
    _needs_kernels()
    folder, hf = checkpoint(name)
    ours = load_model(folder, dtype="fp32")
    steps = _count_kernel_attention(monkeypatch)
    calls = _count_blocks(monkeypatch)
    _decode_matches_hf(ours, hf, 16, 3, name)
    n = ours.config.num_hidden_layers
    moe_layers = sum(ours.config.is_moe_layer(i) for i in range(n))
    assert 0 < moe_layers < n
    # DeepSeek's latent attention (absorbed, over the latent cache) or GLM's partial-RoPE attention (q/k/v bias,
    # q/k norms), the dense and MoE blocks and the head: one call a step
    assert steps["returned"] == [2 * n + 1] * 10 and not calls


def test_minimax_m2_blocks_match_hf(checkpoint, monkeypatch):
    # q/k RMSNorm over all heads' channels at once, RoPE on half of each head, the sigmoid router of the model's
    # dtype with its correction bias (top-3 of 8, renormalised): every layer and the head in one call a step
    _needs_kernels()
    folder, hf = checkpoint("minimax_m2")
    ours = load_model(folder, dtype="fp32")
    steps = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 16, 5, "minimax_m2")
    assert steps["returned"] == [2 * ours.config.num_hidden_layers + 1] * 10


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3-6heads", "glm4_moe-qknorm", "minimax_m2", "gemma2"])
def test_family_bf16_blocks_match_the_modules(checkpoint, monkeypatch, name):
    _needs_kernels()
    folder, _ = checkpoint(name)
    ours = load_model(folder, dtype="bf16")
    ids = torch.randint(3, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    fast, plain = _fused_vs_modules(ours, ids, 6, torch.bfloat16, monkeypatch)
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, BF16_TOL, f"{name} bf16 decode step {i}")


def test_qwen35_mlp_block_beside_the_delta_net_matches_hf(tmp_path, monkeypatch):
    # Qwen3.5's dense layers: the Gated DeltaNet / gated attention as modules, the (1 + w)-normed SwiGLU half in
    # its block; fp32 against HF at every decode step
    from test_hybrid import _hf_model

    _needs_kernels()
    hf = _hf_model("qwen3_5_text")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype="fp32")
    calls = _count_blocks(monkeypatch)
    _decode_matches_hf(ours, hf, 14, 5, "qwen3.5")
    assert calls["mlp"] == 8 * ours.config.num_hidden_layers


def test_nemotron_h_relu2_mlp_layer_block_matches_hf(tmp_path, monkeypatch):
    # Nemotron-H's MLP layers (fp32-product norm, down(relu(up)^2)) in the MLP block; Mamba-2, attention and MoE
    # layers as modules; fp32 against HF at every decode step
    from test_nemotron_h import _hf_model as nemotron

    _needs_kernels()
    hf = nemotron()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype="fp32")
    calls = _count_blocks(monkeypatch)
    _decode_matches_hf(ours, hf, 14, 5, "nemotron-h")
    assert calls["mlp"] == 8 * ours.config.layer_types.count("mlp")


def test_hybrid_bf16_mlp_blocks_match_the_modules(tmp_path, monkeypatch):
    from test_nemotron_h import _hf_model as nemotron

    _needs_kernels()
    nemotron().save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype="bf16")
    ids = torch.randint(3, 256, (1, 14), generator=torch.Generator().manual_seed(4))
    fast, plain = _fused_vs_modules(ours, ids, 6, torch.bfloat16, monkeypatch)
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, BF16_TOL, f"nemotron-h bf16 decode step {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["deepseek_v3-6heads", "deepseek_v3-8heads"])
def test_mla_block_makes_q_b_per_head_with_the_whole_products_bits(checkpoint, monkeypatch, name, dtype):
    # With more than one block of 4 heads, a plain q_b is made per block inside the latent attention's parallel
    # region; a q_b the kernel must run whole (here: the same weight with a zero bias) takes the separate product.
    # Both give the same bits: the block's output, the latent and the rotated key it caches (6 heads: a short
    # last block).
    from ember.runtime.blocks import _mla_kernels
    from test_families import CASES

    _needs_kernels()
    cls, extra, model_cls = CASES["deepseek_v3"]
    monkeypatch.setitem(CASES, "deepseek_v3-8heads", (cls, {**extra, "num_attention_heads": 8}, model_cls))
    folder, _ = checkpoint(name)
    ours = load_model(folder, dtype="bf16" if dtype is torch.bfloat16 else "fp32")
    layer = ours.model.layers[1]
    attn, pre = layer.self_attn, layer.input_layernorm
    x = torch.randn(1, 1, ours.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    ks = _mla_kernels(attn, pre, x[0])
    assert ks is not None and "q_b" in ks
    w = attn.q_b_proj.weight.detach()
    whole = dict(ks, q_b=kernels.dense_kernel(w, torch.zeros(w.shape[0], dtype=dtype)))
    pos, max_len = 9, 16
    gen = torch.Generator().manual_seed(4)
    lat = torch.randn(1, 1, max_len, attn.r, generator=gen).to(dtype)
    rot = torch.randn(1, 1, max_len, attn.dr, generator=gen).to(dtype)
    theta = torch.arange(attn.dr // 2, dtype=torch.float32) * 0.37 + pos * 0.11
    cos, sin = torch.cat([theta.cos()] * 2).to(dtype), torch.cat([theta.sin()] * 2).to(dtype)
    outs = []
    for k in (ks, whole):
        block = kernels.mla_block_kernel(attn, pre, k)
        xs, ls, rs = x.reshape(-1).clone(), lat.clone(), rot.clone()
        assert kernels.run_attn_block(block, xs, cos, sin, ls, rs, pos)
        outs.append((xs, ls, rs))
    assert not torch.equal(outs[0][0], x.reshape(-1))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
