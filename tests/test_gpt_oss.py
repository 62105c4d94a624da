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
    assert scheduled_greedy(sched, prompts, 16) == alone


def scheduled_greedy(sched: BatchScheduler, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt's ``n`` greedy tokens through the continuous-batching scheduler."""
    events: dict[int, list[int]] = {}
    reqs = [SeqRequest(p, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
                       on_event=lambda ev: events.setdefault(ev.seq_id, []).append(ev.token_id)) for p in prompts]
    ids = sched.submit(reqs)
    sched.run_until_idle()
    return [events[i] for i in ids]


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
    k, v = cache.layer_tensors(0)  # a ring's buffers: window slots (the fused blocks write it in place)
    assert k.shape[2] == v.shape[2] == 6 and k is cache.rings[0].k
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


# ---------------------------------------------------------------- harmony template, ember chat, server fields
from ember.chat_formats.harmony import HARMONY_TEMPLATE, MARKERS  # noqa: E402

WORDS = ["Reasoning", "low", "medium", "high", "analysis", "final", "commentary", "assistant", "user", "system",
         "developer", "Instructions", "Tools", "functions", "to", "json"]


def save_harmony_tokenizer(folder: Path) -> None:
    """Word-level vocabulary (``w3 ..`` words, a few harmony words) with harmony's markers as special tokens, the
    harmony template, and a generation_config that (like the hub's) stops at ``<|return|>`` only."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: 1 + i for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 256 - len(MARKERS) - 1)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in (*MARKERS, "<|endoftext|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|return|>")
    fast.chat_template = HARMONY_TEMPLATE
    fast.save_pretrained(folder)
    assert max(fast.get_vocab().values()) < 256


@pytest.fixture(scope="module")
def harmony_checkpoint(gpt_oss_checkpoint, tmp_path_factory) -> Path:
    import shutil

    src, _ = gpt_oss_checkpoint
    folder = Path(tmp_path_factory.mktemp("gpt-oss-harmony"))
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, folder / f)
    save_harmony_tokenizer(folder)
    return folder


def render(messages, **kw) -> str:
    from ember.chat_template import _compile_template

    return _compile_template(HARMONY_TEMPLATE).render(messages=messages, **{"current_date": "2025-06-28", **kw})


SYSTEM_HEAD = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
               "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: {}\n\n"
               "# Valid channels: analysis, commentary, final. Channel must be included for every message.")
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "Gets the current weather in the provided location.",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "array", "items": {"type": "integer"}},
            "opts": {"type": "object", "properties": {"metric": {"type": ["boolean", "null"]}}, "required": ["metric"]}}}}}]


@pytest.mark.parametrize("effort", [None, "low", "medium", "high"])
def test_harmony_template_system_message_and_reasoning_effort(effort):
    """The published example: system message, the first system turn as the developer's instructions, a past
    assistant turn on the final channel, and the generation prompt."""
    msgs = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there", "reasoning_content": "dropped in later turns"},
            {"role": "user", "content": "How are you?"}]
    got = render(msgs, add_generation_prompt=True, **({} if effort is None else {"reasoning_effort": effort}))
    assert got == (SYSTEM_HEAD.format(effort or "medium") + "<|end|><|start|>developer<|message|># Instructions\n\n"
                   "You are a helpful assistant\n\n<|end|><|start|>user<|message|>Hello<|end|>"
                   "<|start|>assistant<|channel|>final<|message|>Hi there<|end|>"
                   "<|start|>user<|message|>How are you?<|end|><|start|>assistant")


def test_harmony_template_renders_tools_as_the_functions_namespace():
    msgs = [{"role": "system", "content": "Always respond in riddles"},
            {"role": "user", "content": "What is the weather like in SF?"}]
    got = render(msgs, tools=WEATHER_TOOLS, reasoning_effort="high", add_generation_prompt=True)
    assert got == (
        SYSTEM_HEAD.format("high") + "\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nAlways respond in riddles\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Gets the location of the user.\ntype get_location = () => any;\n\n"
        "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        "format?: \"celsius\" | \"fahrenheit\", // default: celsius\ndays?: number[],\n"
        "opts?: { metric: boolean | null },\n}) => any;\n\n} // namespace functions<|end|>"
        "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant")
    # tools and no instructions: the developer message holds only the tools
    got = render(msgs[1:], tools=WEATHER_TOOLS[:1], add_generation_prompt=True)
    assert "<|start|>developer<|message|># Tools\n\n## functions" in got and "# Instructions" not in got


def test_gpt_oss_folder_without_a_chat_template_falls_back_to_harmony(tmp_path, capsys):
    """A gpt-oss folder that ships no chat template renders through Ember's harmony template and says so once;
    another family's folder without one still has none (a base model)."""
    import json

    from ember.tokenizer import Tokenizer

    for name, model_type in (("oss", "gpt_oss"), ("llama", "llama")):
        save_word_tokenizer(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    tok = Tokenizer.from_dir(tmp_path / "oss")
    assert "no chat template; using Ember's harmony template" in capsys.readouterr().err
    assert tok.chat_template_source() == HARMONY_TEMPLATE
    got = tok.apply_chat_template([{"role": "user", "content": "w5"}], add_generation_prompt=True)
    assert got.endswith("<|start|>user<|message|>w5<|end|><|start|>assistant")
    assert Tokenizer.from_dir(tmp_path / "llama").chat_template_source() is None
    assert capsys.readouterr().err == ""


def test_harmony_template_tool_call_round_trip_and_training_turn():
    """A call is a commentary message to functions.NAME ending in <|call|>; its analysis is kept only while no final
    answer follows; the result comes back from functions.NAME; a last assistant turn (training) ends in <|return|>."""
    call = {"role": "assistant", "content": "Need the city.",
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "get_location", "arguments": "{}"}}]}
    msgs = [{"role": "user", "content": "Weather?"}, call, {"role": "tool", "content": "Oslo"}]
    pending = render(msgs, add_generation_prompt=True)
    tail = ("<|start|>user<|message|>Weather?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Need the city.<|end|>"
            "<|start|>assistant to=functions.get_location<|channel|>commentary json<|message|>{}<|call|>"
            "<|start|>functions.get_location to=assistant<|channel|>commentary<|message|>\"Oslo\"<|end|>"
            "<|start|>assistant")
    assert pending == SYSTEM_HEAD.format("medium") + "<|end|>" + tail
    done = render([*msgs, {"role": "assistant", "content": "Sunny in Oslo.", "thinking": "It is sunny."}],
                  reasoning_effort="low", add_generation_prompt=False)
    assert done == (SYSTEM_HEAD.format("low") + "<|end|>" + tail.replace(
        "<|start|>assistant<|channel|>analysis<|message|>Need the city.<|end|>", "").removesuffix("<|start|>assistant")
        + "<|start|>assistant<|channel|>analysis<|message|>It is sunny.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Sunny in Oslo.<|return|>")
    with pytest.raises(Exception, match="tool message"):
        render([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}])


