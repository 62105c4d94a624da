"""Gemma 4's fused one-sequence CPU decode: dense layers (plain-weight sandwich and q/k norms, the weightless value
norm, scale 1, full layers with their own head size and proportional RoPE, k = v, GeGLU, the layer scalar) and the
head (plain-weight final norm, final-logit cap) in one whole-step call, exact against HF in fp32 and against the
plain modules in bf16, past the sliding window. Layers with per-layer inputs, shared keys/values or experts run as
their modules (still exact). The verification rows call (``ember_decode_rows_v``) for the attention variants
(Gemma 2/3/4, GLM-4.5's partial RoPE, MiniMax-M2's whole-projection q/k norms) gives each row its one-token step's
bits."""

from __future__ import annotations

import pytest
import torch

from ember.loading import load_model
from test_families import checkpoint as gemma_family  # noqa: F401  (tiny HF Gemma 2/3 checkpoints)
from test_fused_families import check_bf16_blocks_match_modules, fp32_decode_calls
from test_gemma4 import checkpoint  # noqa: F401  (the fixture: tiny HF Gemma 4 checkpoints)
from test_runtime import _needs_kernels
from test_speculative import check_rows_as_steps


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


@pytest.mark.parametrize("name", ["gemma4:dense-keqv", "gemma4:dense", "families:gemma3_text", "families:gemma2",
                                  "families:gemma3_text-softcap", "families:glm4_moe", "families:glm4_moe-qknorm",
                                  "families:minimax_m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_verification_rows_round_as_one_token_steps(checkpoint, gemma_family, name, dtype, monkeypatch):
    """A 5-row pass (inside the sliding window) through ``ember_decode_rows_v`` gives each row the logits, bit for
    bit, and writes the cache slots that one-token steps give it: Gemma 2/3/4's norms, local RoPE tables, scales,
    soft-caps, GeGLU, layer scalars and capped heads, GLM-4.5's partial RoPE and MiniMax-M2's whole-projection q/k
    norms in their rows form."""
    from ember import kernels

    _needs_kernels()
    ran = []
    real = kernels.run_decode_rows
    monkeypatch.setattr(kernels, "run_decode_rows", lambda *a: ran.append(real(*a)) or ran[-1])
    source, case = name.split(":")
    folder, _ = (checkpoint if source == "gemma4" else gemma_family)(case)
    check_rows_as_steps(load_model(folder, dtype=dtype), dtype, [5, 17], [7, 99, 3, 150, 41])
    assert ran and all(ran), "the pass did not run through the rows kernels"

