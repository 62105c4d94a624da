"""Per-layer state kinds (ember/cache.py): sliding-window KV keeps only the window and attends as full KV
restricted to it; recurrent-state slots are admitted zeroed and retired for reuse; the byte prices equal what
the caches allocate; the scheduler admits by state slots as well as blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ember
from ember.cache import (LayerSpec, PagedKVCache, RecurrentStateSlots, SlidingWindowKV, StaticKVCache,
                         bytes_per_sequence, bytes_per_token, cache_bytes, layer_specs)
from ember.config import ModelConfig
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqRequest

B, NKV, HD = 2, 2, 8


def _full_attention(q, k, v, window):
    """Reference: every key kept, the window applied as a mask. q (B, n, T, hd) at the last T positions."""
    T, S = q.shape[2], k.shape[2]
    qp = torch.arange(S - T, S)[:, None]
    kp = torch.arange(S)[None, :]
    mask = (kp <= qp) & (qp - kp < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("window,chunks", [(5, [7, 1, 1, 3, 1, 6, 1]), (1, [3, 1, 2]), (16, [4, 4, 1])])
def test_sliding_window_equals_full_kv_restricted_to_the_window(window, chunks):
    torch.manual_seed(0)
    n = sum(chunks)
    k_all, v_all, q_all = (torch.randn(B, NKV, n, HD, dtype=torch.float64) for _ in range(3))
    ring = SlidingWindowKV(B, NKV, HD, window, torch.float64)
    pos = 0
    for T in chunks:
        sl = slice(pos, pos + T)
        keys, values, kpos = ring.update(k_all[:, :, sl], v_all[:, :, sl])
        assert keys.shape[2] == min(pos, window - 1) + T  # never more than the window before the new tokens
        assert kpos.tolist() == list(range(pos - min(pos, window - 1), pos + T))
        got = F.scaled_dot_product_attention(q_all[:, :, sl], keys, values, attn_mask=ring.mask(kpos, T))
        ref = _full_attention(q_all[:, :, sl], k_all[:, :, :pos + T], v_all[:, :, :pos + T], window)
        assert torch.allclose(got, ref, atol=1e-12), f"chunk at {pos}: {(got - ref).abs().max():.3g}"
        pos += T
    assert ring.nbytes() == 2 * B * NKV * window * HD * 8  # the ring only, whatever the length


def test_recurrent_slots_are_admitted_zeroed_and_retired_for_reuse():
    specs = [LayerSpec("full_attention", NKV, HD), LayerSpec("recurrent", state_shapes=((6, 3), (2, 4, 4)))]
    slots = RecurrentStateSlots(specs, max_seqs=2)
    assert slots.layers == [1] and slots.num_free == 2
    a, b = slots.admit(), slots.admit()
    assert a != b and slots.num_free == 0
    with pytest.raises(RuntimeError, match="slots are taken"):
        slots.admit()
    conv, ssm = slots.gather(1, [b, a])
    slots.scatter(1, [b, a], [conv + torch.tensor([[[1.0]], [[2.0]]]), ssm + 5])
    conv, ssm = slots.gather(1, [a, b])
    assert conv[0].eq(2).all() and conv[1].eq(1).all() and ssm.eq(5).all()  # each sequence its own rows
    slots.retire(a)
    with pytest.raises(ValueError, match="not in use"):
        slots.retire(a)
    c = slots.admit()
    assert c == a and slots.gather(1, [c])[0].eq(0).all()  # a reused slot starts from the zero state
    assert slots.gather(1, [b])[1].eq(5).all()  # the other sequence's state is untouched
    assert slots.nbytes() == 2 * bytes_per_sequence(specs[1], torch.float32, 0)


def test_byte_prices_equal_what_the_caches_allocate():
    cfg = ModelConfig.from_dict(dict(model_type="mistral", vocab_size=64, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                     sliding_window=8))
    specs = layer_specs(cfg)
    assert [s.kind for s in specs] == ["sliding_attention"] * 3 and specs[0].window == 8
    # the static cache keeps each sliding layer's window (a ring): its bytes are the capped price, 8 of 20 tokens;
    # made with windows=False (a draft's cache) or no longer than the window, every slot: the uncapped price
    assert StaticKVCache(cfg, 3, 20, torch.bfloat16, "cpu").nbytes() == cache_bytes(cfg, torch.bfloat16, 20, 3) \
        == 3 * 3 * 8 * bytes_per_token(specs[0], torch.bfloat16)
    assert StaticKVCache(cfg, 3, 20, torch.bfloat16, "cpu", windows=False).nbytes() \
        == cache_bytes(cfg, torch.bfloat16, 20, 3, cap_window=False) == 3 * 3 * 20 * bytes_per_token(specs[0], torch.bfloat16)
    assert not StaticKVCache(cfg, 1, 8, torch.bfloat16, "cpu").rings
    pool = PagedKVCache(cfg, 5, 4, torch.float32)
    assert pool.nbytes() == 5 * 4 * PagedKVCache.bytes_per_token(cfg, torch.float32)
    assert pool.blocks_for(9) == 3 and pool.states is None
    assert bytes_per_token(LayerSpec("recurrent", state_shapes=((4,),)), torch.float32) == 0
    with pytest.raises(ValueError, match="positive window"):
        LayerSpec("sliding_attention", NKV, HD)


def test_scheduler_admits_by_recurrent_state_slots(hf_checkpoint):
    # a pool of 2 state slots with 4 batch slots: at most 2 sequences run at once, each slot is given back,
    # and every sequence's tokens are those of generate alone
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, dtype="fp32")
    sched = BatchScheduler(llm, max_batch=4, num_blocks=64, block_size=8)
    specs = [LayerSpec("recurrent", state_shapes=((3,),))]
    sched.cache.states = RecurrentStateSlots(specs, max_seqs=2)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[5 + i, 9, 11 + i] for i in range(5)]
    out: dict[int, list[int]] = {}
    most = []
    reqs = [SeqRequest(p, params, on_event=lambda ev: out.setdefault(ev.seq_id, []).append(ev.token_id))
            for p in prompts]
    ids = sched.submit(reqs)
    while sched.step() or sched._inbox:
        most.append(len(sched.running))
        assert sched.cache.states.num_free == 2 - len(sched.running)
    assert max(most) == 2 and sched.cache.states.num_free == 2
    for i, p in zip(ids, prompts):
        assert out[i] == llm.generate(p, params).token_ids