def test_harmony_template_through_the_tokenizer_and_its_output_parsed(harmony_checkpoint):
    from ember.chat_formats import detect_format, is_reasoning_template
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(harmony_checkpoint)
    src = tok.chat_template_source()
    assert detect_format(src).name == "harmony" and is_reasoning_template(src)
    text = tok.apply_chat_template([{"role": "user", "content": "w5"}], reasoning_effort="high", current_date="d")
    assert "Reasoning: high" in text and text.endswith("<|start|>assistant")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.token_to_id("high") in ids and tok.token_to_id("medium") not in ids
    assert ids[-2:] == [tok.token_to_id("<|start|>"), tok.token_to_id("assistant")]


class ScriptedSampler:
    """Stands in for the engine's sampler: picks the tokens of a script, one per step (the engine still stops)."""

    script: list[int] = []
    steps = 0

    def __init__(self, params, batch, device) -> None:
        ScriptedSampler.steps = 0

    def sample(self, logits, past=None, generated=None):
        ScriptedSampler.steps += 1
        return torch.tensor([ScriptedSampler.script[ScriptedSampler.steps - 1]])


@pytest.mark.parametrize("show", [False, True])
def test_chat_hides_or_shows_reasoning_and_stops_at_return(harmony_checkpoint, monkeypatch, capsys, show):
    import io
    import ember.engine
    from ember.cli import main
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(harmony_checkpoint)
    # generation_config.json stops at <|return|> only; ember chat adds <|call|> to the stops of a harmony model
    out = ("<|channel|>analysis<|message|>w20 w21<|end|><|start|>assistant<|channel|>final<|message|>w30 w31<|call|>"
           "w40 w41 w42")
    ScriptedSampler.script = tok.encode(out, add_special_tokens=False)
    monkeypatch.setattr(ember.engine, "Sampler", ScriptedSampler)
    prompts = []
    render_chat = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template",
                        lambda self, *a, **kw: prompts.append(render_chat(self, *a, **kw)) or prompts[-1])
    monkeypatch.setattr("sys.stdin", io.StringIO("w3 w4\n"))
    args = ["chat", str(harmony_checkpoint), "-n", "20", "--dtype", "fp32", "--reasoning-effort", "low"]
    assert main(args + (["--show-reasoning"] if show else [])) == 0
    stdout = capsys.readouterr().out
    assert ScriptedSampler.steps == ScriptedSampler.script.index(tok.token_to_id("<|call|>")) + 1
    assert "Reasoning: low" in prompts[-1]
    assert "w30 w31" in stdout and "w40" not in stdout and "<|" not in stdout
    if show:
        assert "[reasoning] w20 w21\nw30 w31" in stdout
    else:
        assert "w20" not in stdout and "reasoning" not in stdout


