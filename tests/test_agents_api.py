"""Tool calling, reasoning, the Responses, Anthropic Messages and embeddings APIs, end to end.

A tiny random Qwen3 with a byte-level BPE tokenizer whose chat template renders tools the Hermes
way (``<tool_call>`` JSON) and opens ``<think>`` for the model unless ``enable_thinking`` is false.
A random model never chooses a tool by itself, so calls are forced (``tool_choice`` required or
named): the constrained decoder must then write arguments that validate against the tool's schema.
Clients: the official ``openai`` and ``anthropic`` packages, the OpenAI Agents SDK, raw ``httpx``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import pytest

import ember
from ember.chat_formats import FORMATS, ForcedCallParser, OutputParser, ParsedOutput
from test_server import ServerThread

MODEL = "tiny"
VOCAB = 400
HERMES = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "Call a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")
PLAIN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ['{"city": "Paris", "unit": "celsius", "days": 3, "ok": true}', "the weather in paris is warm and blue",
          '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "[1, 2, 3.5, -4] false null"] * 10

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
GREEDY = dict(temperature=0)


def save_tokenizer(folder: Path, template: str) -> None:
    """Byte-level BPE with ChatML specials (<|im_end|> ends a turn) and Qwen's non-special <tool_call>/<think> tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = template
    fast.save_pretrained(folder)


def _checkpoint(hf_checkpoint, tmp_path_factory, template: str) -> Path:
    src, _ = hf_checkpoint("qwen3", vocab_size=VOCAB, max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("agents-model")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, folder / f)
    save_tokenizer(folder, template)
    return folder


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory) -> Path:
    return _checkpoint(hf_checkpoint, tmp_path_factory, HERMES)


@pytest.fixture(scope="module")
def srv(model_dir):
    with ServerThread(model_dir, max_batch=8, max_queue=32, num_blocks=257, api_key="sekret") as s:
        yield s


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return srv.client(api_key="sekret")


def validate_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def post(srv, path: str, body, headers=None) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60,
                      headers={"Authorization": "Bearer sekret", **(headers or {})})


# ----------------------------------------------------------------------------- parsers (no server)


@pytest.mark.parametrize("fmt, text, calls, content", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>'
               '{"name": "g", "arguments": {}}</tool_call>', [("f", {"a": 1}), ("g", {})], "Sure.\n"),
    ("hermes", "no <tool_call> json here </tool_call> ok", [], "no <tool_call> json here </tool_call> ok"),
    ("llama3", ' {"name": "f", "parameters": {"q": "x"}}', [("f", {"q": "x"})], ""),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": 2}}',
     [("f", {}), ("g", {"b": 2})], ""),
    ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}]', [("f", {"a": [1]})], "ok "),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', [("f", {"a": 1}), ("g", {})], ""),
])
def test_family_parsers_in_any_chunking(fmt, text, calls, content):
    for cut in (1, 3, 7, len(text)):
        p, out = OutputParser(FORMATS[fmt]), ParsedOutput()
        for k in range(0, len(text), cut):
            out.add(p.feed(text[k:k + cut]))
        out.add(p.finish())
        assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls
        assert out.content == content and len({c.id for c in out.calls}) == len(calls)


def test_reasoning_split_and_forced_parser_streams_arguments():
    text = "let me see</think>\n\nIt is <b>warm</b>."
    for cut in (1, 2, 5):
        p, out = OutputParser(None, reasoning=True, in_reasoning=True), ParsedOutput()
        for k in range(0, len(text), cut):
            out.add(p.feed(text[k:k + cut]))
        out.add(p.finish())
        assert (out.reasoning, out.content) == ("let me see", "It is <b>warm</b>.")
    prefix, suffix = FORMATS["hermes"].forced_call("f")
    p = ForcedCallParser([(prefix, suffix, "f")])
    out, frags = ParsedOutput(), []
    for ch in prefix + '{"a": [1, 2]}' + suffix:
        ds = p.feed(ch)
        frags += [d.text for d in ds if d.kind == "args"]
        out.add(ds)
    out.add(p.finish())
    assert out.calls[0].name == "f" and out.calls[0].arguments == '{"a": [1, 2]}' and len(frags) > 5


# ----------------------------------------------------------------------------- chat completions with tools


def test_named_tool_call_validates_plain_and_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "weather in paris?"}], tools=[WEATHER, CLOCK],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, **GREEDY)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    assert msg.tool_calls[0].id.startswith("call_")
    validate_call("get_weather", msg.tool_calls[0].function.arguments)
    # streamed: the name first (with id and index), then argument fragments that add up to the same call
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id and deltas[0].index == 0
    assert all(d.index == 0 and d.function.name is None for d in deltas[1:]) and len(deltas) > 2
    args = "".join(d.function.arguments or "" for d in deltas)
    assert args == msg.tool_calls[0].function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


