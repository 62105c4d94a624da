"""``ember serve`` end to end: a real uvicorn server on an ephemeral loopback port, driven by the
official ``openai`` client (sync, async, streaming) and raw ``httpx`` for malformed input.

The model is a tiny random Llama with a byte-level BPE tokenizer (so JSON can be written) and a
chat template. Reference outputs come from a separate :func:`ember.load` of the same folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

import ember
from ember.errors import InsufficientMemoryError
from ember.server.app import ServerSettings, create_app, kv_block_bytes, kv_pool_blocks

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB = 384
MODEL = "tiny"
CORPUS = ['{"name": "Alice", "age": 31, "tags": ["a", "b"], "ok": true, "x": null}',
          "the sea is blue and the sun is warm over the little town", "[1, 2, 3.5, -4] false"] * 10


def save_bpe_tokenizer(folder: Path, vocab_size: int = VOCAB, chat_template: str | None = CHATML) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few lines, saved as HF does; ids 0-2 = <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory) -> Path:
    src, _ = hf_checkpoint("llama", vocab_size=VOCAB)
    folder = tmp_path_factory.mktemp("serve-model")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(src / f, folder / f)
    save_bpe_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def ref(model_dir):
    """A separate engine for reference outputs (the server's runs in its own thread)."""
    return ember.load(model_dir, device="cpu", dtype="fp32")


class ServerThread:
    """uvicorn on 127.0.0.1:0 in a daemon thread; ``url`` is the /v1 base."""

    def __init__(self, model_dir: Path, load: dict | None = None, **settings) -> None:
        engine = ember.load(model_dir, device="cpu", dtype="fp32", **(load or {}))
        self.app = create_app(engine, ServerSettings(model_name=MODEL, **settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def aclient(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health").json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """/health once nothing runs or waits (every KV block free again)."""
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["kv_blocks_free"] == h["kv_blocks_total"]:
                return h
            assert time.time() < deadline, f"server never went idle: {h}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def srv(model_dir):
    with ServerThread(model_dir, max_batch=8, max_queue=32, num_blocks=257) as s:
        yield s


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ----------------------------------------------------------------------------- endpoints


def test_models_health_metrics(srv):
    c = srv.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    h = srv.health()
    assert h["status"] == "ok" and h["kv_blocks_total"] == 256 and h["kv_blocks_free"] == 256
    text = httpx.get(f"{srv.base}/metrics").text
    assert re.search(r"^ember_kv_blocks_free \d+$", text, re.M)


def test_chat_greedy_equals_engine_and_usage_is_exact(srv, ref):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea is"}]
    r = srv.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    want = ref.generate(messages, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # max_completion_tokens is the newer name of max_tokens
    r2 = srv.client().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, **GREEDY)
    assert r2.usage.completion_tokens == 5 and want.text.startswith(r2.choices[0].message.content)


def test_completions_text_tokens_and_echo(srv, ref):
    c = srv.client()
    r = c.completions.create(model=MODEL, prompt="the sea is", max_tokens=10, **GREEDY)
    want = ref.generate("the sea is", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 10
    ids = ref.tokenizer.encode("the sea is")
    assert r.usage.prompt_tokens == len(ids)
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY)
    assert r.choices[0].text == want.text
    r = c.completions.create(model=MODEL, prompt=["the sea is", "warm"], max_tokens=4, echo=True, **GREEDY)
    assert [x.index for x in r.choices] == [0, 1] and r.choices[0].text.startswith("the sea is")
    assert r.usage.completion_tokens == 8


def test_streaming_chat_matches_non_streaming_with_usage_and_done(srv):
    c = srv.client()
    kw = dict(model=MODEL, messages=chat("the sun"), max_tokens=16, **GREEDY)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    # the wire format: SSE data lines ending in [DONE]
    with httpx.stream("POST", f"{srv.url}/completions", json={"model": MODEL, "prompt": "sea", "max_tokens": 3,
                                                               "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in resp.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


def test_eight_concurrent_greedy_requests_equal_one_at_a_time(srv, ref):
    prompts = ["the sea", "the sun is warm over the little town and the sea is blue", "blue", "31 ok",
               "warm over the little", "a b", "the little town " * 6, "sun"]

    async def one(client, i, p):
        kw = dict(model=MODEL, max_tokens=10 + i, **GREEDY)
        if i % 2:  # half chat, half completions; half of each streamed
            if i % 4 == 1:
                r = await client.chat.completions.create(messages=chat(p), **kw)
                return r.choices[0].message.content
            s = await client.chat.completions.create(messages=chat(p), stream=True, **kw)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
        if i % 4 == 0:
            r = await client.completions.create(prompt=p, **kw)
            return r.choices[0].text
        s = await client.completions.create(prompt=p, stream=True, **kw)
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    async def bad(client):  # one bad request in the middle must not disturb the others
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=4, top_p=3)

    async def run(concurrent: bool):
        client = srv.aclient()
        if concurrent:
            out = await asyncio.gather(*[one(client, i, p) for i, p in enumerate(prompts)], bad(client))
            return out[:-1]
        return [await one(client, i, p) for i, p in enumerate(prompts)]

    together = asyncio.run(run(True))
    alone = asyncio.run(run(False))
    assert together == alone
    for i, (p, got) in enumerate(zip(prompts, together)):
        want = ref.generate(chat(p) if i % 2 else p, max_new_tokens=10 + i, temperature=0, ignore_eos=True)
        assert got == want.text, f"request {i} differs from Engine.generate"
    srv.wait_idle()


def test_n_choices_seed_and_shared_prefix(srv, ref):
    c = srv.client()
    prompt = "the sun is warm over the little town and the sea is blue " * 3
    before = srv.health()["prefix_hit_tokens"]
    kw = dict(model=MODEL, prompt=prompt, n=3, max_tokens=8, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # same seed, same text
    assert len({x.text for x in a.choices}) > 1  # choice j samples with seed + j
    want = ref.generate(prompt, max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    assert a.choices[0].text == want.text
    n_prompt = len(ref.tokenizer.encode(prompt))
    assert a.usage.prompt_tokens == n_prompt and a.usage.completion_tokens == 24
    # the prompt's full blocks are computed once: the other choices (and the repeat) reuse them
    assert a.usage.prompt_tokens_details.cached_tokens >= 16
    assert b.usage.prompt_tokens_details.cached_tokens == (n_prompt - 1) // 16 * 16
    assert srv.health()["prefix_hit_tokens"] - before == 5 * ((n_prompt - 1) // 16 * 16)
    r = c.chat.completions.create(model=MODEL, messages=chat("sea"), n=2, max_tokens=3, **GREEDY)
    assert [x.index for x in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content


def test_stop_strings_length_and_eos_finish_reasons(srv, ref):
    c = srv.client()
    free = ref.generate("the sea", max_new_tokens=16, temperature=0, ignore_eos=True).text
    stop = free[4:7]
    expect = free[:free.index(stop)]
    r = c.completions.create(model=MODEL, prompt="the sea", max_tokens=16, stop=[stop, "zzzz"], **GREEDY)
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model=MODEL, prompt="the sea", max_tokens=16, stop=stop, stream=True, **GREEDY)
    chunks = [ch.choices[0] for ch in s]
    assert "".join(ch.text for ch in chunks) == expect and chunks[-1].finish_reason == "stop"
    r = c.completions.create(model=MODEL, prompt="the sea", max_tokens=5, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # EOS made certain by logit_bias: generation stops at once, the EOS token is counted, not shown
    r = c.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=5, temperature=0,
                                  logit_bias={"2": 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


def test_logprobs_chat_and_completions(srv, ref):
    c = srv.client()
    messages = chat("the sea")
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == r.choices[0].message.content
    ids = torch.tensor([ref.tokenizer.encode_chat(messages)])
    with torch.no_grad():
        first = torch.log_softmax(ref.model(ids)[0, -1].float(), -1).max().item()
    assert content[0].logprob == pytest.approx(first, abs=1e-4)
    r = c.completions.create(model=MODEL, prompt="the sea", max_tokens=5, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_penalties_match_engine(srv, ref):
    kw = dict(max_tokens=20, presence_penalty=1.5, frequency_penalty=0.7)
    r = srv.client().completions.create(model=MODEL, prompt="the sea is blue", **kw, **GREEDY)
    want = ref.generate("the sea is blue", max_new_tokens=20, temperature=0, presence_penalty=1.5,
                        frequency_penalty=0.7, ignore_eos=True)
    plain = ref.generate("the sea is blue", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert r.choices[0].text == want.text and want.text != plain.text


# ----------------------------------------------------------------------------- JSON


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "nick": {"type": ["string", "null"]},
        "home": {"$ref": "#/$defs/Place"},
    },
    "required": ["name", "age", "tags", "ok", "home"],
    "additionalProperties": False,
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                        "required": ["city"]}},
}


def test_json_object_mode_always_parses(srv):
    c = srv.client()
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=chat("json please"), max_tokens=48, temperature=1.0,
                                      seed=seed, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_outputs_validate(srv):
    c = srv.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = c.chat.completions.create(model=MODEL, messages=chat("a person"), max_tokens=120, temperature=1.0, seed=1,
                                  n=4, response_format=fmt)
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch.message.content
        jsonschema.validate(json.loads(ch.message.content), PERSON)
    # greedy and streamed: the stream concatenates to a valid document too
    s = c.chat.completions.create(model=MODEL, messages=chat("a person"), max_tokens=120, temperature=0,
                                  response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)), PERSON)
    # completions take response_format too (an extension)
    r = c.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=0,
                             extra_body={"response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "t", "schema": {
                                                                 "type": "array", "items": {"type": "integer"},
                                                                 "minItems": 2}}}})
    assert len(json.loads(r.choices[0].text)) >= 2


def test_unsupported_schema_is_a_clear_400(srv):
    c = srv.client()
    bad = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "t", "schema": bad}})
    err = e.value.body
    assert "'pattern'" in err["message"] and "#/properties/code" in err["message"]
    assert err["param"] == "response_format.json_schema.schema"


# ----------------------------------------------------------------------------- bad input, limits


def post(srv, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{srv.url}{path}", content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(f"{srv.url}{path}", json=body, **kw)


@pytest.mark.parametrize("body, status, param, words", [
    (b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    ({"model": MODEL, "messages": chat("x"), "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": MODEL}, 400, "messages", "required"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "wizard"),
    ({"model": MODEL, "messages": chat("x"), "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"model": MODEL, "messages": chat("x"), "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": MODEL, "messages": chat("x"), "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"model": MODEL, "messages": chat("x"), "stop": 5}, 400, "stop", "valid"),
    ({"model": MODEL, "messages": chat("x"), "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ({"model": "gpt-9", "messages": chat("x")}, 404, "model", "does not exist"),
    ({"model": MODEL, "messages": chat("x"), "max_tokens": 600}, 400, "max_tokens", "context of 512"),
])
def test_bad_chat_requests_are_named(srv, body, status, param, words):
    r = post(srv, "/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


def test_context_overflow_names_both_numbers(srv, ref):
    n = len(ref.tokenizer.encode_chat(chat("the sea")))
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().chat.completions.create(model=MODEL, messages=chat("the sea"), max_tokens=505)
    msg = e.value.body["message"]
    assert f"prompt ({n} tokens)" in msg and "max_tokens (505)" in msg and "512" in msg
    assert e.value.body["code"] == "context_length_exceeded"


def test_bad_completion_requests(srv):
    r = post(srv, "/completions", {"model": MODEL, "prompt": [1, 2, 99999]})
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"]
    r = post(srv, "/completions", {"model": MODEL, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = post(srv, "/completions", {"model": MODEL, "prompt": {"text": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(f"{srv.url}/nothing")
    assert r.status_code == 404 and "error" in r.json()
    srv.wait_idle()


def test_disconnect_cancels_and_frees_kv_blocks(srv):
    before = srv.health()["cancelled"]
    body = {"model": MODEL, "messages": chat("the sea"), "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{srv.url}/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert srv.health()["kv_blocks_free"] < srv.health()["kv_blocks_total"]
    h = srv.wait_idle()  # the stream was closed mid-way: its sequence is cancelled, every block is free
    assert h["cancelled"] == before + 1
    # a non-streaming client that gives up is noticed too
    body.update(stream=False, max_tokens=490)
    with pytest.raises(httpx.ReadTimeout):
        post(srv, "/chat/completions", body, timeout=0.1)
    h = srv.wait_idle()
    assert h["cancelled"] == before + 2


def test_api_key_required(model_dir):
    with ServerThread(model_dir, api_key="sekret", num_blocks=64) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{s.base}/health").status_code == 401
        assert post(s, "/chat/completions", b"not json").status_code == 401  # checked before the body
        r = s.client(api_key="sekret").chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2)
        assert r.usage.completion_tokens >= 1


def test_full_queue_gets_429_with_retry_after(model_dir):
    with ServerThread(model_dir, max_batch=1, max_queue=1, num_blocks=64) as s:
        async def one(client):
            try:
                r = await client.completions.create(model=MODEL, prompt="sea", max_tokens=300, temperature=0,
                                                    extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.RateLimitError as e:
                return e

        async def burst():
            client = s.aclient()
            return await asyncio.gather(*[one(client) for _ in range(6)])

        out = asyncio.run(burst())
        refused = [e for e in out if isinstance(e, Exception)]
        assert refused and all(int(e.response.headers["retry-after"]) >= 1 for e in refused)
        assert all(e.body["code"] == "queue_full" and "queue is full" in e.body["message"] for e in refused)
        assert [x for x in out if not isinstance(x, Exception)] == [300] * (6 - len(refused))  # the rest unharmed
        assert len(refused) <= 4  # one ran, one waited
        s.wait_idle()


def test_sigterm_shuts_down_cleanly(model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "ember.server", str(model_dir), "--port", "0", "--dtype", "fp32",
                             "--model-name", MODEL, "--shutdown-timeout", "10", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before listening"
            if m := re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
        assert url, "server did not report its address"
        body = {"model": MODEL, "prompt": "sea", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # in-flight: allowed to finish within --shutdown-timeout
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_request_that_can_never_fit_gets_400_naming_the_numbers(model_dir):
    # 16 blocks x 16 tokens = 256 tokens per request at most, below the model's context of 512
    with ServerThread(model_dir, max_batch=1, max_queue=1, num_blocks=17) as s:
        r = post(s, "/completions", {"model": MODEL, "prompt": "sea", "max_tokens": 300})
        assert r.status_code == 400 and "retry-after" not in r.headers
        err = r.json()["error"]
        assert "300" in err["message"] and "256 tokens the KV cache" in err["message"] and err["param"] == "max_tokens"
        # more sequences than can ever run or wait, even on an idle server: 400, not 429 "retry later"
        r = post(s, "/completions", {"model": MODEL, "prompt": "sea", "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "3 sequences" in r.json()["error"]["message"] and "at most 1 and queues 1" in r.json()["error"]["message"]
        assert post(s, "/completions", {"model": MODEL, "prompt": "sea", "max_tokens": 2, "n": 2}).status_code == 200


def _start_serve(model_dir, *extra) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "ember.server", str(model_dir), "--port", "0", "--dtype", "fp32",
                             "--model-name", MODEL, "--log-level", "warning", *extra],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "server exited before listening"
        if m := re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line):
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("server did not report its address")


def test_sigterm_past_the_shutdown_timeout_ends_every_request_properly(model_dir):
    proc, url = _start_serve(model_dir, "--shutdown-timeout", "0", "--max-batch", "4")
    try:
        body = {"model": MODEL, "messages": chat("the sea"), "max_tokens": 480, "temperature": 0, "ignore_eos": True}
        plain: dict = {}
        t = threading.Thread(target=lambda: plain.update(r=httpx.post(f"{url}/chat/completions", json=body, timeout=60)))
        t.start()
        base = url.removesuffix("/v1")
        with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=60) as resp:
            lines = resp.iter_lines()
            next(lines)
            deadline = time.time() + 10
            while httpx.get(f"{base}/health").json()["running"] < 2:
                assert time.time() < deadline, "the second request never started"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)  # the deadline is now: both requests are cut short
            rest = [x for x in lines if x]
        t.join(30)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        r = plain["r"]
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] < 480
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "Event loop is closed" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_serve_verb_defaults_to_loopback():
    import argparse

    from ember.commands.serve import add_parser

    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", "some/model", "--max-batch", "4"])
    assert (args.verb, args.model, args.host, args.port, args.max_batch, args.max_queue) == \
        ("serve", "some/model", "127.0.0.1", 8000, 4, 64)
    assert callable(args.func)


# ----------------------------------------------------------------------------- quantized / adapted models, KV plan


def test_int8_server_equals_local_int8_generation(model_dir):
    ref = ember.load(model_dir, device="cpu", dtype="fp32", quant="int8")
    # no num_blocks: the pool is sized from the plan (capped at max_batch full contexts of 512 tokens)
    with ServerThread(model_dir, load={"quant": "int8"}, max_batch=2, quant="int8") as s:
        h = s.health()
        assert h["kv_blocks_total"] == 2 * 512 // 16 and h["kv_budget_bytes"] > 0
        assert h["kv_pool_bytes"] == (2 * 512 // 16 + 1) * kv_block_bytes(ref.config, torch.float32, 16)
        text = httpx.get(f"{s.base}/metrics").text
        assert re.search(r"^ember_kv_budget_bytes \d+$", text, re.M)
        c = s.client()
        r = c.completions.create(model=MODEL, prompt="the sea is", max_tokens=12, **GREEDY)
        want = ref.generate("the sea is", max_new_tokens=12, temperature=0, ignore_eos=True)
        assert r.choices[0].text == want.text
        r = c.chat.completions.create(model=MODEL, messages=chat("the sun"), max_tokens=8, **GREEDY)
        assert r.choices[0].message.content == ref.generate(chat("the sun"), max_new_tokens=8, temperature=0,
                                                            ignore_eos=True).text


def test_adapter_server_equals_local_adapter_generation(model_dir, ref, tmp_path):
    from ember.loading import load_model
    from ember.train.adapter_files import save_adapter
    from ember.train.lora import LoRAConfig, inject_lora, lora_modules

    base = load_model(model_dir, dtype="fp32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")
    inject_lora(base, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero (a no-op adapter): make it change the outputs
        for m in lora_modules(base).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    adapter = save_adapter(base, tmp_path / "ad", cfg, str(model_dir))
    local = ember.load(model_dir, device="cpu", dtype="fp32", adapter=adapter)
    prompt = "the little town"
    want = local.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert want.text != ref.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).text, \
        "the adapter should change the greedy output"
    with ServerThread(model_dir, load={"adapter": adapter}, max_batch=2, num_blocks=65) as s:
        assert [m.id for m in s.client().models.list().data] == [MODEL]
        r = s.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
        assert r.choices[0].text == want.text


def test_kv_pool_blocks_from_a_budget_by_hand(ref):
    cfg = ref.config
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 16 * 4  # fp32
    assert kv_block_bytes(cfg, torch.float32, 16) == per_block
    assert kv_block_bytes(cfg, torch.bfloat16, 16) == per_block // 2
    # 40 blocks' worth of budget: 39 usable + the scratch block (max_batch 8 x 512 tokens would want 256)
    assert kv_pool_blocks(cfg, torch.float32, 40 * per_block + per_block - 1, max_batch=8, block_size=16) == 40
    # a big budget is capped at max_batch full contexts (plus scratch), with --context honoured
    assert kv_pool_blocks(cfg, torch.float32, 10**12, max_batch=8, block_size=16) == 8 * 32 + 1
    assert kv_pool_blocks(cfg, torch.float32, 10**12, max_batch=3, block_size=16, context=100) == 3 * 7 + 1
    # the minimum is one sequence of min(context, MIN_SEQ_TOKENS) tokens: 256 / 16 = 16 blocks + scratch
    assert kv_pool_blocks(cfg, torch.float32, 17 * per_block, max_batch=8, block_size=16) == 17
    with pytest.raises(InsufficientMemoryError, match=r"16 blocks x 16 tokens .* one 256-token sequence"):
        kv_pool_blocks(cfg, torch.float32, 17 * per_block - 1, max_batch=8, block_size=16)
    with pytest.raises(InsufficientMemoryError, match="--kv-blocks"):
        kv_pool_blocks(cfg, torch.float32, 0, max_batch=1, block_size=16)
    # the server uses it when --kv-blocks is not given (an explicit budget stands in for the planner's)
    app = create_app(ref, ServerSettings(model_name=MODEL, max_batch=8, kv_memory_bytes=40 * per_block))
    assert app.state.ember.scheduler.pool.capacity == 39 and app.state.ember.kv_plan.budget_bytes == 40 * per_block
    with pytest.raises(InsufficientMemoryError):
        create_app(ref, ServerSettings(model_name=MODEL, kv_memory_bytes=per_block))


def test_planner_kv_budget_sizes_the_pool(ref, monkeypatch):
    import ember.planner

    seen = {}

    def budget(cfg, device, dtype, quant=None, max_batch=16, prefill_chunk=256, max_memory=None, loaded=True, **kw):
        seen[loaded] = (str(device), dtype, quant, max_batch, prefill_chunk, max_memory)
        return (100 if loaded else 50) * kv_block_bytes(cfg, dtype, 16)

    monkeypatch.setattr(ember.planner, "kv_budget_bytes", budget)
    server = create_app(ref, ServerSettings(model_name=MODEL, max_batch=4, prefill_chunk=64)).state.ember
    assert server.kv_plan.num_blocks == 100 and set(seen) == {True}
    assert seen[True] == ("cpu", torch.float32, None, 4, 64, None)
    # with --max-memory the cap also has to hold the weights: the smaller (not-yet-loaded) budget wins
    server = create_app(ref, ServerSettings(model_name=MODEL, max_batch=4, max_memory=1.0, quant="int8")).state.ember
    assert server.kv_plan.num_blocks == 50 and seen[False][2:] == ("int8", 4, 256, 1.0)


def test_serve_with_tiny_max_memory_fails_before_loading(model_dir, monkeypatch):
    import argparse

    import ember.loading
    from ember.commands import serve as cli

    def never(*a, **kw):
        raise AssertionError("the model was loaded or served although the plan does not fit")

    monkeypatch.setattr(ember.loading, "load_model", never)
    monkeypatch.setattr(cli, "serve", never)
    parser = argparse.ArgumentParser(prog="ember")
    cli.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", str(model_dir), "--dtype", "fp32", "--max-memory", "0.0001",
                              "--max-batch", "4"])
    with pytest.raises(InsufficientMemoryError, match="--max-memory"):
        args.func(args)
