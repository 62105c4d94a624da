"""GGUF files whose ``nextn`` block (multi-token prediction) llama.cpp's converter wrote: the block is read back
as the checkpoint's ``mtp.*`` head and proposes under ``--speculate mtp``.

``tests/data/gguf_hybrid/qwen35-mtp-f32.gguf`` is a tiny Qwen3.5 checkpoint with a random MTP head converted by
``convert_hf_to_gguf.py`` (``scripts/make_gguf_hybrid_fixtures.py``); its ``.npz`` holds the head's HF tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ember

pytest.importorskip("gguf")
from ember.loading.gguf import load_gguf_model  # noqa: E402

FILE = Path(__file__).parent / "data" / "gguf_hybrid" / "qwen35-mtp-f32.gguf"


def test_nextn_block_is_the_checkpoints_mtp_head():
    """Every head tensor comes back under its HF name with the converter's changes undone (the +1 of the Qwen
    norms, eh_proj for fc), and nothing else is left over."""
    want = dict(np.load(FILE.with_suffix(".npz")))
    got = load_gguf_model(FILE, dtype="fp32").extra_weights
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        torch.testing.assert_close(got[name], torch.from_numpy(ref), atol=1e-6, rtol=0, msg=name)


def test_gguf_mtp_greedy_equals_plain():
    llm = ember.load(FILE, device="cpu", dtype="fp32", check_memory=False)
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = llm.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
    for k in (1, 3):
        llm.speculate("mtp", num_speculative=k, adaptive=False)
        try:
            out = llm.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True)
        finally:
            llm.speculate()
        assert out.token_ids == ref, k
        assert out.stats.speculation.proposed > 0
