"""``ember eval ppl``: sliding-window perplexity vs the same computation on the HF model (the oracle).

The reference is the loop of the HF guide "Perplexity of fixed-length models": each window's
labels are -100 except the tokens the previous window did not score, and HF's own shifted
cross-entropy (``outputs.loss`` x the number of scored labels) gives the window's NLL sum.
Tolerance: fp32 on both sides, only summation order differs: relative 1e-5 on the NLL sum.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import ember
from ember.commands.eval import add_parser
from ember.errors import EvaluationError
from ember.evaluate import perplexity, sliding_windows


def hf_sliding_nll(hf_model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(NLL sum, scored tokens) of ``ids`` under the HF model, exactly as the HF guide computes it."""
    x = torch.tensor([ids])
    n = x.shape[1]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(inp, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        total += loss.double().item() * valid
        count += valid
        prev_end = end
        if end == n:
            break
    return total, count


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    folder, hf = hf_checkpoint("llama")
    text = " ".join(f"w{i}" for i in torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist())
    return folder, hf, text


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("window,stride,batch", [(10_000, 10_000, 1), (48, 16, 1), (48, 16, 3), (40, 40, 2)])
def test_ppl_matches_hf(llama, window, stride, batch):
    folder, hf, text = llama
    llm = ember.load(folder, device="cpu", dtype="fp32")
    ids = llm.tokenizer.encode(text)
    got = perplexity(llm.model, ids, window=window, stride=stride, batch=batch)
    ref_nll, ref_n = hf_sliding_nll(hf, ids, min(window, len(ids)), min(stride, window, len(ids)))
    assert got["tokens"] == ref_n
    d = rel(got["nll_sum"], ref_nll)
    assert d < 1e-5, f"NLL sum {got['nll_sum']:.8f} vs HF {ref_nll:.8f}: rel diff {d:.3g} > 1e-5"
    if window >= len(ids):
        assert got["windows"] == 1 and got["tokens"] == len(ids) - 1
    else:
        assert got["windows"] > 1


def test_windows_score_each_token_once():
    for n, w, s in [(100, 32, 8), (100, 32, 31), (33, 32, 16), (5, 32, 16), (2, 2, 1)]:
        scored = [t for _, e, first in sliding_windows(n, w, s) for t in range(first, e)]
        assert scored == list(range(1, n)), (n, w, s)
        for b, e, first in sliding_windows(n, w, s):
            assert e - b <= w and b < first <= e
    with pytest.raises(EvaluationError, match="stride"):
        sliding_windows(10, 4, 5)


def test_logit_chunks_do_not_change_result(llama, monkeypatch):
    folder, _, text = llama
    llm = ember.load(folder, device="cpu", dtype="fp32")
    ids = llm.tokenizer.encode(text)
    whole = perplexity(llm.model, ids, window=64, stride=32)
    monkeypatch.setattr("ember.evaluate.LOGIT_CHUNK_ELEMENTS", 7 * 256)  # 7 positions per chunk
    chunked = perplexity(llm.model, ids, window=64, stride=32)
    assert rel(chunked["nll_sum"], whole["nll_sum"]) < 1e-6


def test_int8_ppl_close_not_identical(llama):
    folder, _, text = llama
    base = ember.load(folder, device="cpu", dtype="fp32")
    q = ember.load(folder, device="cpu", dtype="fp32", quant="int8")
    ids = base.tokenizer.encode(text)
    a = perplexity(base.model, ids, window=64, stride=32)["ppl"]
    b = perplexity(q.model, ids, window=64, stride=32)["ppl"]
    assert a != b
    assert rel(b, a) < 0.02, f"int8 ppl {b:.4f} vs fp32 {a:.4f}"


def test_too_short_and_too_long(llama):
    folder, _, _ = llama
    llm = ember.load(folder, device="cpu", dtype="fp32")
    with pytest.raises(EvaluationError, match="at least 2"):
        perplexity(llm.model, [5])
    with pytest.raises(EvaluationError, match="context of 512"):
        perplexity(llm.model, list(range(3, 203)) * 3, window=1024, stride=512)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


def test_cli_json_and_line(llama, tmp_path, capsys):
    folder, _, text = llama
    f = tmp_path / "text.txt"
    f.write_text(text)
    args = cli(["eval", "ppl", str(folder), "--text", str(f), "--window", "48", "--stride", "16", "--dtype", "fp32",
                "--json", "-q"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    llm = ember.load(folder, device="cpu", dtype="fp32")
    ref = perplexity(llm.model, llm.tokenizer.encode(text), window=48, stride=16)
    assert res["ppl"] == pytest.approx(ref["ppl"], rel=1e-9) and res["tokens"] == ref["tokens"]

    args = cli(["eval", "ppl", str(folder), "--text", str(f), "--window", "32", "--stride", "32", "--max-tokens", "100",
                "--quant", "int8", "--dtype", "fp32"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert out.out.startswith("perplexity ") and "over 96 tokens (4 windows of 32, stride 32)" in out.out
    assert "perplexity" in out.err  # the progress bar


def test_cli_errors_name_the_file(llama, tmp_path):
    folder, _, _ = llama
    missing = tmp_path / "nope.txt"
    args = cli(["eval", "ppl", str(folder), "--text", str(missing)])
    with pytest.raises(EvaluationError, match="nope.txt: text file not found"):
        args.func(args)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = cli(["eval", "ppl", str(folder), "--text", str(empty)])
    with pytest.raises(EvaluationError, match="empty.txt: the text file is empty"):
        args.func(args)


def test_ember_command_reports_missing_file(llama, tmp_path, capsys):
    from ember.cli import main

    folder, _, _ = llama
    assert main(["eval", "ppl", str(folder), "--text", str(tmp_path / "gone.txt")]) == 1
    assert "gone.txt: text file not found" in capsys.readouterr().err
