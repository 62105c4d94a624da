"""Gemma 4's thought channel and calls, DeepSeek-V3/R1's (and V3.1's) call sections: parsed into reasoning, content
and tool calls, streamed or whole, in ``ember serve``'s chat completions, Responses and Anthropic Messages.

The end-to-end runs use a *scripted* model: a one-layer Llama whose attention and MLP write nothing, one-hot
embeddings and an LM head that maps each token to one successor, so greedy decoding writes a fixed chain of tokens
after the prompt's last token: exactly the output a real model of the family writes (its markers as special
tokens), through the real server. The chat templates are small reconstructions of each family's documented
layout (turn markers, thinking, tool syntax): the published files are not available offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import pytest
import torch

from ember.chat_formats import (FORMATS, ForcedCallParser, OutputParser, ParsedOutput, detect_format,
                                is_reasoning_template, prompt_in_reasoning)
from ember.chat_formats.gemma4 import relaxed_json
from test_server import MODEL, ServerThread

Q = '<|"|>'  # Gemma 4's string marker
GEMMA4 = (
    "{{ bos_token }}{% if tools or enable_thinking %}<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}"
    "{% for t in tools or [] %}<|tool>declaration:{{ t.function.name }}{{ t.function.parameters | tojson }}<tool|>"
    "{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}<|turn>{{ role }}\n"
    "{{ m.content or '' }}{% for tc in m.tool_calls or [] %}<|tool_call>call:{{ tc.function.name }}{{ '{' }}"
    "{% for k, v in tc.function.arguments.items() %}{{ k }}:{% if v is string %}<|\"|>{{ v }}<|\"|>"
    "{% else %}{{ v | tojson }}{% endif %}{{ ',' if not loop.last }}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}"
    "<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if enable_thinking is defined and not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}")
DEEPSEEK_V3 = (
    "{{ bos_token }}{% if tools %}## Tools\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}"
    "{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% elif m.role == 'assistant' %}<｜Assistant｜>"
    "{{ m.content or '' }}{% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for tc in m.tool_calls %}"
    "<｜tool▁call▁begin｜>{{ tc.type }}<｜tool▁sep｜>{{ tc.function.name }}\n```json\n"
    "{{ tc.function.arguments | tojson }}\n```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}"
    "<｜end▁of▁sentence｜>{% elif m.role == 'tool' %}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{ m.content }}"
    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
DEEPSEEK_R1 = DEEPSEEK_V3.replace("<｜Assistant｜>{% endif %}", "<｜Assistant｜><think>\n{% endif %}")
DEEPSEEK_V31 = DEEPSEEK_V3.replace("{{ tc.type }}<｜tool▁sep｜>{{ tc.function.name }}\n```json\n", "{{ tc.function.name }}"
                                   "<｜tool▁sep｜>").replace("\n```<｜tool▁call▁end｜>", "<｜tool▁call▁end｜>")


def parse(fmt, text: str, cut: int, reasoning: bool = True, in_reasoning: bool = False) -> ParsedOutput:
    p, out = OutputParser(fmt, reasoning, in_reasoning), ParsedOutput()
    for k in range(0, len(text), cut):
        out.add(p.feed(text[k:k + cut]))
    out.add(p.finish())
    return out


# ----------------------------------------------------------------------------- parsers (no server)


@pytest.mark.parametrize("fmt, text, want", [
    ("gemma4", f"<|channel>thought\nLet me check.<channel|>Checking.<|tool_call>call:get_weather{{city:{Q}Paris, "
               f"{{\"x\": 1}}{Q},days:3,units:[{Q}c{Q},2],deep:{{ok:true,none:null}}}}<tool_call|>"
               "<|tool_call>call:get_time{}<tool_call|>",
     ("Let me check.", "Checking.", [("get_weather", {"city": 'Paris, {"x": 1}', "days": 3, "units": ["c", 2],
                                                      "deep": {"ok": True, "none": None}}), ("get_time", {})])),
    ("gemma4", "<|channel>thought\n<channel|>Hi <b>there</b>.", ("", "Hi <b>there</b>.", [])),
    ("gemma4", f"<|tool_call>call:f{{q:{Q}unclosed}}<tool_call|> after",
     ("", f"<|tool_call>call:f{{q:{Q}unclosed}}<tool_call|> after", [])),
    ("deepseek_v3", "<think>plan</think>\n\nSure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                    "get_weather\n```json\n{\"city\": \"Paris\", \"days\": 3}\n```<｜tool▁call▁end｜>\n"
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>"
                    "<｜tool▁calls▁end｜>",
     ("plan", "Sure.", [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})])),
    ("deepseek_v31", "Ok.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}"
                     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", ("", "Ok.", [("get_weather", {"city": "Oslo"})])),
])
def test_outputs_split_into_reasoning_content_and_calls_in_any_chunking(fmt, text, want):
    for cut in (1, 2, 5, len(text)):
        out = parse(FORMATS[fmt], text, cut)
        assert (out.reasoning, out.content) == want[:2], cut
        assert [(c.name, json.loads(c.arguments)) for c in out.calls] == want[2]
        assert len({c.id for c in out.calls}) == len(want[2])


def test_bodies_that_are_not_calls_stay_content():
    g, d = FORMATS["gemma4"], FORMATS["deepseek_v3"]
    assert g.parse_body("get_weather{}") is None and g.parse_body("call:f[1]") is None
    assert g.parse_body("call:f{a:1} trailing") is None and g.parse_body(f"call:f{{a:{Q}x}}") is None
    assert g.parse_body('call:f{"a": "plain json"}') == [("f", '{"a": "plain json"}')]
    assert d.parse_body("no calls") is None
    assert d.parse_body("<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\nnot json\n```<｜tool▁call▁end｜>") is None
    assert d.parse_body("<｜tool▁call▁begin｜>f<｜tool▁sep｜>{}") is None  # cut off before the call's end
    assert relaxed_json(f"[{Q}a{Q}, {{k: {Q}v{Q}}}]") == ["a", {"k": "v"}]
    with pytest.raises(ValueError):
        relaxed_json(f"{{a: {Q}x}}")


@pytest.mark.parametrize("fmt", ["gemma4", "deepseek_v3", "deepseek_v31"])
def test_forced_calls_stream_their_json_arguments(fmt):
    prefix, suffix = FORMATS[fmt].forced_call("get_weather")
    p, out = ForcedCallParser([(prefix, suffix, "get_weather")]), ParsedOutput()
    for ch in prefix + '{"city": "Rome"}' + suffix:
        out.add(p.feed(ch))
    out.add(p.finish())
    assert [(c.name, c.arguments) for c in out.calls] == [("get_weather", '{"city": "Rome"}')]
    # and the free-running parser reads the forced text as the same call
    assert [(c.name, c.arguments) for c in parse(FORMATS[fmt], prefix + '{"city": "Rome"}' + suffix, 3).calls] \
        == [("get_weather", '{"city": "Rome"}')]


@pytest.mark.parametrize("template, fmt", [(GEMMA4, "gemma4"), (DEEPSEEK_V3, "deepseek_v3"),
                                           (DEEPSEEK_V31, "deepseek_v31")])
def test_templates_pick_the_format_and_render_as_transformers(tmp_path, template, fmt):
    from transformers import AutoTokenizer

    from conftest import save_word_tokenizer
    from ember.tokenizer import Tokenizer

    assert detect_format(template).name == fmt
    assert is_reasoning_template(template) == (fmt == "gemma4")
    save_word_tokenizer(tmp_path, chat_template=template)
    chat = [{"role": "user", "content": "w5"},
            {"role": "assistant", "content": "w6", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
            {"role": "tool", "content": "sunny"}, {"role": "user", "content": "w7"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(chat, tools=tools, add_generation_prompt=True)
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(chat, tools=tools, add_generation_prompt=True,
                                                                      tokenize=False)
    assert ours == ref
    # a past call renders in the syntax the parser reads back
    body = ours[ours.index(FORMATS[fmt].start_markers[0]):]
    got = parse(FORMATS[fmt], body[:body.index(FORMATS[fmt].end_marker) + len(FORMATS[fmt].end_marker)], 4)
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("get_weather", {"city": "Paris", "days": 3})]
    if fmt == "gemma4":  # thinking off: the template closes an empty thought for the model
        off = Tokenizer.from_dir(tmp_path).apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False)
        assert off.endswith("<|channel>thought\n<channel|>") and not prompt_in_reasoning(off, FORMATS[fmt].think)


# ----------------------------------------------------------------------------- scripted model, real server


def save_scripted_model(folder: Path, template: str, special: list[str], chain: list[str], eos: str) -> None:
    """A model that writes ``chain[1:]`` then ``eos`` after a prompt ending in ``chain[0]`` (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Fuse()  # tokens join as written
    plain = [t for t in dict.fromkeys(chain) if t not in special]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, bos_token="<bos>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    ids = [tok.token_to_id(t) for t in chain] + [tok.token_to_id(eos)]
    assert len(set(ids[:-1])) == len(ids) - 1, "a scripted token has one successor"
    V = tok.get_vocab_size()
    succ = dict.fromkeys(range(V), ids[-1]) | dict(zip(ids, ids[1:]))
    H = V + V % 2  # RoPE wants an even head size
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=H, max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=ids[-1], bos_token_id=tok.token_to_id("<bos>"), pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V, H))
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        for i, j in succ.items():  # token i's hidden state (one-hot, normed) scores its successor j
            model.lm_head.weight[j, i] = 10.0
    model.save_pretrained(folder)


