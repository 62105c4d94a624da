"""gpt-oss (``model_type: gpt_oss``) against HF ``GptOssForCausalLM``: sinks, biases, alternating sliding/full
layers, YaRN, the biased router and clamped-SwiGLU experts; logits, padded batches past the window, greedy
generation through ``ember.load`` and the continuous-batching scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ember
from conftest import save_word_tokenizer
from ember.cache import StaticKVCache
from ember.loading import load_model
from ember.models.gpt_oss import GptOssMLP, SinkAttention
from ember.sampling import SamplingParams
from ember.scheduler import BatchScheduler, SeqRequest

FP32_TOL = 1e-4
# 3 layers (sliding, full, sliding) with a window of 6; YaRN from an original context of 16 so that positions in
# the tests are past it; a low swiglu_limit so the clamps bite.
GPT_OSS = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
               max_position_embeddings=256, swiglu_limit=1.5,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0})


def make_hf_gpt_oss(seed: int = 0, **overrides):
    """A random HF gpt-oss with non-trivial norms, biases, sinks and experts (default init leaves them 1/0)."""
    import transformers

    cfg = transformers.GptOssConfig(**{**GPT_OSS, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("sinks"):
                p.copy_(0.5 * torch.randn_like(p))
            elif ".experts." in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    hf = make_hf_gpt_oss()
    folder = Path(tmp_path_factory.mktemp("gpt-oss"))
    hf.save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder, hf


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    worst = (ours.float() - ref.float()).abs().max().item()
    assert worst < tol, f"{what}: max |diff| {worst:.3g} exceeds {tol:g}"


def test_builds_the_gpt_oss_pieces_per_layer(gpt_oss_checkpoint):
    folder, hf = gpt_oss_checkpoint
    ours = load_model(folder, dtype="fp32")
    layers = ours.model.layers
    assert all(isinstance(layer.self_attn, SinkAttention) and isinstance(layer.mlp, GptOssMLP) for layer in layers)
    assert [layer.window for layer in layers] == [6, None, 6]  # HF's default layer_types: sliding, full, ...
    assert ours.rope_scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert ours.config.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()  # untied head


def test_prefill_and_each_decode_step_match_hf_past_the_window(gpt_oss_checkpoint):
    folder, hf = gpt_oss_checkpoint
    ours = load_model(folder, dtype="fp32")
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        cache = StaticKVCache(ours.config, 2, 32, torch.float32, "cpu")
        got = [ours(ids[:, :10], cache=cache, start=0)]
        cache.advance(10)
        for t in range(10, 30):  # 20 decode steps, far past the window of 6 and YaRN's original 16
            got.append(ours(ids[:, t:t + 1], cache=cache, start=cache.pos))
            cache.advance(1)
    assert_close(got[0], ref[:, :10], FP32_TOL, "prefill")
    for i, step in enumerate(got[1:]):
        assert_close(step, ref[:, 10 + i:11 + i], FP32_TOL, f"decode step {i}")


def test_one_sequence_decode_in_the_runtime_matches_hf(gpt_oss_checkpoint):
    """Batch 1 takes the CPU runtime's decode path (its layers run as modules there)."""
    folder, hf = gpt_oss_checkpoint
    ours = load_model(folder, dtype="fp32")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
        cache = StaticKVCache(ours.config, 1, 24, torch.float32, "cpu")
        ours(ids[:, :4], cache=cache, start=0)
        cache.advance(4)
        for t in range(4, 24):
            step = ours(ids[:, t:t + 1], cache=cache, start=cache.pos, session=cache)
            cache.advance(1)
            assert_close(step, ref[:, t:t + 1], FP32_TOL, f"runtime decode at position {t}")


