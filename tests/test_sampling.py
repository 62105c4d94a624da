"""Sampler vs HF transformers' own logits processors (the oracle), plus seeding and draw statistics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ember.errors import EmberError, SamplingError
from ember.sampling import Sampler, SamplingParams, token_logprobs

hf_lp = pytest.importorskip("transformers.generation.logits_process")


# ---------------------------------------------------------------- helpers

def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Identical -inf masks and bit-identical finite entries; on failure name the worst element."""
    assert ours.dtype == torch.float32, f"{what}: dtype {ours.dtype}, want float32"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    ours_inf, ref_inf = torch.isneginf(ours), torch.isneginf(ref)
    if not torch.equal(ours_inf, ref_inf):
        where = (ours_inf != ref_inf).nonzero()[0].tolist()
        n = int((ours_inf != ref_inf).sum())
        pytest.fail(f"{what}: -inf masks differ at {n} entries; first {where}: ours={ours[tuple(where)]} "
                    f"hf={ref[tuple(where)]}")
    diff = (ours - ref).abs().masked_fill(ref_inf, 0)
    worst = int(diff.argmax())
    b, v = divmod(worst, ours.shape[1])
    assert float(diff.max()) == 0.0, (f"{what}: max |ours - hf| = {float(diff.max()):.3e} at [{b}, {v}]: "
                                      f"ours={float(ours[b, v])!r} hf={float(ref[b, v])!r} (tolerance 0)")


