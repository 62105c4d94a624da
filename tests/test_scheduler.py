"""Continuous batching over the paged KV cache, without HTTP: every sequence's tokens equal
``Engine.generate`` run alone, whatever the batch, chunking, prefix sharing or block pressure."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.errors import GenerationError, QueueFullError
from ember.cache import BlockPool
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqRequest


def prompts(seed: int = 1, lengths=(3, 17, 40, 9, 33, 16, 1, 70)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    if len(out) > 2 and len(out[2]) > 33:
        out.append(out[2][:33] + [5, 6])  # shares 4 blocks of 8 with prompt 2
    return out


def run(sched: BatchScheduler, ps: list[list[int]], params: list[SamplingParams]) -> dict[int, list]:
    events: dict[int, list] = {}
    reqs = [SeqRequest(p, sp, on_event=lambda ev: events.setdefault(ev.seq_id, []).append(ev))
            for p, sp in zip(ps, params)]
    ids = sched.submit(reqs)
    sched.run_until_idle()
    return [events[i] for i in ids]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])  # mistral: sliding window 8 < prompt lengths
def test_ragged_batches_equal_generate_alone(hf_checkpoint, family):
    folder, _ = hf_checkpoint(family)
    llm = ember.load(folder, dtype="fp32")
    # small blocks, a small batch and a small prefill budget: sequences join, chunk and leave at many steps
    sched = BatchScheduler(llm, max_batch=4, num_blocks=64, block_size=8, prefill_chunk=24)
    for t in sched.cache.k + sched.cache.v:  # the pool is uninitialised memory: garbage must never be read
        t[8:] = float("nan")
    ps = prompts()
    params = [SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True) for _ in ps]
    out = run(sched, ps, params)
    for p, evs in zip(ps, out):
        want = llm.generate(p, max_new_tokens=20, temperature=0.0, ignore_eos=True)
        assert [e.token_id for e in evs] == want.token_ids, f"prompt of {len(p)} tokens"
        assert "".join(e.text for e in evs) == want.text and evs[-1].finish_reason == "length"
    m = sched.metrics()
    assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["running"] == 0 and m["kv_blocks_reserved"] == 0
    if family == "mistral":  # every layer slides: its blocks go back to the window pool, so no prefix cache
        assert m["prefix_hit_tokens"] == 0 and m["kv_window_blocks_free"] == m["kv_window_blocks_total"]
    else:
        assert m["prefix_hit_tokens"] >= 32  # the last prompt reused prompt 2's first 4 blocks


def test_sampling_penalties_and_stops_equal_generate(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    sched = BatchScheduler(llm, max_batch=8, num_blocks=128, block_size=16)
    ps = prompts(2, (5, 12, 30, 7))
    kinds = [dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.0, repetition_penalty=1.3),
             dict(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5), dict(temperature=0.7, top_k=20, seed=9)]
    params = [SamplingParams(max_new_tokens=16, ignore_eos=True, **k) for k in kinds]
    for p, sp, evs in zip(ps, params, run(sched, ps, params)):
        want = llm.generate(p, sp)
        assert [e.token_id for e in evs] == want.token_ids


def test_prefix_is_computed_once_for_simultaneous_requests(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    sched = BatchScheduler(llm, max_batch=8, num_blocks=64, block_size=16)
    p = prompts(3, (50,))[0]
    params = [SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True) for _ in range(4)]
    out = run(sched, [p] * 4, params)
    assert [e[-1].cached_tokens for e in out] == [0, 48, 48, 48]
    assert len({tuple(e.token_id for e in evs) for evs in out}) == 1
    # freed blocks stay findable: a later identical prompt reuses them too
    again = run(sched, [p], params[:1])
    assert again[0][-1].cached_tokens == 48 and [e.token_id for e in again[0]] == [e.token_id for e in out[0]]


def test_pool_pressure_waits_instead_of_failing(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    # 9 usable blocks of 8 tokens: only two 30-token sequences fit at once
    sched = BatchScheduler(llm, max_batch=8, num_blocks=10, block_size=8)
    ps = prompts(4, (10, 12, 14, 9, 11))
    params = [SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True) for _ in ps]
    for p, evs in zip(ps, run(sched, ps, params)):
        assert [e.token_id for e in evs] == llm.generate(p, max_new_tokens=20, temperature=0.0, ignore_eos=True).token_ids
    with pytest.raises(GenerationError, match=r"prompt \(10 tokens\) \+ max tokens \(70\)"):
        sched.submit([SeqRequest(ps[0], SamplingParams(max_new_tokens=70))])


def test_cancel_frees_blocks_and_queue_is_bounded(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    sched = BatchScheduler(llm, max_batch=2, max_queue=1, num_blocks=64, block_size=8)
    sp = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    seen: list = []
    ids = sched.submit([SeqRequest([5, 6, 7], sp, on_event=seen.append) for _ in range(3)])  # 2 run, 1 waits
    with pytest.raises(QueueFullError):
        sched.submit([SeqRequest([5], sp)])
    for _ in range(3):
        sched.step()
    assert sched.metrics()["kv_blocks_free"] < sched.metrics()["kv_blocks_total"]
    for i in ids:
        sched.cancel(i)
    sched.step()
    m = sched.metrics()
    assert m["running"] == 0 and m["waiting"] == 0 and m["cancelled"] == 3
    assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["kv_blocks_reserved"] == 0
    assert all(ev.finish_reason is None for ev in seen)  # cancelled sequences send nothing more


def test_block_pool_refcounts_and_prefix_reuse():
    pool = BlockPool(4, 16)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (1, 2) and pool.num_free == 1
    pool.register(a, ("k",))
    pool.acquire(a)
    pool.release(a)
    assert pool.num_free == 1  # still owned once
    pool.release(a)
    assert pool.num_free == 2 and pool.lookup(("k",)) == a  # free but findable
    pool.acquire(a)
    assert pool.num_free == 1
    pool.release(a)
    pool.release(b)
    c, d = pool.allocate(), pool.allocate()  # uncached blocks go first, then the cached one is reclaimed
    assert {c, d} == {2, 3}
    assert pool.allocate() == a and pool.lookup(("k",)) is None
