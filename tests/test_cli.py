"""The ``ember`` command as a user runs it: stdout carries only text, errors are one located line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_word_tokenizer
from ember.cli import main

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ember.cli`` in a subprocess (the real entry point, real stdout/stderr)."""
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_generate_prints_only_text_and_a_summary(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    r = run_cli("generate", str(folder), "w3 w4 w5", "-n", "6", "--temperature", "0", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("w") or w.startswith("<") for w in words)
    assert "prefill" in r.stderr and "decode" in r.stderr and "peak memory" in r.stderr


def test_generate_matches_python_api(hf_checkpoint):
    import ember

    folder, _ = hf_checkpoint("qwen2")
    expected = ember.load(folder, dtype="fp32").generate("w9 w10", max_new_tokens=5, temperature=0.0).text
    r = run_cli("generate", str(folder), "w9 w10", "-n", "5", "--dtype", "fp32", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert r.stderr == ""


def test_chat_from_a_pipe_keeps_history(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama")
    folder = tmp_path / "chat"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    save_word_tokenizer(folder, chat_template=CHATML)
    r = run_cli("chat", str(folder), "-n", "4", "--temperature", "0", "--dtype", "fp32",
                stdin="w3 w4\nw5\n/reset\nw6\n/exit\nw7\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3  # three answered turns; /reset and /exit print nothing on stdout; w7 never read
    assert "[history cleared]" in r.stderr


def test_missing_model_is_one_line_error(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "nope"), "hi"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("ember: error:") and "nope" in err and err.count("\n") == 1


def test_chat_without_template_is_clear(hf_checkpoint, capsys):
    folder, _ = hf_checkpoint("llama")
    code = main(["generate", str(folder), "w3", "--chat", "-n", "2"])
    assert code == 1
    assert "chat template" in capsys.readouterr().err


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("generate", "chat", "demo", "serve", "tune", "merge", "quantize", "eval", "plan", "hw"):
        assert verb in out


def test_generate_with_quant_matches_python_api(hf_checkpoint):
    import ember

    folder, _ = hf_checkpoint("llama")
    expected = ember.load(folder, dtype="fp32", quant="int8").generate("w3 w4", max_new_tokens=5, temperature=0.0).text
    r = run_cli("generate", str(folder), "w3 w4", "-n", "5", "--dtype", "fp32", "--quant", "int8", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.parametrize("flag,head", [(None, "Int8Linear"), ("none", "Linear"), ("same", "Int4Linear")])
def test_lm_head_flag_reaches_the_loader(hf_checkpoint, flag, head):
    from ember.cli import build_parser, load_from_args

    folder, _ = hf_checkpoint("llama")
    argv = ["generate", str(folder), "hi", "--dtype", "fp32", "--quant", "int4", "--group-size", "32"]
    args = build_parser().parse_args(argv + (["--lm-head", flag] if flag else []))
    llm = load_from_args(args)
    assert type(llm.model.lm_head).__name__ == head


def test_generate_with_adapter_uses_it_unmerged(hf_checkpoint, tmp_path):
    import torch

    import ember
    from ember.loading import load_model
    from ember.train.adapter_files import save_adapter
    from ember.train.lora import LoRAConfig, inject_lora, lora_modules

    folder, _ = hf_checkpoint("llama")
    model = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_lora(model, cfg)
    torch.manual_seed(0)
    for m in lora_modules(model).values():  # a non-zero B, so the adapter changes the output
        torch.nn.init.normal_(m.lora_B, std=0.5)
    save_adapter(model, tmp_path / "ad", cfg, base_model_name_or_path=str(folder))
    plain = ember.load(folder, dtype="fp32").generate("w3 w4", max_new_tokens=8, temperature=0.0).text
    adapted = ember.load(folder, dtype="fp32", adapter=tmp_path / "ad").generate("w3 w4", max_new_tokens=8,
                                                                                 temperature=0.0).text
    assert adapted != plain
    r = run_cli("generate", str(folder), "w3 w4", "-n", "8", "--dtype", "fp32", "--adapter", str(tmp_path / "ad"), "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == adapted + "\n"


def test_plan_refuses_before_loading_and_says_what_fits(hf_checkpoint, capsys):
    folder, _ = hf_checkpoint("llama")
    code = main(["generate", str(folder), "w3", "-n", "2", "--max-memory", "0.000001"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("ember: error:") and "needs" in err and "--max-memory" in err


# ----------------------------------------------------------------------------- the context never ends a chat
@pytest.fixture
def chat_model(tmp_path, hf_checkpoint) -> Path:
    """A 512-token llama checkpoint with a chat template."""
    src, _ = hf_checkpoint("llama")
    folder = tmp_path / "chat"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    save_word_tokenizer(folder, chat_template=CHATML)
    return folder


def test_default_new_tokens_are_what_the_context_leaves(chat_model):
    import ember

    llm = ember.load(chat_model, dtype="fp32")
    assert llm.config.max_position_embeddings == 512
    prompt = llm.encode_prompt("w3 w4 w5")
    res = llm.generate("w3 w4 w5", temperature=0, ignore_eos=True)  # no max_new_tokens: no error, fills the context
    assert len(res.token_ids) == 512 - len(prompt) and res.finish_reason == "length"
    # the first chat turn on a 512-token model with no -n: this used to fail with "exceeds the model's context"
    r = run_cli("chat", str(chat_model), "--temperature", "0", "--dtype", "fp32", stdin="w3 w4\n")
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 1


def test_long_chat_drops_oldest_turns_and_survives_a_failed_turn(chat_model):
    long_turn = " ".join(f"w{3 + (i % 250)}" for i in range(120))  # ~125 tokens with the template
    too_long = " ".join(f"w{3 + (i % 250)}" for i in range(600))   # more than the whole context
    lines = [long_turn] * 8 + [too_long, "w7 w8"]
    r = run_cli("chat", str(chat_model), "--system", "w9", "-n", "8", "--temperature", "0", "--dtype", "fp32",
                stdin="\n".join(lines) + "\n")
    assert r.returncode == 1, r.stderr  # one turn failed; the chat went on to the end of its input
    assert len(r.stdout.splitlines()) == 9  # every turn but the failed one was answered
    notices = [ln for ln in r.stderr.splitlines() if "dropped the oldest" in ln]
    assert notices and all("context of 512 tokens" in ln for ln in notices)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ember: error:")]
    assert len(errors) == 1 and "exceeds the model's context of 512" in errors[0]


def test_fit_history_keeps_the_system_prompt_and_the_new_message():
    from ember.commands.chat import fit_history

    h = [{"role": "system", "content": "s"}] + [{"role": r, "content": f"{r}{i}"} for i in range(3)
                                                for r in ("user", "assistant")] + [{"role": "user", "content": "new"}]
    dropped = fit_history(h, 1, len, budget=4)  # "tokens" = messages
    assert dropped == 2 and [m["content"] for m in h] == ["s", "user2", "assistant2", "new"]
    assert fit_history(h, 1, len, budget=0) == 1 and [m["content"] for m in h] == ["s", "new"]


# ----------------------------------------------------------------------------- honest first-run figures
def test_kernel_compile_is_announced_once_and_happens_at_load(tmp_path, monkeypatch, capsys, hf_checkpoint):
    import ember
    from ember import kernels

    cxx = tmp_path / "fake-cxx"  # stands in for the compiler: writes the -o file, so the build "succeeds"
    cxx.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n: > "$2"\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    first = kernels.build()
    assert capsys.readouterr().err.count("building CPU kernels for this machine (once)") == 1
    assert kernels.build() == first and capsys.readouterr().err == ""  # cached: nothing to say

    calls = []
    monkeypatch.setattr(kernels, "load", lambda *a, **k: calls.append(a))
    folder, _ = hf_checkpoint("llama")
    ember.load(folder, device="cpu", dtype="fp32")
    assert calls  # built (or found) when the model is loaded, before any timed prefill
