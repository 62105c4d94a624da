"""The fused one-sequence CPU decode blocks for the families beyond Llama's pieces: Gemma 2/3's sandwich (1 + w)
norms, GeGLU, query scale and per-layer sliding/global attention with their own RoPE tables, exact against HF in
fp32 and against the plain modules in bf16, past the sliding window."""

from __future__ import annotations

import pytest
import torch

import ember.runtime
from ember.loading import load_model
from test_families import checkpoint  # noqa: F401  (the fixture: tiny HF checkpoints per family)
from test_model import BF16_TOL, _count_kernel_attention, _decode_matches_hf, _decode_steps, assert_close
from test_runtime import _needs_kernels


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3_text-softcap"])
def test_gemma3_decode_runs_every_layer_in_one_call_and_matches_hf(checkpoint, monkeypatch, name):
    # 3 layers (sliding, full, sliding; window 8, local and global RoPE bases), 6 prefilled + 14 decoded tokens:
    # the sliding layers' blocks drop keys from step 3 on
    _needs_kernels()
    folder, hf = checkpoint(name)
    ours = load_model(folder, dtype="fp32")
    calls = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 20, 4, name)
    n = ours.config.num_hidden_layers
    assert calls["steps"] == 14 and calls["returned"] == [2 * n] * 14  # every layer's two blocks, each step
    assert calls["heads"] == 0  # Gemma's (1 + w) final norm and capped head run as modules


def test_gemma2_soft_capped_attention_runs_as_its_modules(checkpoint, monkeypatch):
    # attention logit soft-capping has no kernel: the layers run as modules, still exact
    _needs_kernels()
    folder, hf = checkpoint("gemma2")
    ours = load_model(folder, dtype="fp32")
    calls = _count_kernel_attention(monkeypatch)
    _decode_matches_hf(ours, hf, 16, 2, "gemma2")
    assert calls["blocks"] == 0


def test_gemma3_bf16_blocks_match_the_plain_modules(checkpoint):
    _needs_kernels()
    folder, _ = checkpoint("gemma3_text")
    ours = load_model(folder, dtype="bf16")
    ids = torch.randint(3, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(7))
    fast = _decode_steps(ours, ids, 6, torch.bfloat16)
    ember.runtime.uninstall()
    try:
        plain = _decode_steps(ours, ids, 6, torch.bfloat16)
    finally:
        ember.runtime.install()
    for i, (a, b) in enumerate(zip(fast[1:], plain[1:])):
        assert_close(a, b, BF16_TOL, f"gemma3 bf16 decode step {i}")
