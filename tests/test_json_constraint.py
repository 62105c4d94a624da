"""JSON constrained decoding: whatever a model picks among the allowed tokens, the text parses and
validates (checked with ``jsonschema``), within the token budget; unsupported schemas fail clearly."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from ember.errors import UnsupportedSchemaError
from ember.json_constraint import JsonConstraint, TokenVocab, compile_json_schema
from ember.tokenizer import Tokenizer
from test_server import PERSON, save_bpe_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    save_bpe_tokenizer(folder, chat_template=None)
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def vocab(tok) -> TokenVocab:
    return TokenVocab.from_tokenizer(tok)


def random_walk(grammar, vocab, tok, rng: random.Random, budget: int) -> tuple[str, bool]:
    """A 'model' that picks uniformly among allowed tokens; returns (text, ended by the grammar or EOS)."""
    c = JsonConstraint(grammar, vocab, [EOS])
    out: list[int] = []
    for step in range(budget):
        allowed = c.mask(budget - step).nonzero().flatten().tolist()
        assert allowed, f"no token allowed after {tok.decode(out)!r}"
        t = rng.choice(allowed)
        if t == EOS:
            return tok.decode(out), True
        out.append(t)
        c.advance(t)
        if c.done:
            return tok.decode(out), True
    return tok.decode(out), c.accepting()


SCHEMAS = [
    None,  # json_object
    PERSON,
    {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}, "maxItems": 4},
    {"anyOf": [{"type": "integer"}, {"type": "null"}, {"type": "object", "properties": {"a": {"const": [1, "x"]}},
                                                        "required": ["a"]}]},
    {"type": "object", "additionalProperties": {"type": "boolean"}},
    {"type": "object", "properties": {"v": {"type": "number"}, "w": {"enum": [1, 12, "12"]}}, "required": ["w"]},
]


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_random_tokens_under_the_mask_always_validate(tok, vocab, k):
    schema = SCHEMAS[k]
    g = compile_json_schema(schema)
    rng = random.Random(k)
    for trial in range(60):
        budget = max(g.minlen(g.root), 1) + rng.choice([0, 5, 30, 150])
        text, ended = random_walk(g, vocab, tok, rng, budget)
        assert ended, f"budget {budget}: document not complete: {text!r}"
        value = json.loads(text)
        if schema is None:
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, schema)


def test_eos_only_where_the_document_is_complete(tok, vocab):
    g = compile_json_schema({"type": "number"})
    c = JsonConstraint(g, vocab, [EOS])
    assert not c.mask(10)[EOS]
    for t in tok.encode("12", add_special_tokens=False):
        c.advance(t)
    assert c.mask(10)[EOS] and not c.done  # "12" may go on ("123") or end


def test_unsupported_schema_features_are_named():
    cases = [
        ({"type": "string", "pattern": "a+"}, "'pattern'"),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "#/properties/n: keyword 'minimum'"),
        ({"anyOf": [{"type": "string"}, {"enum": ["a"]}]}, "start with different characters"),
        ({"$ref": "#/$defs/N", "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}},
         "recursive"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required names ['b']"),
        ({"type": "decimal"}, "'decimal' is not a JSON Schema type"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems (1) is below minItems (3)"),
    ]
    for schema, words in cases:
        with pytest.raises(UnsupportedSchemaError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            compile_json_schema(schema)


def test_sentencepiece_style_vocab_bytes(tmp_path):
    """Metaspace (▁) and <0xNN> byte-fallback tokens map to the bytes they write."""
    from tokenizers import Tokenizer as HFTok, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁{": 3, "\"": 4, "<0xC3>": 5, "<0xA9>": 6, "a": 7}
    t = HFTok(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    (tmp_path / "tokenizer.json").write_text(t.to_str())
    v = TokenVocab.from_tokenizer(Tokenizer.from_dir(tmp_path))
    assert v.token_bytes[3] == b" {" and v.token_bytes[5] == b"\xc3" and v.token_bytes[7] == b"a"
    g = compile_json_schema({"type": "object", "properties": {"k": {"type": "string"}}})
    c = JsonConstraint(g, v, [2])
    assert c.mask(20).nonzero().flatten().tolist() == [3]  # only " {" can start an object here


def test_tool_call_templates_pick_one_call_whose_arguments_validate(tok, vocab):
    from ember.json_constraint import compile_tool_call_grammar

    tools = {"get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                              "days": {"type": "integer"}}, "required": ["city"]},
             "get_time": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]},
             "ping": None}
    calls = [(f'<tool_call>\n{{"name": "{n}", "arguments": ', s, "}\n</tool_call>") for n, s in tools.items()]
    g = compile_tool_call_grammar(calls, [f"tools.{i}" for i in range(len(calls))])
    rng = random.Random(0)
    names = set()
    for _ in range(30):
        text, ended = random_walk(g, vocab, tok, rng, budget=120)
        assert ended and text.startswith("<tool_call>\n") and text.endswith("}\n</tool_call>"), text
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        names.add(call["name"])
        if tools[call["name"]] is not None:
            jsonschema.validate(call["arguments"], tools[call["name"]])
        assert isinstance(call["arguments"], dict)
    assert names == set(tools)  # every alternative is reachable
    with pytest.raises(UnsupportedSchemaError, match=r"tools\.1 at #: keyword 'pattern'"):
        compile_tool_call_grammar([calls[0], (calls[1][0], {"type": "object", "pattern": "x"}, calls[1][2])],
                                  ["tools.0", "tools.1"])
