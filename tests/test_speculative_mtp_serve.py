"""``ember serve --speculate mtp``: each running sequence's MTP head proposes inside continuous batching, fed the
main model's hidden states from the scheduler's own forwards (its columns of each left-padded batch), with its own
head cache beside the paged cache. Greedy served text equals plain serving; a head fitted to the target's
continuations keeps most proposals at 4 streams (a head fed another row's or position's state would not); a
cancelled sequence's head cache is freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import ember
from ember.sampling import SamplingParams
from test_speculative import _serve
from test_speculative_mtp import _train_head, _with_mtp

pytest.importorskip("transformers")

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _served(llm, ps, **spec):
    llm.speculate(**spec) if spec else llm.speculate()
    try:
        return _serve(llm, ps, [(GREEDY, None)] * len(ps))
    finally:
        llm.speculate()


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])  # Qwen3.5's mtp.* layout; DeepSeek's layer N (MLA, MoE)
@pytest.mark.parametrize("streams,dtype", [(1, "fp32"), (4, "fp32"), (4, "bf16")])
def test_served_mtp_equals_plain(tmp_path, family, streams, dtype):
    """bf16 at 4 streams: near ties in the random model, split alike only if every verified row rounds as its
    plain step does (products and attention)."""
    llm = ember.load(_with_mtp(tmp_path, family), device="cpu", dtype=dtype, check_memory=False)
    for seed in (3, 0) if dtype == "bf16" else (3,):
        ps = _prompts((9, 17, 4, 12)[:streams], seed)
        plain, _ = _served(llm, ps)
        served, m = _served(llm, ps, method="mtp", num_speculative=2, adaptive=False)
        assert served == plain, seed
        assert m["speculative_proposed"] > 0
    assert llm.model.hidden_tap is None  # the scheduler's forwards take their tap away


def test_served_trained_head_is_accepted(tmp_path):
    """Prompts of different lengths (ragged prefill and verification rows): every sequence is fed its own rows."""
    llm = ember.load(_with_mtp(tmp_path, "llama"), device="cpu", dtype="fp32", check_memory=False)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 256, (6,)).tolist() for _ in range(8)]
    assert _train_head(llm, prompts) < 1.5
    # stream i: prompt i and the first i tokens of its greedy continuation (the text the head was fitted on)
    ps = [p + llm.generate(p, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids[:i]
          for i, p in enumerate(prompts[:4])]
    plain, _ = _served(llm, ps)
    served, m = _served(llm, ps, method="mtp", num_speculative=2, adaptive=False)
    assert served == plain
    assert m["speculative_accepted"] > 0.6 * m["speculative_proposed"] > 0, m


def test_cancel_frees_the_head_cache(tmp_path):
    from ember.scheduler import BatchScheduler, SeqRequest

    llm = ember.load(_with_mtp(tmp_path, "qwen3"), device="cpu", dtype="fp32", check_memory=False)
    llm.speculate("mtp", num_speculative=2, adaptive=False)
    try:
        sched = BatchScheduler(llm, max_batch=2, num_blocks=32, block_size=8)
        sid, other = sched.submit([SeqRequest(p, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
                                   for p in _prompts((7, 5))])
        for _ in range(4):
            sched.step()
        seq = sched._by_id[sid]
        head_cache = weakref.ref(seq.spec.proposer.cache)
        sched.cancel(sid)
        sched.step()
        gc.collect()
        assert seq.spec is None and head_cache() is None
        sched.run_until_idle()
        m = sched.metrics()
        assert m["cancelled"] == 1 and m["kv_blocks_free"] == m["kv_blocks_total"]
    finally:
        llm.speculate()


@pytest.mark.parametrize("streams", [1, 4])
def test_served_recurrent_mtp_equals_plain(tmp_path, streams):
    """Qwen3.5 (Gated DeltaNet layers and its MTP head) served with speculation: a sequence whose proposal is
    rejected gets its recurrent-state slot back and runs its kept tokens again, so the text is plain serving's."""
    llm = ember.load(_with_mtp(tmp_path, "qwen3_5_text"), device="cpu", dtype="fp32", check_memory=False)
    ps = _prompts((9, 17, 4, 12)[:streams])
    plain, _ = _served(llm, ps)
    served, m = _served(llm, ps, method="mtp", num_speculative=2, adaptive=False)
    assert served == plain
    assert m["speculative_proposed"] > m["speculative_accepted"], m  # rejections: the rollback ran


def test_serve_command_takes_speculate_mtp(tmp_path):
    """``ember serve MODEL --speculate mtp`` builds an engine whose scheduler runs the head (no refusal)."""
    from ember.cli import build_parser
    from ember.commands.serve import load_engine
    from ember.scheduler import BatchScheduler

    folder = _with_mtp(tmp_path, "deepseek_v3")
    engine = load_engine(build_parser().parse_args(["serve", str(folder), "--speculate", "mtp"]))
    assert engine.speculation.method == "mtp" and engine.speculation.num_speculative == 1
    sched = BatchScheduler(engine, max_batch=2, num_blocks=32, block_size=8)
    assert sched.speculator is not None
