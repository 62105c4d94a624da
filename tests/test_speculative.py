"""Speculative decoding: exactness against plain decoding, the rejection rule's distribution, the controller.

Tiny random checkpoints (HF ``save_pretrained``): greedy output with every proposer must equal plain greedy
output token for token; sampled output must have the target's distribution (chi-square over many draws with
fixed seeds); the adaptive controller must switch itself off where proposals do not pay.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import ember
from conftest import make_hf_model, save_word_tokenizer
from ember.config import ModelConfig
from ember.errors import GenerationError
from ember.models import Transformer
from ember.speculative import (AdaptiveK, NgramProposer, SpeculativeConfig, accept_greedy, accept_sampled,
                               check_rollback, expected_tokens)

PROMPT = list(range(3, 43))
# chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one run in a thousand,
# and the seeds are fixed, so a pass is stable
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 8: 26.12}


def _save(folder: Path, family: str, seed: int, **overrides) -> Path:
    model = make_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    load = lambda p: ember.load(p, device="cpu", check_memory=False)  # noqa: E731
    return {
        "llama": load(_save(root / "llama", "llama", 0)),
        "llama-draft": load(_save(root / "llama-draft", "llama", 1, num_hidden_layers=1, hidden_size=32,
                                  intermediate_size=64)),
        "qwen3": load(_save(root / "qwen3", "qwen3", 2)),
        "qwen3-draft": load(_save(root / "qwen3-draft", "qwen3", 3, num_hidden_layers=1)),
    }


def _greedy(llm, prompt, n=48, **spec):
    llm.speculate(**spec) if spec else llm.speculate()
    try:
        return llm.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True)
    finally:
        llm.speculate()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("how", ["ngram", "self-draft", "small-draft"])
def test_greedy_output_equals_plain(models, family, how):
    llm = models[family]
    ref = _greedy(llm, PROMPT)
    spec = {"ngram": dict(method="ngram"), "self-draft": dict(draft=llm),
            "small-draft": dict(draft=models[family + "-draft"])}[how]
    for k in (1, 3, 6):  # fixed k: every pass speculates (the controller would switch a useless draft off)
        out = _greedy(llm, PROMPT, **spec, num_speculative=k, adaptive=False)
        assert out.token_ids == ref.token_ids, f"{how} k={k}: first difference at " \
            f"{next(i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)) if a != b)}"
        assert out.text == ref.text
        s = out.stats.speculation
        assert s is not None and s.proposed > 0 and s.tokens == 47  # every token after the prefill's
    if how == "self-draft":  # the target proposing for itself is always right
        assert s.acceptance == 1.0 and s.tokens_per_pass > 3


def test_greedy_with_stop_token_and_short_limit(models):
    llm = models["llama"]
    ref = _greedy(llm, PROMPT, n=20)
    stop = ref.token_ids[7]
    llm.speculate(draft=llm, num_speculative=5, adaptive=False)
    try:
        out = llm.generate(PROMPT, max_new_tokens=20, temperature=0, stop_token_ids=[stop])
        assert out.token_ids == ref.token_ids[:ref.token_ids.index(stop) + 1] and out.finish_reason == "stop"
        for n in (1, 2, 3):
            assert llm.generate(PROMPT, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids == ref.token_ids[:n]
    finally:
        llm.speculate()


def test_summary_line_reports_acceptance(models):
    out = _greedy(models["llama"], PROMPT, draft=models["llama"], num_speculative=4, adaptive=False)
    line = out.stats.summary()
    assert "speculative: 100% of" in line and "tok/weight pass" in line
    assert "speculative" not in _greedy(models["llama"], PROMPT).stats.summary()


def _chi2(counts: dict, probs: dict, n: int) -> float:
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_rule_keeps_the_target_distribution(deterministic):
    """Many draws of the rule on fixed p and q: each place's first emitted token is distributed as p there."""
    torch.manual_seed(0)
    V, k, n = 5, 3, 6000
    p = torch.softmax(torch.randn(k + 1, V) * 1.5, -1).double()
    q = torch.softmax(torch.randn(k, V) * 1.5, -1).double()
    g = torch.Generator().manual_seed(1)
    counts = [dict() for _ in range(k + 1)]  # place -> token -> times emitted there
    reached = [0] * (k + 1)
    for _ in range(n):
        if deterministic:  # an n-gram style proposal: fixed tokens, q one-hot
            prop = [0, 1, 2]
            out = accept_sampled(p, prop, None, g)
        else:
            prop = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
            out = accept_sampled(p, prop, q, g)
        for i, t in enumerate(out):
            # place i's token is p_i-distributed given the tokens before it were kept (proposals independent of
            # one another here, so marginally too, for the first place always)
            if i == 0 or deterministic:
                counts[i][t] = counts[i].get(t, 0) + 1
                reached[i] += 1
    stat = _chi2(counts[0], {t: float(p[0, t]) for t in range(V)}, reached[0])
    assert stat < CHI2_999[V - 1], f"place 0: chi2 {stat:.1f} >= {CHI2_999[V - 1]} (p={p[0].tolist()})"
    if deterministic:  # reaching place i means the fixed proposals 0..i-1 were kept: still p_i there
        for i in range(1, k + 1):
            stat = _chi2(counts[i], {t: float(p[i, t]) for t in range(V)}, reached[i])
            assert stat < CHI2_999[V - 1], f"place {i}: chi2 {stat:.1f}"