def test_required_tool_call_at_random_temperatures_always_validates(client):
    async def one(c, seed):
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "do something"}], tools=[WEATHER, CLOCK],
            tool_choice="required", max_tokens=60, temperature=1.5, seed=seed)
        return r.choices[0]

    async def run():
        c = openai.AsyncOpenAI(base_url=client.base_url, api_key="sekret", max_retries=0)
        return await asyncio.gather(*[one(c, s) for s in range(8)])

    for ch in asyncio.run(run()):
        assert ch.finish_reason == "tool_calls", ch
        call = ch.message.tool_calls[0]
        validate_call(call.function.name, call.function.arguments)


def test_two_turn_tool_loop(client):
    messages = [{"role": "system", "content": "you help"}, {"role": "user", "content": "weather in oslo?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                        max_tokens=60, **GREEDY)
    call = r1.choices[0].message.tool_calls[0]
    messages += [r1.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                        max_tokens=6, **GREEDY)
    assert r2.choices[0].finish_reason == "length" and r2.choices[0].message.tool_calls is None
    # the second prompt holds the first turn, its call and the tool's answer
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens


def test_reasoning_content_and_template_kwargs(client, model_dir):
    ref = ember.load(model_dir, device="cpu", dtype="fp32")
    msgs = [{"role": "user", "content": "the weather"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, extra_body={"ignore_eos": True}, **GREEDY)
    # the template opens <think> for the model: everything it writes here is reasoning
    r = client.chat.completions.create(**kw)
    want = ref.generate(msgs, max_new_tokens=10, temperature=0, ignore_eos=True).text
    assert r.choices[0].message.reasoning_content == want.split("</think>")[0] and not r.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices) \
        == r.choices[0].message.reasoning_content
    # enable_thinking false closes the think block in the prompt: the same tokens are content
    kw["extra_body"] = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.reasoning_content is None and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_chat(msgs, enable_thinking=False))


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "type 'object'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "a+"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters", "pattern"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "1"}]},
     "messages.1.tool_call_id", "call_9"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.0", "text only"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
])
def test_bad_tool_requests_name_the_field(srv, body, param, words):
    full = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body}
    r = post(srv, "/chat/completions", full)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_template_without_tools_gets_the_fallback(hf_checkpoint, tmp_path_factory):
    folder = _checkpoint(hf_checkpoint, tmp_path_factory, PLAIN)
    with ServerThread(folder, max_batch=4, num_blocks=129) as s:
        c = s.client()
        msgs = [{"role": "user", "content": "weather?"}]
        plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, **GREEDY)
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                      max_tokens=60, **GREEDY)
        call = r.choices[0].message.tool_calls[0]
        validate_call("get_weather", call.function.arguments)
        # the tools were described in a system message (not silently dropped)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50
        msgs += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=3, **GREEDY)
        assert r2.choices[0].finish_reason in ("length", "stop", "tool_calls")


# ----------------------------------------------------------------------------- Anthropic Messages


def _anthropic(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base, api_key="sekret", max_retries=0)  # sends x-api-key


def test_anthropic_text_tool_use_and_stream(srv, client):
    a = _anthropic(srv)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "the weather"}]}]
    r = a.messages.create(model=MODEL, max_tokens=8, messages=msgs, system="be brief", extra_body={"temperature": 0},
                          thinking={"type": "disabled"})
    ref = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the weather"}],
        max_tokens=8, extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **GREEDY)
    assert r.type == "message" and r.content[0].type == "text" and r.content[0].text == ref.choices[0].message.content
    assert r.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert a.messages.count_tokens(model=MODEL, messages=msgs, system="be brief",
                                   thinking={"type": "disabled"}).input_tokens == r.usage.input_tokens
    tools = [{"name": "get_weather", "description": "weather", "input_schema": SCHEMAS["get_weather"]}]
    t = a.messages.create(model=MODEL, max_tokens=80, messages=msgs, tools=tools, extra_body={"temperature": 0},
                          tool_choice={"type": "tool", "name": "get_weather"})
    use = [b for b in t.content if b.type == "tool_use"]
    assert t.stop_reason == "tool_use" and len(use) == 1 and use[0].id.startswith("toolu_")
    jsonschema.validate(use[0].input, SCHEMAS["get_weather"])
    # a tool_result continues the conversation
    follow = msgs + [{"role": "assistant", "content": [b.model_dump() for b in t.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "21C"}]}]
    assert a.messages.create(model=MODEL, max_tokens=3, messages=follow, tools=tools).usage.output_tokens >= 1
    # streamed: the event sequence, and the same tool_use as without streaming
    with a.messages.stream(model=MODEL, max_tokens=80, messages=msgs, tools=tools, extra_body={"temperature": 0},
                           tool_choice={"type": "any"}) as st:
        kinds = [e.type for e in st]
        final = st.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert final.stop_reason == "tool_use"
    jsonschema.validate(final.content[-1].input, SCHEMAS[final.content[-1].name])
    # with thinking on, the template opens <think>: the stream carries a thinking block
    with a.messages.stream(model=MODEL, max_tokens=6, messages=msgs, extra_body={"temperature": 0}) as st:
        final = st.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking and final.stop_reason == "max_tokens"