def random_logits(B: int = 4, V: int = 1000, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def random_ids(B: int, L: int, V: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)  # repeats included on purpose


def hf_chain(p: SamplingParams):
    """HF's own processor list for ``p``, built by ``GenerationMixin._get_logits_processor``."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    class _Dummy(GenerationMixin):
        config = SimpleNamespace(is_encoder_decoder=False)

    gc = GenerationConfig(do_sample=not p.greedy, temperature=p.temperature or 1.0, top_k=p.top_k,
                          top_p=p.top_p, min_p=p.min_p or None, repetition_penalty=p.repetition_penalty)
    return GenerationMixin._get_logits_processor(_Dummy.__new__(_Dummy), gc, input_ids_seq_length=1, device="cpu")


def process(p: SamplingParams, logits: torch.Tensor, past: torch.Tensor | None = None, **kw) -> torch.Tensor:
    return Sampler(p, logits.shape[0]).process_logits(logits, past, **kw)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.01),
    ("min_p", 1.01), ("top_k", -1), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("max_new_tokens", -1), ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", 1.5),
    ("stop", "END"), ("stop_token_ids", [-1]),
])
def test_validate_names_field(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(SamplingError, match=rf"SamplingParams\.{field} must be") as err:
        p.validate()
    assert isinstance(err.value, EmberError)
    with pytest.raises(SamplingError, match=field):
        Sampler(p, 1)  # the sampler refuses it too


def test_validate_accepts_edges():
    for p in (SamplingParams(), SamplingParams(temperature=0, top_p=1.0, min_p=1.0, top_k=0, max_new_tokens=0),
              SamplingParams(top_p=1e-6, min_p=0.0, repetition_penalty=1e-3, presence_penalty=-2, seed=0)):
        p.validate()
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy


def test_stop_token_set():
    assert SamplingParams(stop_token_ids=[5]).stop_token_set([2]) == {2, 5}
    assert SamplingParams(stop_token_ids=[5], ignore_eos=True).stop_token_set([2]) == {5}


def test_bad_logits_shape():
    with pytest.raises(SamplingError, match="batch=2"):
        Sampler(SamplingParams(), 2).sample(torch.zeros(3, 10))


# ---------------------------------------------------------------- each processor vs HF

def test_repetition_penalty_matches_hf():
    logits, past = random_logits(), random_ids(4, 64, 1000)
    for penalty in (1.3, 0.7):
        ours = process(SamplingParams(repetition_penalty=penalty), logits, past)
        ref = hf_lp.RepetitionPenaltyLogitsProcessor(penalty)(past, logits.clone())
        assert_same_logits(ours, ref, f"repetition_penalty={penalty}")


def test_repetition_penalty_ignores_padding():
    """-1 pads are skipped; token 0 is penalized only where it really occurs."""
    logits = random_logits(3, 50)
    rows = [[0, 5, 5, 7], [3, 9], []]  # row 0 has token 0, row 1 does not, row 2 is empty
    past = torch.full((3, 4), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        past[i, 4 - len(r):] = torch.tensor(r, dtype=torch.long)  # left padding, as the engine does
    ours = process(SamplingParams(repetition_penalty=1.5), logits, past)
    for i, r in enumerate(rows):
        ref = hf_lp.RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([r], dtype=torch.long), logits[i:i + 1].clone())
        assert_same_logits(ours[i:i + 1], ref, f"padded row {i}")


def test_temperature_matches_hf():
    logits = random_logits()
    for t in (0.3, 1.7):
        ref = hf_lp.TemperatureLogitsWarper(t)(None, logits.clone())
        assert_same_logits(process(SamplingParams(temperature=t), logits), ref, f"temperature={t}")


@pytest.mark.parametrize("k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_matches_hf(k):
    logits = random_logits()
    ref = hf_lp.TopKLogitsWarper(k)(None, logits.clone())
    assert_same_logits(process(SamplingParams(top_k=k), logits), ref, f"top_k={k}")


def test_top_k_ties_match_hf():
    """bf16-rounded logits tie often; HF keeps every token tied with the k-th value."""
    logits = random_logits(4, 2000, scale=1.0).bfloat16()
    for k in (10, 100):
        ref = hf_lp.TopKLogitsWarper(k)(None, logits.float())
        assert_same_logits(process(SamplingParams(top_k=k), logits), ref, f"top_k={k} with ties")
        assert int(torch.isfinite(ref).sum(1).max()) > k, "test needs a tie at the k-th value"


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("candidates", [(), (8,), (8, 64), (1024, 16384)])
def test_top_p_matches_hf(scale, top_p, candidates, monkeypatch):
    """Both the candidate path and the full-sort fallback give HF's mask."""
    monkeypatch.setattr(Sampler, "top_p_candidates", candidates)
    logits = random_logits(4, 3000, scale=scale, seed=int(scale * 10))
    ref = hf_lp.TopPLogitsWarper(top_p)(None, logits.clone())
    assert_same_logits(process(SamplingParams(top_p=top_p), logits), ref, f"top_p={top_p} scale={scale}")


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(min_p):
    logits = random_logits(scale=2.0)
    ref = hf_lp.MinPLogitsWarper(min_p)(None, logits.clone())
    assert_same_logits(process(SamplingParams(min_p=min_p), logits), ref, f"min_p={min_p}")


def test_presence_frequency_penalties_openai_semantics():
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over generated ids only."""
    logits, V = random_logits(3, 40), 40
    gen = torch.tensor([[4, 4, 4, 0], [-1, -1, 7, 8], [-1, -1, -1, -1]])
    past = torch.cat([random_ids(3, 6, V), gen], 1)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = process(p, logits, past, generated_tokens=gen)
    ref = logits.clone()
    for b in range(3):
        counts = torch.bincount(gen[b][gen[b] >= 0], minlength=V).float()
        ref[b] -= counts * 0.25 + (counts > 0).float() * 0.5
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert torch.equal(ours[2], logits[2]), "an all-padding row must be untouched"


def test_presence_penalty_uses_own_history_when_not_given():
    V = 30
    logits = random_logits(2, V)
    s = Sampler(SamplingParams(presence_penalty=2.0, temperature=0.01, seed=0), 2)
    toks = [s.sample(logits) for _ in range(3)]
    # Each step the previous picks are pushed down by 2, so low temperature picks a new token each time.
    assert all(len({int(t[b]) for t in toks}) == 3 for b in range(2))


# ---------------------------------------------------------------- the whole chain vs HF's chain

@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.3, top_k=200, top_p=0.95, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_p=0.8, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=3000),
    SamplingParams(temperature=0.9, top_k=10, min_p=0.2),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}-r{p.repetition_penalty}")
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_chain_matches_hf_chain(p, scale):
    logits, past = random_logits(4, 3000, scale=scale, seed=7), random_ids(4, 100, 3000)
    chain = hf_chain(p)
    ref = chain(past, logits.clone())
    assert_same_logits(process(p, logits, past), ref, f"chain {[type(c).__name__ for c in chain]}")


def test_input_logits_untouched():
    logits = random_logits()
    before = logits.clone()
    s = Sampler(SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                               frequency_penalty=0.5, seed=0), 4)
    past = random_ids(4, 20, 1000)
    s.process_logits(logits, past)
    s.sample(logits, past)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- greedy

def test_greedy_is_argmax_regardless_of_warpers():
    logits = random_logits(4, 5000)
    p = SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.9, seed=1)
    s = Sampler(p, 4)
    assert torch.equal(s.sample(logits), logits.argmax(-1))
    bf = logits.bfloat16()
    assert torch.equal(s.sample(bf), bf.argmax(-1))
    processed = s.process_logits(logits, None)
    assert torch.equal(processed.argmax(-1), logits.argmax(-1))
    assert int(torch.isfinite(processed).sum()) == 4, "greedy keeps exactly one token per row"


def test_greedy_with_repetition_penalty_matches_hf():
    logits, past = random_logits(4, 500, scale=0.3), random_ids(4, 200, 500)
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    chain = hf_chain(p)  # do_sample=False: only the repetition penalty
    assert [type(c).__name__ for c in chain] == ["RepetitionPenaltyLogitsProcessor"]
    want = chain(past, logits.clone()).argmax(-1)
    assert not torch.equal(want, logits.argmax(-1)), "penalty should change some greedy picks"
    assert torch.equal(Sampler(p, 4).sample(logits, past), want)


# ---------------------------------------------------------------- seeds and draws

def test_same_seed_same_tokens_different_seed_different():
    logits = random_logits(8, 2000, scale=1.0)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(seed):
        s = Sampler(SamplingParams(**{**p.__dict__, "seed": seed}), 8)
        return torch.stack([s.sample(logits) for _ in range(10)])

    assert torch.equal(run(1234), run(1234))
    assert not torch.equal(run(1234), run(4321))
    unseeded = [Sampler(SamplingParams(temperature=1.0), 8) for _ in range(2)]
    assert unseeded[0].seeds != unseeded[1].seeds


def draw_many(p: SamplingParams, logits: torch.Tensor, n: int) -> torch.Tensor:
    """(n * B,) samples of one row repeated B times: many draws per call."""
    s = Sampler(p, logits.shape[0])
    return torch.cat([s.sample(logits) for _ in range(n)])


@pytest.mark.parametrize("p", [SamplingParams(top_k=7, seed=3), SamplingParams(top_p=0.6, seed=4),
                               SamplingParams(top_k=50, top_p=0.6, seed=5), SamplingParams(min_p=0.3, seed=6),
                               SamplingParams(temperature=3.0, top_k=5, seed=7)],
                         ids=lambda p: f"k{p.top_k}-p{p.top_p}-m{p.min_p}-t{p.temperature}")
def test_samples_stay_in_allowed_set(p):
    row = random_logits(1, 5000, scale=2.0, seed=11)
    allowed = set(torch.isfinite(hf_chain(p)(None, row.clone()))[0].nonzero().flatten().tolist())
    drawn = draw_many(p, row.expand(64, -1), 50)
    outside = set(drawn.tolist()) - allowed
    assert not outside, f"drew {sorted(outside)[:10]} outside the {len(allowed)}-token allowed set"
    assert len(set(drawn.tolist())) == len(allowed) or len(allowed) > 40  # small sets get fully covered


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.8, seed=9), SamplingParams(top_k=6, top_p=0.9, seed=10)])
def test_draw_frequencies_match_probabilities(p):
    row = random_logits(1, 12, scale=1.5, seed=12)
    probs = hf_chain(p)(None, row.clone()).softmax(-1)[0]
    n_rows, n_calls = 200, 100  # 20000 draws
    counts = torch.bincount(draw_many(p, row.expand(n_rows, -1), n_calls), minlength=12).double()
    freq = counts / counts.sum()
    # 5 standard errors of a binomial proportion, per token
    tol = 5 * (probs.double() * (1 - probs.double()) / counts.sum()).sqrt() + 1e-12
    assert bool(((freq - probs.double()).abs() <= tol).all()), f"freq {freq.tolist()} vs probs {probs.tolist()}"
    assert bool((counts[probs == 0] == 0).all())


# ---------------------------------------------------------------- per-row params

def test_per_row_params_equal_single_row_runs():
    rows = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=1),
            SamplingParams(temperature=0, repetition_penalty=1.5, seed=2),
            SamplingParams(temperature=1.2, min_p=0.1, presence_penalty=1.0, seed=3),
            SamplingParams(temperature=0.5, top_p=0.5, frequency_penalty=0.5, seed=4)]
    logits, past = random_logits(4, 800, scale=2.0), random_ids(4, 30, 800)
    gen = past[:, -10:]
    batch = Sampler(rows, 4)
    singles = [Sampler([p], 1) for p in rows]
    out = batch.process_logits(logits, past, gen)
    for i, s in enumerate(singles):
        one = s.process_logits(logits[i:i + 1], past[i:i + 1], gen[i:i + 1])
        assert torch.equal(torch.isneginf(out[i:i + 1]), torch.isneginf(one)), f"row {i} mask"
        torch.testing.assert_close(out[i:i + 1], one, rtol=1e-6, atol=1e-6)
    # Each row has its own generator: its tokens do not depend on its batch mates.
    for _ in range(5):
        toks = batch.sample(logits, past, gen)
        for i, s in enumerate(singles):
            assert int(toks[i]) == int(s.sample(logits[i:i + 1], past[i:i + 1], gen[i:i + 1]))


def test_per_row_mixed_top_k_matches_hf():
    logits = random_logits(3, 600)
    ks = [5, 0, 60]
    out = Sampler([SamplingParams(top_k=k) for k in ks], 3).process_logits(logits, None)
    for i, k in enumerate(ks):
        ref = hf_lp.TopKLogitsWarper(k)(None, logits[i:i + 1].clone()) if k else logits[i:i + 1]
        assert_same_logits(out[i:i + 1], ref, f"row {i} top_k={k}")


# ---------------------------------------------------------------- logprobs

def test_logprobs_helper():
    logits = random_logits(2, 100)
    tokens = torch.tensor([3, 7])
    lp = token_logprobs(logits, tokens, top_n=5)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp.chosen, ref[[0, 1], [3, 7]])
    assert torch.equal(lp.top_ids, ref.topk(5).indices)
    assert Sampler(SamplingParams(), 2).logprobs(logits, tokens).top_ids is None