def test_sampled_generation_has_the_target_distribution(models):
    """End to end with a small sampling draft: the joint law of the first two sampled tokens (top-2 each, 4
    outcomes) equals the target's, computed exactly from its logits."""
    llm = models["llama"]
    params = dict(temperature=1.5, top_k=2, max_new_tokens=2, ignore_eos=True)
    model = llm.model
    with torch.inference_mode():
        first = torch.softmax(model(torch.tensor([PROMPT]))[0, -1].float() / 1.5, -1)
        top1 = first.topk(2)
        joint = {}
        for t1, p1 in zip(top1.indices.tolist(), (top1.values / top1.values.sum()).tolist()):
            second = torch.softmax(model(torch.tensor([PROMPT + [t1]]))[0, -1].float() / 1.5, -1).topk(2)
            for t2, p2 in zip(second.indices.tolist(), (second.values / second.values.sum()).tolist()):
                joint[(t1, t2)] = p1 * p2
    llm.speculate(draft=models["llama-draft"], num_speculative=1, adaptive=False)
    try:
        n, counts, passes = 400, {}, 0
        for seed in range(n):
            out = llm.generate(PROMPT, seed=seed, **params)
            key = tuple(out.token_ids)
            counts[key] = counts.get(key, 0) + 1
            passes += out.stats.speculation.passes
    finally:
        llm.speculate()
    assert set(counts) <= set(joint), f"outcomes outside the target's support: {set(counts) - set(joint)}"
    assert passes == n  # one verification pass each: the second token came from the rule
    stat = _chi2(counts, joint, n)
    assert stat < CHI2_999[3], f"chi2 {stat:.1f} >= {CHI2_999[3]}: {counts} vs {joint}"


def test_accept_greedy():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 9]) == [5, 6, 7]
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    prop = NgramProposer(max_ngram=3)
    ids = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 1, 2, 3]
    assert prop.propose(ids, 3)[0] == [4, 5, 9]  # the longest match first: "1 2 3" before "4 5 9"
    assert NgramProposer(max_ngram=2).propose(ids, 3)[0] == [4, 6, 7]  # "2 3" last seen before "4 6 7"
    ids += [4, 6]
    assert prop.propose(ids, 2)[0] == [7, 1]  # grown incrementally: "3 4 6" -> "7 1"
    assert prop.propose([8, 9, 10], 4)[0] == []  # a new sequence, nothing repeats
    assert prop.propose([1, 2, 1], 0)[0] == []


def test_controller_switches_off_and_probes():
    c = AdaptiveK(4)
    for _ in range(3):
        assert c.choose() in (0,) or c.plain_seen >= 2
        c.record_plain(0.010)
    k = c.choose()
    assert 1 <= k <= 4
    plain_between = []
    for _ in range(6):  # every proposal rejected, and a verification pass costs more than a plain step
        c.record_pass(k, 0, 0.002 * k, 0.012)
        plains = 0
        while (k := c.choose()) == 0:
            plains += 1
            c.record_plain(0.010)
        plain_between.append(plains)
    # off for longer and longer between probes (4, 8, 16, 32 plain steps, each wait ended by one probe pass)
    assert plain_between == sorted(plain_between) and plain_between[-1] >= 32, plain_between
    assert c.acceptance < 0.2
    good = AdaptiveK(8)
    for _ in range(2):
        good.record_plain(0.010)
    for _ in range(10):
        good.record_pass(8, 8, 0.001, 0.011)
    assert good.choose() == 8 and good.speedup(8) > 3
    assert math.isclose(expected_tokens(0.5, 2), 1.75)