def test_anthropic_errors_and_auth(srv):
    a = _anthropic(srv)
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert e.value.body["type"] == "error" and "text only" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}],
                          tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice={"type": "tool", "name": "g"})
    assert "tool_choice" in e.value.body["error"]["message"]
    r = httpx.post(f"{srv.url}/messages", json={"model": MODEL, "messages": []}, headers={"x-api-key": "sekret"})
    assert r.status_code == 400 and r.json()["type"] == "error" and "messages" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=srv.base, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"


# ----------------------------------------------------------------------------- Responses


def test_responses_text_function_calls_and_previous_id(client, srv):
    r = client.responses.create(model=MODEL, input="the weather", instructions="be brief", max_output_tokens=6,
                                temperature=0, reasoning={"effort": "low"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    tools = [{"type": "function", "name": "get_weather", "description": "weather",
              "parameters": SCHEMAS["get_weather"]}]
    r1 = client.responses.create(model=MODEL, input=[{"role": "user", "content": "weather in rome?"}], tools=tools,
                                 tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80,
                                 temperature=0)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert r1.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    validate_call("get_weather", calls[0].arguments)
    r2 = client.responses.create(model=MODEL, previous_response_id=r1.id, tools=tools, max_output_tokens=4,
                                 input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                         "output": '{"temp": 20}'}])
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    r = post(srv, "/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_gone"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    # streamed: typed events, argument deltas adding up to the call, and the same call as without streaming
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "weather in rome?"}],
                                          tools=tools, tool_choice="required", max_output_tokens=80, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == calls[0].arguments
    assert [e.sequence_number for e in events] == list(range(len(events)))


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_deterministic_batched_truncated_base64(client):
    texts = ["the weather in paris", "blue", "warm and blue and warm and blue over the town", "[1, 2]"]
    one = [client.embeddings.create(model=MODEL, input=t).data[0].embedding for t in texts]
    again = client.embeddings.create(model=MODEL, input=texts[0]).data[0].embedding
    assert again == one[0]
    batch = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in batch.data] == [0, 1, 2, 3] and batch.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in batch.data]), np.array(one), atol=1e-5)
    assert abs(np.linalg.norm(one[0]) - 1) < 1e-5
    small = client.embeddings.create(model=MODEL, input=texts[0], dimensions=16).data[0].embedding
    want = np.array(one[0][:16]) / np.linalg.norm(one[0][:16])
    assert len(small) == 16 and np.allclose(small, want, atol=1e-5)
    r = httpx.post(f"{client.base_url}embeddings", json={"model": MODEL, "input": texts[:2], "encoding_format": "base64"},
                   headers={"Authorization": "Bearer sekret"}).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, one[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=10_000)
    assert e.value.body["param"] == "dimensions"


def test_last_token_pooling_from_the_sentence_transformers_config(model_dir, tmp_path):
    from ember.server.embeddings import pooling_mode

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert pooling_mode(None, str(tmp_path)) == "last" and pooling_mode("mean", str(tmp_path)) == "mean"
    assert pooling_mode(None, str(model_dir)) == "mean"
    with ServerThread(model_dir, num_blocks=64, pooling="last") as s, ServerThread(model_dir, num_blocks=64) as m:
        last = s.client().embeddings.create(model=MODEL, input=["a b", "the weather"]).data
        mean = m.client().embeddings.create(model=MODEL, input=["a b", "the weather"]).data
        assert not np.allclose(last[1].embedding, mean[1].embedding, atol=1e-3)
        alone = s.client().embeddings.create(model=MODEL, input="the weather").data[0].embedding
        np.testing.assert_allclose(last[1].embedding, alone, atol=1e-5)


# ----------------------------------------------------------------------------- OpenAI Agents SDK


def test_openai_agents_sdk_run_with_a_function_tool(srv):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    model = OpenAIResponsesModel(model=MODEL, openai_client=openai.AsyncOpenAI(base_url=srv.url, api_key="sekret",
                                                                                max_retries=0))
    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, "weather in paris?", max_turns=2))
    assert len(seen) == 1 and isinstance(seen[0], str)
    assert result.final_output == f"sunny in {seen[0]}"
