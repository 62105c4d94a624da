"""Serving with speculation verifies every sequence's proposals in one forward whose products run the few-row
kernel of generate's verification (``ember_linear_rows``: each row rounded as a one-token step), so greedy text
with speculation is plain decoding's, at 1 and 4 streams, in bf16 too."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.runtime import ops
from ember.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("how", ["draft", "ngram"])
def test_served_speculation_equals_plain(hf_checkpoint, dtype, streams, how):
    """Prompts whose bf16 runs meet near ties: a verified row's attention or products rounded otherwise than its
    plain step (over another padding, or several query rows at once) split them."""
    from test_speculative import _serve

    folder, _ = hf_checkpoint("qwen3")
    llm = ember.load(folder, device="cpu", check_memory=False, dtype=dtype)
    for seed in (7, 0, 3, 4)[:1 if streams == 1 else 4]:
        g = torch.Generator().manual_seed(seed)
        ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 17, 4, 12)[:streams]]
        greedy = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
        params = [(greedy, None)] * streams
        plain, _ = _serve(llm, ps, params)
        spec = dict(draft=llm) if how == "draft" else dict(method="ngram")  # the target drafting for itself
        llm.speculate(**spec, num_speculative=3, adaptive=False)
        try:
            served, m = _serve(llm, ps, params)
        finally:
            llm.speculate()
        assert served == plain, seed
        assert m["speculative_proposed"] > 0
        if streams == 1 and how == "draft":  # one row a step: plain step and proposals round as the verification
            assert m["speculative_accepted"] == m["speculative_proposed"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_speculation_on_and_off_keeps_plain_text(hf_checkpoint, monkeypatch, dtype):
    """The batch controller mixes plain steps (plain serving's own forward, outside exact_rows) with
    verification steps, some sequences proposing and others not: the text stays plain serving's."""
    from test_speculative import _serve

    from ember.speculative.batch_control import BatchAdaptiveK

    calls = []
    plan = BatchAdaptiveK.plan

    def every_third_plain(self, accs, budgets):  # steps 0, 3, 6..: plain; else only some sequences propose
        calls.append(len(calls))
        ks, gain = plan(self, accs, budgets)
        n = len(calls)
        return ([0] * len(ks) if n % 3 == 1 else [k if (i + n) % 2 else 0 for i, k in enumerate(ks)]), gain

    monkeypatch.setattr(BatchAdaptiveK, "plan", every_third_plain)
    folder, _ = hf_checkpoint("qwen3")
    llm = ember.load(folder, device="cpu", check_memory=False, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 17, 4, 12)]
    params = [(SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True), None)] * 4
    plain, _ = _serve(llm, ps, params)
    llm.speculate(draft=llm, num_speculative=3, adaptive=False)
    try:
        served, m = _serve(llm, ps, params)
    finally:
        llm.speculate()
    assert served == plain
    assert m["speculative_proposed"] > 0 and len(calls) > 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_rows_products_round_as_one_row(dtype):
    """Inside exact_rows() a multi-row Linear and a fused q/k/v projection give each row the bits of that row
    alone (outside it, the multi-row kernel sums in another order: fp32 rows differ in their last bits)."""
    from ember.models.linear import Linear

    torch.manual_seed(0)
    lins = [Linear(2048, n, bias=n == 256).to(dtype).requires_grad_(False) for n in (512, 256, 256)]
    x = torch.randn(5, 2048).to(dtype)
    with torch.inference_mode():
        alone = [torch.cat([m(x[i:i + 1]) for i in range(5)]) for m in lins]
        plain = lins[0](x)
        with ops.exact_rows():
            rows = lins[0](x)
            projected = ops.project(x, lins)
    assert torch.equal(rows, alone[0]) and all(torch.equal(a, b) for a, b in zip(projected, alone))
    if dtype is torch.float32:
        assert not torch.equal(plain, alone[0])  # what the context changes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_every_row_count_and_shape(dtype):
    """``ember_linear_rows`` groups the activation rows (4-6 in one pass where they fit L1, else threes and pairs, a
    lone last row) over every 4-row weight block: for 2..13 rows, a row count of the output not a multiple of 4,
    and inner sizes on and off the AVX2 kernels' strides, below and above the one-pass limit (fp32 1024, bf16
    2048 values), each row equals ``linear_many`` over that row alone, bit for bit, bias included."""
    from ember.kernels import matmul

    torch.manual_seed(1)
    for O, I in ((13, 96), (8, 48), (7, 40), (6, 1024), (5, 1040), (9, 2048), (5, 2080)):
        ks = [matmul.dense_kernel(torch.randn(O, I).to(dtype), torch.randn(O).to(dtype)),
              matmul.dense_kernel(torch.randn(O + 3, I).to(dtype))]
        if ks[0] is None:
            pytest.skip("native kernels unavailable")
        for M in range(2, 14):
            x = torch.randn(M, I).to(dtype)
            rows = matmul.linear_rows(ks, x)
            assert rows is not None
            for i in range(M):
                alone = matmul.linear_many(ks, x[i:i + 1].clone())
                for a, b in zip(rows, alone):
                    assert torch.equal(a[i], b[0]), f"O={O} I={I} M={M} row {i}"