def test_refuses_families_that_cannot_roll_back(models):
    cfg = ModelConfig(model_type="qwen3_next", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                      linear_num_value_heads=4)
    with pytest.raises(GenerationError, match="recurrent layers cannot drop rejected tokens"):
        check_rollback(cfg, "this model")
    with pytest.raises(GenerationError, match="needs a draft model"):
        SpeculativeConfig("draft")
    with pytest.raises(GenerationError, match="unknown speculation method"):
        SpeculativeConfig("lookahead")
    big = models["llama"]
    other = make_hf_model("llama", num_hidden_layers=1, vocab_size=300)
    draft = Transformer(ModelConfig.from_dict(other.config.to_dict()))
    with pytest.raises(GenerationError, match="vocabulary"):
        big.speculate(draft=draft)
    with pytest.raises(GenerationError, match="no mtp"):
        big.speculate("mtp")
    assert big.speculation is None


def _serve(llm, ps, params):
    from ember.scheduler import BatchScheduler, SeqRequest

    sched = BatchScheduler(llm, max_batch=3, num_blocks=96, block_size=8, prefill_chunk=32)
    for t in sched.cache.k + sched.cache.v:  # uninitialised pool: garbage must never be read
        t[8:] = float("nan")
    events: dict[int, list] = {}
    ids = sched.submit([SeqRequest(p, sp, logprobs=lp, on_event=lambda ev: events.setdefault(ev.seq_id, []).append(ev))
                        for p, (sp, lp) in zip(ps, params)])
    sched.run_until_idle()
    m = sched.metrics()
    assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["kv_blocks_reserved"] == 0 and m["running"] == 0
    return [[e.token_id for e in events[i]] for i in ids], m


@pytest.mark.parametrize("how", ["ngram", "draft"])
def test_served_greedy_output_equals_plain(models, how):
    """Continuous batching with per-sequence speculation: ragged rows (1 + their proposals each) verified in one
    forward; greedy rows equal plain serving token for token, and a sampled row and a logprobs row ride along."""
    from ember.sampling import SamplingParams

    llm = models["llama"]
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 30, 12, 21, 2)]
    ps[3] = ps[3][:10] * 2  # a prompt that repeats itself: the n-gram lookup finds matches at once
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    params = [(greedy, None)] * 5 + [(SamplingParams(max_new_tokens=10, temperature=0.8, seed=3), None),
                                      (greedy, 2)]
    ps += [ps[1], ps[2]]
    plain, _ = _serve(llm, ps, params)
    spec = dict(method="ngram") if how == "ngram" else dict(draft=models["llama-draft"])
    llm.speculate(**spec, num_speculative=3, adaptive=False)
    try:
        served, m = _serve(llm, ps, params)
    finally:
        llm.speculate()
    for i, (a, b) in enumerate(zip(served, plain)):
        assert a == b, f"sequence {i}: {a} != {b}"
    assert m["speculative_proposed"] > 0 and m["generated_tokens"] == sum(len(x) for x in plain)
    if how == "ngram":
        assert m["speculative_tokens_per_pass"] > 1.0