FORECAST = {"type": "function", "function": {"name": "get_forecast", "description": "forecast",
                                              "parameters": {"type": "object", "properties": {
                                                  "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}}
SCRIPTS = {
    # after its calls Gemma 4 opens the tool's response (and, not stopped there, would make one up)
    "gemma4": (GEMMA4, ["<|turn>", "<turn|>", "<bos>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", Q,
                        "<|tool_response>"],
               ["model\n", "<|channel>", "thought\n", "Let me check.", "<channel|>", "Checking.", "<|tool_call>",
                "call:get_forecast{", "days:", "3", ",metric:", "true", "}", "<tool_call|>", "<|tool_response>",
                "response:get_forecast{made_up:1}"], "<turn|>"),
    # R1's template opens the reasoning for the model
    "deepseek_r1": (DEEPSEEK_R1, ["<｜end▁of▁sentence｜>", "<bos>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
                                  "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"],
                    ["<think>\n", "Let me check.", "</think>", "Checking.", "<｜tool▁calls▁begin｜>",
                     "<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>", "get_forecast\n```json\n",
                     '{"days": 3, "metric": true}', "\n```", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"],
                    "<｜end▁of▁sentence｜>"),
}


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def scripted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"scripted-{request.param}")
    save_scripted_model(folder, *SCRIPTS[request.param])
    with ServerThread(folder, max_batch=2, num_blocks=64) as srv:
        yield srv


WANT = ("Let me check.", "Checking.", [("get_forecast", {"days": 3, "metric": True})])


def test_chat_completions_split_the_scripted_output_streamed_and_whole(scripted):
    srv = scripted
    client = srv.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "forecast?"}], tools=[FORECAST], max_tokens=40,
              temperature=0)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert (msg.model_extra.get("reasoning_content"), msg.content) == WANT[:2]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == WANT[2]
    chunks = [ch.choices[0].delta for ch in client.chat.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in chunks) == WANT[0]
    assert "".join(d.content or "" for d in chunks) == WANT[1]
    calls = [tc for d in chunks for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_forecast"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == WANT[2][0][1]
    # without tools in the request the call markup is the model's text, and reasoning still splits off
    r = client.chat.completions.create(**{**kw, "tools": None})
    assert r.choices[0].message.model_extra.get("reasoning_content") == WANT[0]
    assert r.choices[0].message.content.startswith("Checking.") and "get_forecast" in r.choices[0].message.content


def test_responses_and_anthropic_messages_read_the_same_output(scripted):
    srv = scripted
    client = srv.client()
    tools = [{"type": "function", "name": "get_forecast", "parameters": FORECAST["function"]["parameters"]}]
    r = client.responses.create(model=MODEL, input="forecast?", tools=tools, max_output_tokens=40, temperature=0)
    kinds = {o.type: o for o in r.output}
    assert "reasoning" in kinds and "".join(c.text for c in kinds["reasoning"].content or []) == WANT[0]
    assert kinds["message"].content[0].text == WANT[1]
    assert (kinds["function_call"].name, json.loads(kinds["function_call"].arguments)) == WANT[2][0]
    a = anthropic.Anthropic(base_url=srv.base, api_key="none", max_retries=0)
    body = dict(model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "forecast?"}],
                tools=[{"name": "get_forecast", "input_schema": FORECAST["function"]["parameters"]}],
                extra_body={"temperature": 0})
    m = a.messages.create(**body)
    blocks = {b.type: b for b in m.content}
    assert m.stop_reason == "tool_use" and blocks["thinking"].thinking == WANT[0] and blocks["text"].text == WANT[1]
    assert (blocks["tool_use"].name, blocks["tool_use"].input) == WANT[2][0]
    events = [json.loads(line[6:]) for line in httpx.post(
        f"{srv.base}/v1/messages", json={**{k: v for k, v in body.items() if k != "extra_body"},
                                         **body["extra_body"], "stream": True}, timeout=60).text.splitlines()
        if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == WANT[0]
    assert "".join(d.get("text", "") for d in deltas) == WANT[1]
    assert json.loads("".join(d.get("partial_json", "") for d in deltas)) == WANT[2][0][1]
