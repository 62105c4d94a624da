"""Generation end to end through ``ember.load``: greedy parity with HF ``generate``, batches, sampling, stops."""

from __future__ import annotations

import pytest
import torch

import ember
from conftest import FAMILIES
from ember.errors import GenerationError, SamplingError
from ember.sampling import SamplingParams


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """HF generate, greedy, exactly n tokens (EOS does not stop it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_32_tokens_identical_to_hf_generate(hf_checkpoint, family):
    folder, hf = hf_checkpoint(family)
    hf.generation_config.eos_token_id = None
    llm = ember.load(folder, device="cpu", dtype="fp32")
    prompt = torch.randint(3, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_greedy(hf, prompt, 32)
    got = llm.generate(prompt, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert got.token_ids == ref, f"{family}: first difference at {next(i for i, (a, b) in enumerate(zip(got.token_ids, ref)) if a != b)}"
    assert got.finish_reason == "length"


def test_batch_of_different_lengths_equals_one_at_a_time(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen3")
    llm = ember.load(folder, dtype="fp32")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 17, 9)]
    batch = llm.generate(prompts, max_new_tokens=20, temperature=0.0, ignore_eos=True)
    for p, b in zip(prompts, batch):
        alone = llm.generate(p, max_new_tokens=20, temperature=0.0, ignore_eos=True)
        assert b.token_ids == alone.token_ids


def test_text_prompt_and_streaming(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    chunks = list(llm.stream("w10 w11 w12", max_new_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(chunks) == 8
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats is not None
    stats = chunks[-1].stats
    assert stats.prompt_tokens == 3 and stats.generated_tokens == 8 and stats.decode_steps == 7
    assert stats.peak_memory_bytes > 0
    text = "".join(c.text for c in chunks)
    assert text == llm.tokenizer.decode([c.token_id for c in chunks], skip_special_tokens=True)


def test_eos_stops_generation(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    free = llm.generate("w5 w6", max_new_tokens=16, temperature=0.0, ignore_eos=True)
    # make the 4th generated token a stop id: generation must end there with finish_reason "stop"
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    res = llm.generate("w5 w6", max_new_tokens=16, temperature=0.0, stop_token_ids=[stop_id])
    assert res.token_ids == free.token_ids[:first + 1] and res.finish_reason == "stop"


def test_stop_string_truncates_and_is_never_streamed(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    free = llm.generate("w7 w8", max_new_tokens=12, temperature=0.0, ignore_eos=True)
    words = free.text.split()
    stop = " ".join(words[4:6])  # a two-token stop string in the middle of the output
    chunks = list(llm.stream("w7 w8", max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]))
    streamed = "".join(c.text for c in chunks)
    assert stop not in streamed
    assert free.text.startswith(streamed) and streamed == free.text[: free.text.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_same_seed_same_text_different_seed_differs(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    kw = dict(max_new_tokens=24, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = llm.generate("w3 w4", seed=1, **kw).token_ids
    b = llm.generate("w3 w4", seed=1, **kw).token_ids
    c = llm.generate("w3 w4", seed=2, **kw).token_ids
    assert a == b and a != c


def test_context_overflow_names_both_numbers(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    with pytest.raises(GenerationError, match=r"prompt \(3 tokens\) \+ max new tokens \(600\).*context of 512"):
        llm.generate("w3 w4 w5", max_new_tokens=600)


def test_bad_sampling_value_is_named(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    with pytest.raises(SamplingError, match="top_p"):
        llm.generate("w3", top_p=1.5)


def test_repetition_penalty_changes_greedy_output_as_hf(hf_checkpoint):
    folder, hf = hf_checkpoint("llama")
    hf.generation_config.eos_token_id = None
    llm = ember.load(folder, dtype="fp32")
    prompt = [5, 9, 5, 9, 5, 9]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=16,
                          do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    got = llm.generate(prompt, max_new_tokens=16, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    assert got.token_ids == ref