def test_server_passes_reasoning_effort_to_the_harmony_template(harmony_checkpoint, monkeypatch):
    """Chat completions' ``reasoning_effort`` and the Responses API's ``reasoning.effort`` reach the template."""
    from test_server import MODEL, ServerThread
    from ember.tokenizer import Tokenizer

    seen = []
    render_chat = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template",
                        lambda self, *a, **kw: seen.append(render_chat(self, *a, **kw)) or seen[-1])
    with ServerThread(harmony_checkpoint, max_batch=2, num_blocks=64) as srv:
        client = srv.client()
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w3"}], max_tokens=3,
                                           temperature=0, reasoning_effort="high")
        assert r.usage.prompt_tokens > 0 and "Reasoning: high" in seen[-1]
        client.responses.create(model=MODEL, input="w3", max_output_tokens=3, temperature=0,
                                reasoning={"effort": "low"})
        assert "Reasoning: low" in seen[-1]


def test_paged_cache_gives_window_blocks_back_and_outputs_stay_identical(gpt_oss_checkpoint):
    """A generation 10x the window: the sliding layers' blocks stay bounded, the full layer's grow, tokens equal the
    engine's (whose sliding layers keep a ring)."""
    folder, _ = gpt_oss_checkpoint
    llm = ember.load(folder, dtype="fp32")
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 13)]
    alone = [llm.generate(p, max_new_tokens=60, temperature=0.0, ignore_eos=True).token_ids for p in prompts]
    sched = BatchScheduler(llm, max_batch=2, num_blocks=80, block_size=2, prefill_chunk=4)
    wpool = sched.cache.window_pool
    assert wpool is not None and sched.cache.windowed == [True, False, True]
    per_seq = sched.cache.window_blocks_per_seq()
    assert wpool.capacity == 2 * per_seq < 80 // 2  # far fewer than the main pool's blocks
    held = []
    real_forward = sched._forward
    sched._forward = lambda seqs, news, proposals=None: (real_forward(seqs, news, proposals),
                                         held.append((wpool.capacity - wpool.num_free, [len(s.table) for s in seqs],
                                                      [(n, len(s.window_table) - s.window_freed)
                                                       for s, n in zip(seqs, news)])))[0]
    assert scheduled_greedy(sched, prompts, 60) == alone
    # window 6, blocks of 2: a decode step reads 6 tokens back, at most 4 blocks per sequence
    assert max(k for _, _, rows in held for n, k in rows if n == 1) <= 4
    assert max(h for h, _, _ in held) <= 2 * per_seq
    assert max(max(t) for _, t, _ in held) >= (13 + 59) // 2  # the full layer's table grew with the sequence
    assert wpool.num_free == wpool.capacity and sched.pool.num_free == sched.pool.capacity  # all back at the end
    assert sched.metrics()["kv_window_blocks_free"] == wpool.capacity