def test_cli_generate_and_serve_flags(models, capsys):
    """``ember generate --draft/--speculate`` prints the plain text and a summary with the acceptance; serve's
    parser takes the same flags and turns speculation on for the scheduler."""
    from ember.cli import build_parser, main

    target, draft = str(models["llama"].path), str(models["llama-draft"].path)
    prompt = " ".join(f"w{t}" for t in PROMPT)
    assert main(["generate", target, prompt, "-n", "12"]) == 0
    plain = capsys.readouterr()
    assert main(["generate", target, prompt, "-n", "12", "--draft", draft, "--num-speculative", "3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "speculative:" in spec.err and "tok/weight pass" in spec.err
    assert main(["generate", target, prompt, "-n", "12", "--speculate", "ngram"]) == 0
    assert capsys.readouterr().out == plain.out
    from ember.commands.serve import load_engine

    args = build_parser().parse_args(["serve", target, "--speculate", "ngram", "--num-speculative", "2"])
    engine = load_engine(args)
    assert engine.speculation.method == "ngram" and engine.speculation.num_speculative == 2


@pytest.mark.parametrize("family,quant", [("llama-bias", None), ("qwen3", None), ("mixtral", None), ("llama", "int8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_rows_round_as_one_token_steps(hf_checkpoint, family, quant, dtype, monkeypatch):
    """A k + 1 row pass through the fused blocks (``ember_decode_rows``) gives each row the logits, bit for bit,
    and writes the cache slots, that one-token steps give it: greedy verification agrees with plain decoding
    even on near-ties in bf16 (quantized weights run their one-row kernels row by row)."""
    from ember import kernels
    from ember.runtime import decode

    ran = []
    real = kernels.run_decode_rows
    monkeypatch.setattr(kernels, "run_decode_rows", lambda *a: ran.append(real(*a)) or ran[-1])
    folder, _ = hf_checkpoint(family)
    model = ember.load(folder, device="cpu", check_memory=False, dtype=dtype, quant=quant).model
    check_rows_as_steps(model, dtype, PROMPT[:17], [7, 99, 3, 250, 41, 41])
    assert ran and all(ran), "the pass did not run through ember_decode_rows"
    assert decode.MAX_ROWS >= 9  # the most rows a pass of --num-speculative 8 sends


def check_rows_as_steps(model, dtype: torch.dtype, prompt: list[int], toks: list[int]) -> None:
    """``toks`` after ``prompt`` as one pass of a session (verification rows) and as one-token steps: the same logits
    bit for bit and the same cache slots."""
    from ember.cache import StaticKVCache

    def prefilled():
        cache = StaticKVCache(model.config, 1, len(prompt) + len(toks) + 16, dtype, torch.device("cpu"))
        model(torch.tensor([prompt]), None, cache, 0, None, last_only=True)
        cache.advance(len(prompt))
        return cache

    with torch.inference_mode():
        one = prefilled()
        steps = []
        for t in toks:
            steps.append(model(torch.tensor([[t]]), None, one, one.pos, None, last_only=True)[0, -1])
            one.advance(1)
        rows = prefilled()
        out = model(torch.tensor([toks]), None, rows, rows.pos, None, session=object())[0]
    for i, ref in enumerate(steps):
        assert torch.equal(out[i], ref), f"row {i}: max |diff| {float((out[i].float() - ref.float()).abs().max())}"
    n = len(prompt) + len(toks)
    for layer in range(model.config.num_hidden_layers):
        for a, b in zip(one.layer_tensors(layer), rows.layer_tensors(layer)):
            assert torch.equal(a[:, :, :n], b[:, :, :n])


def test_bf16_greedy_self_draft_is_exact(hf_checkpoint):
    """bf16: the target drafting for itself must have every proposal kept (the verification rounds as the draft's
    one-token steps) and its output equal plain greedy decoding."""
    folder, _ = hf_checkpoint("qwen3")
    llm = ember.load(folder, device="cpu", check_memory=False, dtype=torch.bfloat16)
    ref = _greedy(llm, PROMPT, n=40)
    out = _greedy(llm, PROMPT, n=40, draft=llm, num_speculative=4, adaptive=False)
    assert out.token_ids == ref.token_ids
    assert out.stats.speculation.acceptance == 1.0


@pytest.mark.parametrize("family", ["qwen3_5_text", "gpt_oss", "gemma3_text"])
def test_recurrent_and_ring_caches_roll_back(tmp_path, models, family):
    """Gated DeltaNet states and sliding-window rings (gpt-oss's, Gemma 3's) cannot overwrite a rejected proposal:
    the pass snapshots them and replays the kept tokens, so greedy output equals plain decoding (n-gram and a draft,
    prompts longer than the window), and served text equals plain serving. A Gemma draft (itself) keeps every slot
    of its own cache, so it may have sliding layers."""
    import transformers

    if family == "gpt_oss":
        from test_gpt_oss import make_hf_gpt_oss
        hf = make_hf_gpt_oss()
    elif family == "gemma3_text":
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    else:
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4))
    hf.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    llm = ember.load(tmp_path, device="cpu", check_memory=False)
    prompt = PROMPT[:12] * 2  # repeats itself: the n-gram lookup proposes from the start
    ref = _greedy(llm, prompt, n=30)
    rejected = 0
    drafts = [models["llama-draft"]] + ([llm] if family == "gemma3_text" else [])
    for spec in (dict(method="ngram"), *(dict(draft=d) for d in drafts)):
        for k in (2, 5):
            out = _greedy(llm, prompt, n=30, **spec, num_speculative=k, adaptive=False)
            assert out.token_ids == ref.token_ids, (spec, k)
            rejected += out.stats.speculation.proposed - out.stats.speculation.accepted
    assert rejected > 0  # the rollback ran
    # served: the scheduler puts a sequence's recurrent-state slot back and runs its kept tokens again; sliding
    # layers keep their window in paged blocks, which the next pass rewrites (4 ragged streams, past the window)
    from ember.sampling import SamplingParams

    g = torch.Generator().manual_seed(1)
    ps = [prompt, *(torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 14)), prompt[3:]]
    params = [(SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True), None)] * len(ps)
    plain, _ = _serve(llm, ps, params)
    for spec in (dict(method="ngram"), dict(draft=models["llama-draft"])):
        llm.speculate(**spec, num_speculative=3, adaptive=False)
        try:
            served, m = _serve(llm, ps, params)
        finally:
            llm.speculate()
        assert served == plain, spec
        assert m["speculative_proposed"] > m["speculative_accepted"], (spec, m)  # rejections: the rollback ran
        assert m["speculative_accepted"] > 0 or "draft" in spec, m  # the repeating prompt: n-gram hits