@pytest.mark.parametrize("how", ["draft", "ngram"])
def test_served_mla_moe_speculation_equals_plain_bf16(tmp_path, how):
    """DeepSeek-V3 layout (MLA attention over a latent cache, group-routed experts) in bf16 at 4 streams: each
    verified row's latent attention runs alone over its own keys and its experts mix as a lone token's do."""
    from test_speculative import _serve
    from test_speculative_mtp import _hf
    from conftest import save_word_tokenizer

    _hf("deepseek_v3").save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    llm = ember.load(tmp_path, device="cpu", check_memory=False, dtype=torch.bfloat16)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    for seed in (0, 1):  # prompts that split near ties before (the latent attention, then the expert sums)
        g = torch.Generator().manual_seed(seed)
        ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 17, 4, 12)]
        plain, _ = _serve(llm, ps, [(greedy, None)] * 4)
        llm.speculate(**(dict(draft=llm) if how == "draft" else dict(method="ngram")), num_speculative=3,
                      adaptive=False)
        try:
            served, m = _serve(llm, ps, [(greedy, None)] * 4)
        finally:
            llm.speculate()
        assert served == plain, seed
        assert m["speculative_proposed"] > 0

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_runs_rows_round_as_one_token_over_their_keys(dtype):
    """Each query row of a left-padded, causally masked batch gets the bits of the one-token kernel over just its
    visible keys: the same row at another padding gives the same bits; a mask with a hole is not taken."""
    from ember import kernels
    from ember.models.attention import build_mask

    g = torch.Generator().manual_seed(0)
    B, T, nh, nkv, hd, S = 3, 4, 4, 2, 32, 23
    q = torch.randn(B, T, nh, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, nkv, S, hd, generator=g).to(dtype) for _ in range(2))
    lengths = [S, 9, 14]  # keys of row b: its last lengths[b] slots (left padding before)
    k_valid = torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]
    mask = build_mask(torch.arange(S - T, S), k_valid, S, None)  # (B, 1, T, S)
    out = kernels.attn_runs(q, k, v, mask)
    assert out is not None and out.shape == (B, T, nh * hd)
    for b, n in enumerate(lengths):
        for t in range(T):
            lo, hi = S - n, S - T + t + 1
            one = kernels.attn_decode(q[b:b + 1, t:t + 1].contiguous(), k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], None)
            assert torch.equal(out[b, t], one[0, 0]), (b, t)
            shifted = torch.zeros(1, nkv, S + 5, hd, dtype=dtype)  # the same keys 5 slots further right
            shifted[..., lo + 5:hi + 5, :] = k[b:b + 1, :, lo:hi]
            shifted_v = torch.zeros_like(shifted)
            shifted_v[..., lo + 5:hi + 5, :] = v[b:b + 1, :, lo:hi]
            m = torch.zeros(1, 1, 1, S + 5, dtype=torch.bool)
            m[..., lo + 5:hi + 5] = True
            again = kernels.attn_runs(q[b:b + 1, t:t + 1].contiguous(), shifted, shifted_v, m)
            assert torch.equal(again[0, 0], out[b, t]), (b, t)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), k.float(), v.float(),
                                                           attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref.transpose(1, 2).reshape(B, T, -1), atol=2e-2, rtol=2e-2)
    holed = mask.expand(B, 1, T, S).clone()
    holed[0, 0, 0, 5] = False  # row 0 sees every slot up to its own
    assert kernels.attn_runs(q, k, v, holed) is None


def test_recurrent_replay_rides_plain_steps(tmp_path, monkeypatch):
    """Qwen3.5 served with n-gram proposals while the controller switches some sequences off: a sequence whose
    state was rolled back feeds its kept tokens again even in a step where it proposes nothing (several tokens
    a row, under the rows kernel), and the text stays plain serving's."""
    import transformers

    from conftest import save_word_tokenizer
    from ember.sampling import SamplingParams
    from ember.speculative.batch_control import BatchAdaptiveK
    from ember.speculative.batched import BatchSpeculator
    from test_speculative import _serve

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    llm = ember.load(tmp_path, device="cpu", check_memory=False, dtype=torch.float32)
    plan, prepare, steps = BatchAdaptiveK.plan, BatchSpeculator.prepare, []

    def alternate(self, accs, budgets):  # every other step only even sequences propose, then only odd ones
        ks, gain = plan(self, accs, budgets)
        n = len(steps)
        return [k if (i + n) % 2 else 0 for i, k in enumerate(ks)], gain

    def recording(seqs, proposals, states):
        news, saved = prepare(seqs, proposals, states)
        steps.append([(n, len(p)) for n, p in zip(news, proposals)])
        return news, saved

    monkeypatch.setattr(BatchAdaptiveK, "plan", alternate)
    monkeypatch.setattr(BatchSpeculator, "prepare", staticmethod(recording))
    g = torch.Generator().manual_seed(2)
    ps = [list(range(3, 15)) * 2, torch.randint(3, 256, (9,), generator=g).tolist(), list(range(20, 28)) * 3]
    params = [(SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True), None)] * len(ps)
    plain, _ = _serve(llm, ps, params)
    llm.speculate(method="ngram", num_speculative=3, adaptive=False)
    try:
        served, m = _serve(llm, ps, params)
    finally:
        llm.speculate()
    assert served == plain
    assert m["speculative_proposed"] > m["speculative_accepted"] > 0
    assert any(n > 1 and k == 0 for step in steps for n, k in step), steps  # a replay without proposals ran