# ---------------------------------------------------------------- LoRA (ember tune) on gpt-oss, float and MXFP4 base
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora_loss_and_grads_vs_peft(ours, hf, tmp_path, what: str) -> None:
    """Ember's training forward (loss, LoRA grads) against HF+PEFT with the same adapters; the saved adapter loads in
    PEFT with the same logits."""
    import copy

    import peft
    from ember.train.adapter_files import save_adapter
    from ember.train.forward import batch_loss_sum
    from ember.train.lora import LoRAConfig, inject_lora, lora_modules

    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=ATTN)
    inject_lora(ours, cfg, seed=0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=ATTN))
    g = torch.Generator().manual_seed(11)
    mods = lora_modules(ours)
    with torch.no_grad():  # both start from the same non-zero A and B, so every gradient is non-trivial
        for name, m in mods.items():
            m.lora_A.copy_(0.1 * torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    ids = torch.randint(3, 256, (2, 20), generator=g)  # past the window of 6
    labels = ids.clone()
    labels[:, :4] = -100
    pos = torch.arange(20).expand(2, 20)
    loss_sum, n = batch_loss_sum(ours, ids, torch.roll(labels, -1, 1).index_fill(1, torch.tensor([19]), -100), pos)
    (loss_sum / n).backward()
    logits = pm(input_ids=ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    ref.backward()
    assert abs((loss_sum / n).item() - ref.item()) < 1e-5, f"{what}: loss {(loss_sum / n).item()} vs PEFT {ref.item()}"
    for name, m in mods.items():
        layer = pm.base_model.model.get_submodule(name)
        for ours_p, theirs in ((m.lora_A, layer.lora_A["default"].weight), (m.lora_B, layer.lora_B["default"].weight)):
            assert_close(ours_p.grad, theirs.grad, 1e-5 * max(1.0, theirs.grad.abs().max().item()), f"{what} {name} grad")
    save_adapter(ours, tmp_path / "ad", cfg, "base")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()
    with torch.no_grad():
        assert_close(ours(ids), back(ids).logits, FP32_TOL, f"{what}: Ember adapter in PEFT")


def test_lora_training_forward_matches_peft(gpt_oss_checkpoint, tmp_path):
    folder, hf = gpt_oss_checkpoint
    _lora_loss_and_grads_vs_peft(load_model(folder, dtype="fp32"), hf, tmp_path, "float base")


def test_lora_over_the_mxfp4_base_matches_peft_on_its_dequantized_copy(gpt_oss_checkpoint, tmp_path):
    """QLoRA-style: the experts stay MXFP4 (frozen buffers, dequantized tile by tile in the training forward)."""
    import copy

    from ember.loading.quantized import quantize_checkpoint
    from ember.quant.mxfp4 import Mxfp4Experts

    folder, hf = gpt_oss_checkpoint
    quantize_checkpoint(folder, tmp_path / "mxfp4", "mxfp4")
    ours = load_model(tmp_path / "mxfp4", dtype="fp32")
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for i, layer in enumerate(ours.model.layers):
            assert isinstance(layer.mlp.experts, Mxfp4Experts)
            for kind, w in layer.mlp.experts.dequantized(torch.float32).items():
                getattr(ref.model.layers[i].mlp.experts, kind).copy_(w)
    _lora_loss_and_grads_vs_peft(ours, ref, tmp_path, "mxfp4 base")
    assert all(not t.requires_grad for n, t in ours.named_parameters() if "lora_" not in n)


def test_tune_trains_gpt_oss_on_the_mxfp4_base(gpt_oss_checkpoint, tmp_path):
    from ember.loading.quantized import quantize_checkpoint
    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder, _ = gpt_oss_checkpoint
    quantize_checkpoint(folder, tmp_path / "mxfp4", "mxfp4")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{3 + (i * 7 + j) % 200}" for j in range(24))}) + "\n"
                            for i in range(16)))
    cfg = TrainConfig(rank=4, alpha=8, steps=8, lr=1e-2, batch=2, seq_len=24, dtype="fp32")  # all-linear
    res = tune(tmp_path / "mxfp4", data, tmp_path / "out", cfg, progress=False, log=lambda s: None)
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(raw["target_modules"]) == sorted(ATTN)  # as PEFT's all-linear on HF's gpt-oss
    assert res.metrics[-1].loss < res.metrics[0].loss
    from ember.errors import TrainingError
    with pytest.raises(TrainingError, match="fused 3-D"):
        tune(tmp_path / "mxfp4", data, tmp_path / "out2", TrainConfig(steps=1, targets="q_proj,down_proj"),
             progress=False, log=lambda s: None)
