"""Seeded fuzzing of ``ember serve``'s request bodies (bounded to ~20 s): every mutated body gets a
well-formed answer, a success or an error in the API's own shape, never a 500, a traceback, a hang or a
server that stops answering.

The bodies start from valid requests of each API (OpenAI chat/completions/responses/embeddings,
Anthropic messages) and are mutated as a hostile client would: fields removed, values replaced by
other JSON types, huge or negative numbers, deep nesting, long strings, truncated JSON.
"""

from __future__ import annotations

import json
import random
import time

import httpx

from test_server import ServerThread, model_dir  # noqa: F401  (the tiny model fixture)

BASES = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "temperature": 0.5, "top_p": 0.9, "seed": 1},
    "/v1/completions": {"model": "tiny", "prompt": "the sea", "max_tokens": 4, "logprobs": 2},
    "/v1/responses": {"model": "tiny", "input": "hi", "max_output_tokens": 4, "instructions": "be brief"},
    "/v1/messages": {"model": "tiny", "max_tokens": 4, "system": "be brief",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    "/v1/embeddings": {"model": "tiny", "input": ["the sea", "the sun"], "dimensions": 8},
}
ODD_VALUES = [None, True, -1, 0, 2**63, 10**40, -1e308, 1e308, 0.5, "", "x" * 5000, "NaN", [], {}, [[[[[]]]]],
              {"a": {"b": {"c": [1, {"d": None}]}}}, ["hi", 3], [{"role": "tool", "content": 1}],
              {"type": "function", "function": {"name": 3}}]
OK = {200, 400, 401, 404, 413, 422, 429, 503}


def mutate(body: dict, rng: random.Random) -> dict | str:
    """One hostile variant of ``body``: a JSON object, or raw text that is not (quite) JSON."""
    body = json.loads(json.dumps(body))
    op = rng.randrange(6)
    keys = list(body)
    if op == 0 and keys:
        body.pop(rng.choice(keys))
    elif op == 1 and keys:
        body[rng.choice(keys)] = rng.choice(ODD_VALUES)
    elif op == 2:
        body[rng.choice(["tools", "tool_choice", "stream", "n", "stop", "response_format", "logit_bias",
                         "stream_options", "previous_response_id", "thinking", "encoding_format", "x"])] = \
            rng.choice(ODD_VALUES + [True, "auto", "required", {"type": "json_object"}])
    elif op == 3:  # deep nesting, written as text (json.dumps itself would recurse too deep)
        depth = rng.choice([50, 500, 5000])
        body[rng.choice(keys or ["messages"])] = "@DEEP@"
        return json.dumps(body).replace('"@DEEP@"', "[" * depth + '"hi"' + "]" * depth)
    elif op == 4:
        text = json.dumps(body)
        return text[: rng.randrange(len(text))]  # truncated JSON
    else:
        return json.dumps(body).replace("4", rng.choice(["NaN", "Infinity", "1e999", "-0", "99999999999999999999"]), 1)
    return body


def test_mutated_request_bodies_get_clean_answers(model_dir):  # noqa: F811
    rng = random.Random(0)
    counts = {"ok": 0, "error": 0}
    with ServerThread(model_dir, max_batch=4, max_queue=8, num_blocks=129) as srv, \
            httpx.Client(base_url=srv.base, timeout=10.0) as http:
        deadline = time.time() + 20
        while time.time() < deadline:
            path = rng.choice(sorted(BASES))
            body = mutate(BASES[path], rng)
            raw = body if isinstance(body, str) else json.dumps(body)
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            what = f"{path} {raw[:300]!r} -> {r.status_code} {r.text[:300]!r}"
            assert r.status_code in OK, what
            assert "Traceback" not in r.text, what
            if r.status_code == 200:
                counts["ok"] += 1
                continue
            counts["error"] += 1
            err = r.json()  # an error body is JSON in the API's shape, with a message saying what was wrong
            msg = (err.get("error") or {}).get("message") if isinstance(err.get("error"), dict) else None
            assert isinstance(msg, str) and msg, what
        print(f"http fuzz: {counts['ok'] + counts['error']} bodies, {counts['ok']} answered, "
              f"{counts['error']} clean errors")
        assert counts["ok"] > 0 and counts["error"] > 0, counts  # the mutations reach both ends
        assert http.get("/health").status_code == 200
        srv.wait_idle()