def test_left_padded_batch_of_different_lengths_matches_hf(gpt_oss_checkpoint):
    folder, hf = gpt_oss_checkpoint
    ours = load_model(folder, dtype="fp32")
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        cache = StaticKVCache(ours.config, 3, 20, torch.float32, "cpu")
        got = ours(ids, pos, cache, 0, k_valid=mask.bool())
    assert_close(got[mask.bool()], ref[mask.bool()], FP32_TOL, "padded batch")


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_32_tokens_identical_to_hf_generate(gpt_oss_checkpoint):
    folder, hf = gpt_oss_checkpoint
    hf.generation_config.eos_token_id = None
    llm = ember.load(folder, device="cpu", dtype="fp32")
    prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_greedy(hf, prompt, 32)
    got = llm.generate(prompt, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert got.token_ids == ref


def test_batch_and_scheduler_equal_generate_alone(gpt_oss_checkpoint):
    folder, _ = gpt_oss_checkpoint
    llm = ember.load(folder, dtype="fp32")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]
    alone = [llm.generate(p, max_new_tokens=16, temperature=0.0, ignore_eos=True).token_ids for p in prompts]
    batch = llm.generate(prompts, max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert [b.token_ids for b in batch] == alone
    sched = BatchScheduler(llm, max_batch=3, num_blocks=64, block_size=8, prefill_chunk=12)
    events: dict[int, list[int]] = {}
    reqs = [SeqRequest(p, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True),
                       on_event=lambda ev: events.setdefault(ev.seq_id, []).append(ev.token_id)) for p in prompts]
    ids = sched.submit(reqs)
    sched.run_until_idle()
    assert [events[i] for i in ids] == alone


def test_sliding_layers_keep_only_their_window_and_the_planner_prices_that(gpt_oss_checkpoint):
    from ember.cache import cache_bytes, ring_layers
    from ember.planner import kv_cache_bytes

    folder, _ = gpt_oss_checkpoint
    cfg = load_model(folder, dtype="fp32").config
    assert ring_layers(cfg) == {0, 2}
    cache = StaticKVCache(cfg, 2, 100, torch.float32, "cpu")
    per_token = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # batch 2, k and v, fp32
    assert cache.nbytes() == per_token * (100 + 2 * 6)  # one full layer of 100 slots, two rings of 6
    assert cache.nbytes() == cache_bytes(cfg, torch.float32, 100, batch=2)
    with pytest.raises(ValueError, match="ring"):
        cache.layer_tensors(0)
    # the planner's KV price: full context on the full layer, the window on the sliding ones
    assert kv_cache_bytes(cfg, 1000, 1, "bf16") == 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * (1000 + 2 * 6)


# ---------------------------------------------------------------- harmony output parsing
HARMONY_OUT = ("<|channel|>analysis<|message|>User wants weather. Call the tool.<|end|>"
               "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
               '{"city": "Oslo"}<|call|>')


def _collect(deltas):
    from ember.chat_formats import ParsedOutput

    p = ParsedOutput()
    p.add(deltas)
    return p


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_harmony_reasoning_and_tool_call_streamed_in_any_chunks(chunk):
    from ember.chat_formats import FORMATS, detect_format

    fmt = detect_format("{{ '<|start|>' + role + '<|channel|>' + channel + '<|message|>' }}")
    assert fmt is FORMATS["harmony"]
    parser = fmt.output_parser(True)
    deltas = []
    for i in range(0, len(HARMONY_OUT), chunk):
        deltas += parser.feed(HARMONY_OUT[i:i + chunk])
    deltas += parser.finish()
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    assert reasoning == "User wants weather. Call the tool."
    assert not any(d.kind == "content" for d in deltas)
    calls = [d for d in deltas if d.kind == "call"]
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads("".join(d.text for d in deltas if d.kind == "args")) == {"city": "Oslo"}


def test_harmony_final_channel_is_content_and_markers_never_leak():
    from ember.chat_formats import HarmonyParser

    out = ("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>"
           "The answer is 4.<|return|>")
    parser = HarmonyParser(tools=False)
    deltas = [d for ch in out for d in parser.feed(ch)] + parser.finish()
    assert "".join(d.text for d in deltas if d.kind == "content") == "The answer is 4."
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "think"
    assert not any("<|" in d.text for d in deltas)
    # a malformed call body is kept as content, not dropped
    bad = HarmonyParser(tools=True)
    deltas = bad.feed("<|channel|>commentary to=functions.f<|message|>not json<|call|>") + bad.finish()
    assert [(d.kind, d.text) for d in deltas] == [("content", "not json")]
