"""Gemma 4's fused one-sequence CPU decode: dense layers (plain-weight sandwich and q/k norms, the weightless value
norm, scale 1, full layers with their own head size and proportional RoPE, k = v, GeGLU, the layer scalar) and the
head (plain-weight final norm, final-logit cap) in one whole-step call, exact against HF in fp32 and against the
plain modules in bf16, past the sliding window. Layers with per-layer inputs, shared keys/values or experts run as
their modules (still exact)."""

from __future__ import annotations

import pytest

from ember.loading import load_model
from test_fused_families import check_bf16_blocks_match_modules, fp32_decode_calls
from test_gemma4 import checkpoint  # noqa: F401  (the fixture: tiny HF Gemma 4 checkpoints)
from test_runtime import _needs_kernels


@pytest.mark.parametrize("name", ["dense-keqv", "dense", "moe", "ple-shared"])
def test_gemma4_decode_matches_hf_with_dense_layers_and_head_in_one_call(checkpoint, monkeypatch, name):
    # 6 layers (sliding head 16, full head 32 with a quarter of its pairs turning), window 8, cap 30: 6 prefilled
    # + 14 decoded tokens; the dense models run every layer's two blocks and the head each step, the others none
    calls, n = fp32_decode_calls(checkpoint, monkeypatch, name)
    if name.startswith("dense"):
        assert calls["steps"] == 14 and calls["returned"] == [2 * n + 1] * 14 and calls["heads"] == 14
    else:
        assert calls["blocks"] == 0 and calls["heads"] == 0


def test_gemma4_bf16_blocks_match_the_plain_modules(checkpoint):
    _needs_kernels()
    folder, _ = checkpoint("dense-keqv")
    check_bf16_blocks_match_modules(load_model(folder, dtype="bf16"), "gemma4")
