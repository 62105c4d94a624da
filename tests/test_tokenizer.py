"""Tokenizer and chat templates against HF transformers (the oracle) on tiny tokenizers saved with save_pretrained.

Three tokenizer shapes users actually have:
  - byte-level BPE with a BOS post-processor and header tokens (Llama 3),
  - byte-level BPE without BOS, ChatML tokens (Qwen2.5),
  - Metaspace BPE with byte fallback saved as a LlamaTokenizer whose config says add_bos_token=true
    (Llama 2 / Mistral), with characters outside its alphabet so byte-fallback tokens are exercised.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ember.errors import ChatTemplateError, TokenizerError
from ember.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers", minversion="5.0")  # the oracle: v5 semantics and APIs

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, façade, smörgåsbord, Ångström.",
    "Ünïcödé text: Привет мир, γειά σου κόσμε, שלום עולם.",
    "你好，世界。今天天气很好。日本語のテキストも少し。",
    "Emoji: 🤖🚀👍🏽 and a family 👨‍👩‍👧 at the café ☕.",
    "Numbers 12345 and code: def f(x): return x * 2",
    "  leading spaces,\ttabs and\nnewlines\r\n",
]

# Probes include text the tokenizers never saw (so byte fallback / rare bytes are hit).
PROBES = [
    "Hello world",
    "  leading spaces and   runs of   spaces ",
    "héllo wörld — naïve café",
    "你好，世界",
    "emoji 🤖🚀👍🏽 family 👨‍👩‍👧",
    "unseen chars: ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ♞",
    "line\nbreaks\ttabs\r\n",
    "",
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ---------------------------------------------------------------------------------------------- templates
# The well-known public templates, as shipped in the models' tokenizer configs.

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mixtral-8x7B-Instruct-v0.1 / Mistral-7B-Instruct style: [INST] turns, strict alternation.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# ---------------------------------------------------------------------------------------------- fixtures


def _train_byte_level(specials: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def _metaspace_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-like BPE (▁ for spaces, <0xNN> byte fallback); the alphabet leaves out rare chars."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    state = json.loads(tok.to_str())["model"]
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(base)}
    for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return vocab, merges


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint folder written by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("tokenizers")
    out: dict[str, Path] = {}

    # Llama 3: BOS added by a TemplateProcessing post-processor, eot/eos from generation_config.
    rust = _train_byte_level(LLAMA3_SPECIALS)
    bos = rust.token_to_id("<|begin_of_text|>")
    rust.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )
    out["llama3"] = root / "llama3"
    hf.save_pretrained(out["llama3"])
    eot, eos = rust.token_to_id("<|eot_id|>"), rust.token_to_id("<|end_of_text|>")
    (out["llama3"] / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, eot]}))
    (out["llama3"] / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": eos}))

    # Qwen2.5: no BOS at all, ChatML, pad token.
    rust = _train_byte_level(QWEN_SPECIALS)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=rust, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=QWEN25_TEMPLATE,
    )
    out["qwen"] = root / "qwen"
    hf.save_pretrained(out["qwen"])

    # Llama 2 / Mistral: transformers' own LlamaTokenizer (Metaspace + byte fallback), add_bos_token=True.
    vocab, merges = _metaspace_vocab_merges()
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=MISTRAL_TEMPLATE)
    out["mistral"] = root / "mistral"
    hf.save_pretrained(out["mistral"])
    # Configs written by older transformers (and most Hub Llama/Mistral repos) carry the flags too.
    cfg_file = out["mistral"] / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return out


CKPTS = ["llama3", "qwen", "mistral"]


def load_both(folder: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", CKPTS)
def test_encode_matches_hf(checkpoints, name):
    ours, hf = load_both(checkpoints[name])
    assert ours.vocab_size == len(hf.get_vocab())
    for text in PROBES + [f"{ours.eos_token} inside text", "<s>[INST] hi [/INST]"]:
        for add in (True, False):
            want = hf.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == want, (name, text, add)
        assert ours.encode(text) == hf(text)["input_ids"], (name, text)


def test_bos_comes_from_the_post_processor(checkpoints):
    llama3, _ = load_both(checkpoints["llama3"])
    assert llama3.encode("Hello")[0] == llama3.bos_token_id
    assert llama3.encode("Hello", add_special_tokens=False)[0] != llama3.bos_token_id
    mistral, _ = load_both(checkpoints["mistral"])  # LlamaTokenizer class, add_bos_token=true in its config
    assert mistral.encode("Hello")[0] == mistral.bos_token_id == 1
    qwen, _ = load_both(checkpoints["qwen"])
    assert qwen.bos_token is None and qwen.bos_token_id is None
    assert qwen.encode("Hello") == qwen.encode("Hello", add_special_tokens=False)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_add_bos_token_flag_without_post_processor_follows_hf(checkpoints, tmp_path, name):
    # transformers 5 drops tokenizer_config's add_bos_token/add_eos_token when tokenizer.json exists:
    # the post-processor alone decides. A config claiming add_bos_token=true over a tokenizer.json
    # that adds nothing therefore encodes without BOS, in HF and in Ember alike.
    folder = copy_ckpt(checkpoints[name], tmp_path / "ck")
    edit_json(folder / "tokenizer.json", post_processor={"type": "ByteLevel", "add_prefix_space": False,
                                                          "trim_offsets": False, "use_regex": True})
    edit_json(folder / "tokenizer_config.json", add_bos_token=True)
    ours, hf = load_both(folder)
    for text in PROBES:
        assert ours.encode(text) == hf.encode(text), text
    assert ours.encode("Hello")[0] != ours.bos_token_id


@pytest.mark.parametrize("name", CKPTS)
def test_decode_matches_hf(checkpoints, name):
    ours, hf = load_both(checkpoints[name])
    rng = random.Random(0)
    sequences = [hf.encode(t) + [hf.eos_token_id] for t in PROBES]
    # Random ids hit partial UTF-8 bytes, lone byte-fallback tokens and special tokens mid-text.
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("name", ["llama3", "qwen"])  # byte-level is lossless; Metaspace+Strip is not (as in HF)
def test_round_trip(checkpoints, name):
    ours = Tokenizer.from_dir(checkpoints[name])
    for text in PROBES:
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_special_tokens_and_eos_ids(checkpoints):
    llama3 = Tokenizer.from_dir(checkpoints["llama3"])
    eot, eos = llama3.token_to_id("<|eot_id|>"), llama3.token_to_id("<|end_of_text|>")
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.eos_token == "<|eot_id|>"
    # generation_config [eos, eot], then config.json eos, then the tokenizer's eot: deduplicated, in order.
    assert llama3.eos_token_ids == [eos, eot]
    qwen = Tokenizer.from_dir(checkpoints["qwen"])
    assert qwen.eos_token_ids == [qwen.token_to_id("<|im_end|>")]
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == qwen.token_to_id("<|endoftext|>")


def test_eos_union_order(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints["llama3"], tmp_path / "ck")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 9, "text_config": {}}))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_ids == [7, 9, tok.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    (folder / "config.json").unlink()
    assert Tokenizer.from_dir(folder).eos_token_ids == [5, tok.token_to_id("<|eot_id|>")]


def test_added_token_dicts_and_missing_special_tokens(checkpoints, tmp_path):
    # Older configs write special tokens as AddedToken dicts; a named token missing from tokenizer.json
    # (here <pad>) is added by transformers at load, which changes vocab_size and encoding.
    folder = copy_ckpt(checkpoints["mistral"], tmp_path / "ck")
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False}
    edit_json(folder / "tokenizer_config.json", bos_token=added, pad_token="<pad>")
    ours, hf = load_both(folder)
    assert ours.bos_token == "<s>" and ours.bos_token_id == 1
    assert ours.vocab_size == len(hf.get_vocab())
    assert ours.pad_token_id == hf.pad_token_id is not None
    for text in ["<pad> padded <s> text", "Hello"]:
        assert ours.encode(text) == hf.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- streaming


STREAM_TEXTS = ["héllo wörld — naïve café", "你好，世界。今天天气很好", "emoji 🤖🚀👍🏽 family 👨‍👩‍👧 ☕",
                "unseen ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ♞ done", "  spaces\n\tand  lines  "]


@pytest.mark.parametrize("name", CKPTS)
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_never_splits_a_character(checkpoints, name, skip):
    tok = Tokenizer.from_dir(checkpoints[name])
    for text in STREAM_TEXTS:
        ids = tok.encode(text) + [tok.eos_token_ids[0]]
        stream = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids]
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        # Text is emitted as it completes, not buffered until the end: at most a trailing
        # byte-fallback character (☕ here, closed only by a skipped EOS) waits for flush.
        rest = stream.flush()
        assert len(rest) <= 1 and "\ufffd" not in rest
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", CKPTS)
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_concatenation_equals_decode_for_any_ids(checkpoints, name, skip):
    # Random ids include invalid UTF-8 byte runs, byte-fallback tokens and special tokens mid-text.
    tok = Tokenizer.from_dir(checkpoints[name])
    rng = random.Random(1)
    stream = tok.stream_decoder(skip_special_tokens=skip)
    assert isinstance(stream, StreamDecoder)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        text = "".join(stream.push(i) for i in ids) + stream.flush()  # flush resets for the next sequence
        assert text == tok.decode(ids, skip_special_tokens=skip), ids


# ---------------------------------------------------------------------------------------------- chat templates

SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français si on te parle français."},
    {"role": "user", "content": "Bonjour ! Qu'est-ce qu'un 🤖 ?"},
    {"role": "assistant", "content": "Un robot."},
    {"role": "user", "content": "Et 你好?"},
]
NO_SYSTEM = [{"role": "user", "content": "Hello <b>&</b> there"}]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle pour une ville — renvoie °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "ville"}},
                       "required": ["city"]},
    },
}]


def hf_render(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("name", CKPTS)
@pytest.mark.parametrize("messages", [SYSTEM_MULTI_TURN, NO_SYSTEM], ids=["system-multi-turn", "no-system"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_text_and_ids_match_hf(checkpoints, name, messages, gen):
    ours, hf = load_both(checkpoints[name])
    extra = {"date_string": "01 Jan 2025"} if name == "llama3" else {}
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, **extra)
    assert text == hf_render(hf, messages, add_generation_prompt=gen, **extra)
    want_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=gen, **extra)
    assert ours.encode_chat(messages, add_generation_prompt=gen, **extra) == list(want_ids)


def test_qwen_default_system_prompt_and_tools(checkpoints):
    ours, hf = load_both(checkpoints["qwen"])
    text = ours.apply_chat_template(NO_SYSTEM)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    conversation = [
        {"role": "user", "content": "Quel temps à Zürich ?"},
        {"role": "assistant", "content": None,  # None keys are dropped, as OpenAI clients send them
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": \"3 °C\"}"},
        {"role": "tool", "content": "second result"},
    ]
    for kw in ({"tools": TOOLS}, {}):
        got = ours.apply_chat_template(conversation, **kw)
        assert got == hf_render(hf, conversation, add_generation_prompt=True, **kw)
    # tojson keeps non-ASCII and does not HTML-escape.
    assert '"Zürich"' in got and "Météo" in ours.apply_chat_template(NO_SYSTEM, tools=TOOLS)


def test_llama3_tools_tojson_indent_and_strftime(checkpoints):
    ours, hf = load_both(checkpoints["llama3"])
    got = ours.apply_chat_template(SYSTEM_MULTI_TURN, tools=TOOLS, date_string="26 Jul 2024")
    assert got == hf_render(hf, SYSTEM_MULTI_TURN, tools=TOOLS, date_string="26 Jul 2024", add_generation_prompt=True)
    assert '\n    "type": "function"' in got  # tojson(indent=4)
    # Without date_string the template calls strftime_now; both render "today".
    assert ours.apply_chat_template(NO_SYSTEM) == hf_render(hf, NO_SYSTEM, add_generation_prompt=True)


def test_template_raise_exception_surfaces_message(checkpoints):
    ours, hf = load_both(checkpoints["mistral"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):  # HF raises jinja2's TemplateError
        hf_render(hf, bad)
    with pytest.raises(ChatTemplateError, match="roles must alternate user/assistant"):
        ours.apply_chat_template(bad)
    llama3 = Tokenizer.from_dir(checkpoints["llama3"])
    with pytest.raises(ChatTemplateError, match="only supports single tool-calls"):
        llama3.apply_chat_template([{"role": "user", "content": "x"},
                                    {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2}])


def test_reasoning_fields_are_aliased(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "ck")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}]{% endfor %}"
    )
    ours, hf = load_both(folder)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}]
    assert ours.apply_chat_template(msgs) == hf_render(hf, msgs, add_generation_prompt=True) == (
        "[user|||q][assistant|because|because|a]"
    )


def test_legacy_template_in_tokenizer_config_and_generation_tag(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "ck")
    (folder / "chat_template.jinja").unlink()
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m.content | tojson(indent=2) }}{% endif %}{% if loop.index > 5 %}{% break %}"
        "{% endif %}{% endfor %}{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    ours, hf = load_both(folder)
    msgs = [{"role": "user", "content": "<ünï>"}, {"role": "assistant", "content": "ok"}]
    assert ours.chat_template == template
    assert ours.apply_chat_template(msgs) == hf_render(hf, msgs, add_generation_prompt=True)


def test_chat_template_json_fallback(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "ck")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert Tokenizer.from_dir(folder).apply_chat_template(NO_SYSTEM) == NO_SYSTEM[0]["content"] + "!"


def test_namespace_refuses_underscore_attributes(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "ck")
    (folder / "chat_template.jinja").write_text("{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}")
    with pytest.raises(ChatTemplateError, match="underscore"):
        Tokenizer.from_dir(folder).apply_chat_template(NO_SYSTEM)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_files_are_named(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["llama3"], tmp_path / "ck")
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>",,}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: malformed JSON at line 1"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text('{"bos_token": 5}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: bos_token"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed JSON"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_dir(folder)


def test_no_chat_template_is_a_clear_error(tmp_path, checkpoints):
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "base")
    (folder / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(folder)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template.*plain text prompt"):
        tok.apply_chat_template(NO_SYSTEM)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat(NO_SYSTEM)


def test_bad_messages_and_bad_templates(tmp_path, checkpoints):
    tok = Tokenizer.from_dir(checkpoints["qwen"])
    with pytest.raises(ChatTemplateError, match="non-empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="must be dicts"):
        tok.apply_chat_template(["hello"])
    folder = copy_ckpt(checkpoints["qwen"], tmp_path / "ck")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        Tokenizer.from_dir(folder).apply_chat_template(NO_SYSTEM)
