"""``ember serve`` with hybrid models (recurrent state per sequence): one request gives the same greedy text alone
and among 8 concurrent others (state isolation across admissions into reused slots), and a cancelled stream frees
its state slot. Tiny random Qwen3-Next and Nemotron-H checkpoints with a byte-level BPE tokenizer."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
import torch

import ember
from test_hybrid import MOE, TEXT
from test_nemotron_h import CONFIG as NEMOTRON
from test_server import GREEDY, MODEL, VOCAB, ServerThread, save_bpe_tokenizer

transformers = pytest.importorskip("transformers")

MAX_BATCH = 4  # fewer state slots than requests: sequences are admitted into slots others have freed


@pytest.fixture(scope="module", params=["qwen3_next", "nemotron_h"])
def hybrid_dir(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    if request.param == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(**{**TEXT, **MOE, "vocab_size": VOCAB})
    else:
        cfg = transformers.NemotronHConfig(**{**NEMOTRON, "vocab_size": VOCAB})
    folder = Path(tmp_path_factory.mktemp(f"serve-{request.param}"))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    save_bpe_tokenizer(folder)
    return folder


def _free_slots(srv: ServerThread) -> int:
    return srv.app.state.ember.scheduler.cache.states.num_free


def test_same_greedy_text_alone_and_among_eight_and_cancel_frees_state(hybrid_dir):
    ref = ember.load(hybrid_dir, dtype="fp32")
    target = "the sun is warm over the little town"
    others = ["the sea", "blue " * 9, "31 ok", "warm over the little", "a b", "the little town " * 5, "sun",
              "the sea is blue and the sun is warm"]

    async def one(client, prompt: str, n: int) -> str:
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, **GREEDY)
        return r.choices[0].text

    with ServerThread(hybrid_dir, max_batch=MAX_BATCH, max_queue=32, num_blocks=128, prefill_chunk=8) as srv:
        alone = asyncio.run(one(srv.aclient(), target, 16))

        async def crowd():
            client = srv.aclient()
            return await asyncio.gather(one(client, target, 16), *[one(client, p, 6 + 2 * i)
                                                                   for i, p in enumerate(others)])

        together = asyncio.run(crowd())
        assert together[0] == alone == ref.generate(target, max_new_tokens=16, temperature=0, ignore_eos=True).text
        for i, (p, got) in enumerate(zip(others, together[1:])):
            assert got == ref.generate(p, max_new_tokens=6 + 2 * i, temperature=0, ignore_eos=True).text, p
        srv.wait_idle()
        assert _free_slots(srv) == MAX_BATCH

        # a stream closed mid-way is cancelled and its state slot freed
        before = srv.health()["cancelled"]
        body = {"model": MODEL, "prompt": target, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{srv.url}/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
            assert _free_slots(srv) == MAX_BATCH - 1
        h = srv.wait_idle()
        assert h["cancelled"] == before + 1 and _free_slots(srv) == MAX_BATCH
        # and the slot it held serves the next request as a fresh one
        assert asyncio.run(one(srv.aclient(), target, 16)) == alone


def test_prompt_continuing_beside_a_newcomer_keeps_its_state(hybrid_dir):
    """Chunked prefill: a prompt's last 3 tokens run in the same forward as a 4-token newcomer, so its row has a
    padding column whose key slot holds one of its own cached tokens; the recurrent layers must still skip it
    (the paged cache says which input columns are padding; the attention mask cannot)."""
    from ember.sampling import SamplingParams
    from ember.scheduler import BatchScheduler, SeqRequest

    llm = ember.load(hybrid_dir, dtype="fp32")
    prompts = [llm.tokenizer.encode(t) for t in ("blue " * 9, "31 ok")]
    assert [len(p) for p in prompts] == [11, 4]
    alone = [llm.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids for p in prompts]
    sched = BatchScheduler(llm, max_batch=2, block_size=8, prefill_chunk=8)  # forwards: 8 | 3 + 4 | decodes
    got: dict[int, list[int]] = {}
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    ids = sched.submit([SeqRequest(p, params, on_event=lambda e: got.setdefault(e.seq_id, []).append(e.token_id))
                        for p in prompts])
    sched.run_until_idle()
    assert [got[i] for i in ids] == alone
