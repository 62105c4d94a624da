"""CUDA paths (skipped without a GPU): the same parity checks as on CPU."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.loading import load_model
from test_model import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_cuda_logits_match_hf(hf_checkpoint, family):
    folder, hf = hf_checkpoint(family)
    ours = load_model(folder, device="cuda", dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.cuda()(ids.cuda()).logits
        assert_close(ours(ids.cuda()), ref, 1e-4, f"{family} cuda fp32")
    hf.cpu()


def test_cuda_bf16_generation_runs_and_is_deterministic(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, device="cuda", dtype="bf16")
    a = llm.generate(["w3 w4", "w5 w6 w7 w8"], max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    b = llm.generate(["w3 w4", "w5 w6 w7 w8"], max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].stats.peak_memory_bytes > 0
