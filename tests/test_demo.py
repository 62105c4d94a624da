"""The demo checkpoint (``ember demo``) and the atomic checkpoint writer it uses.

HF ``transformers`` is the oracle: a folder we write must load there with the same logits,
which is what makes it "a normal HF checkpoint" rather than an Ember-only format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ember import checkpoint_io, demo
from ember.checkpoint_io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    save_hf_checkpoint,
    save_safetensors,
)
from ember.errors import OutputExistsError
from ember.loading import load_model


# New sentences in the corpus' style but not in it: an honest held-out check.
HELD_OUT = [
    "The sea was calm this morning, and the small boats went out early to catch fish.",
    "In the evening the baker sat by the harbour and watched the sun go down over the water.",
    "To cook the fish, heat a little butter in a pan and add salt and pepper.",
    "The children walked along the beach and found shells and crabs among the rocks.",
]


def _logits_hf(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return hf.eval()(ids).logits


def _logits_ember(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder, dtype="fp32")(ids)


# ---------------------------------------------------------------------------------------- checkpoint_io
def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"x": 1, "ü": [1, 2]})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": 1, "ü": [1, 2]}
    os.chmod(p, 0o640)
    atomic_write_text(p, "hello")
    assert p.read_text() == "hello"
    assert p.stat().st_mode & 0o777 == 0o640  # replacing keeps the file's permissions
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    from safetensors.torch import load_file

    p = tmp_path / "w.safetensors"
    save_safetensors(p, {"a": torch.ones(3), "b": torch.arange(6.0).view(2, 3).T})  # non-contiguous is fine
    assert torch.equal(load_file(p)["b"], torch.arange(6.0).view(2, 3).T)
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert set(load_file(p)) == {"a", "b"}
    assert [q.name for q in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("family,shard", [
    ("llama", False), ("llama", True), ("llama-tied", False), ("llama-tied", True),
    ("llama3-rope", False), ("mistral", False), ("qwen2", True), ("qwen3", False),
])
def test_save_hf_checkpoint_round_trips_through_hf_and_ember(hf_checkpoint, tmp_path, family, shard):
    src, hf_model = hf_checkpoint(family)
    model = load_model(src, dtype="fp32")
    out = tmp_path / "out"
    tok_files = {n: (src / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    save_hf_checkpoint(out, model, tokenizer_files=tok_files, generation_config={"bos_token_id": 1, "eos_token_id": 2},
                       max_shard_bytes=60_000 if shard else None)
    names = sorted(p.name for p in out.iterdir())
    if shard:
        shards = [n for n in names if n.startswith("model-")]
        assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    else:
        assert "model.safetensors" in names
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temp folder left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(hf_model).__name__] and cfg["dtype"] == "float32"

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(ids).logits
    assert (_logits_hf(out, ids) - ref).abs().max().item() < 1e-5
    assert (_logits_ember(out, ids) - ref).abs().max().item() < 1e-5
    from safetensors import safe_open

    files = [out / n for n in names if n.endswith(".safetensors")]
    keys = set().union(*(safe_open(f, "pt").keys() for f in files))
    assert ("lm_head.weight" in keys) == (not model.config.tie_word_embeddings)


def test_save_hf_checkpoint_is_all_or_nothing(hf_checkpoint, tmp_path, monkeypatch):
    src, _ = hf_checkpoint("llama")
    model = load_model(src, dtype="fp32")
    out = tmp_path / "ckpt"

    calls = {"n": 0}
    real = checkpoint_io.save_safetensors

    def crash_on_second_shard(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-save")
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_io, "save_safetensors", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(out, model, max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder exists
    monkeypatch.undo()

    save_hf_checkpoint(out, model)
    with pytest.raises(OutputExistsError, match="not empty"):
        save_hf_checkpoint(out, model)
    (out / "stale.txt").write_text("from the old folder")
    save_hf_checkpoint(out, model, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old folder was removed after the swap
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_checkpoint(empty, model)  # an empty folder is fine to write into
    assert (empty / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_dirs(demo_checkpoint, tmp_path_factory):
    """(trained, untrained) demo folders; the untrained one has the same seed, so the same init."""
    untrained = demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "untrained", steps=0, progress=False)
    return demo_checkpoint, untrained


def test_corpus_is_bundled_and_parsed():
    text = demo.load_corpus()
    assert 15_000 <= len(text.encode()) <= 30_000
    prose, chats = demo.corpus_documents(text)
    assert len(prose) > 40 and len(chats) > 10
    assert all(len(c) == 2 and c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in chats)


def test_demo_folder_is_a_normal_hf_checkpoint(demo_dirs):
    from transformers import AutoTokenizer

    folder, _ = demo_dirs
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["ember_demo_version"] == demo.DEMO_VERSION and cfg["model_type"] == "llama"

    hf_tok = AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "The sea is blue and the sun is warm. Ünïcode 🙂 too."
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    assert hf_tok.bos_token == demo.BOS and hf_tok.eos_token == demo.EOS and hf_tok.pad_token == demo.PAD
    messages = [{"role": "user", "content": "What is the sea like?"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == demo.render_chat(messages, add_generation_prompt=True)

    ids = torch.tensor([hf_tok(HELD_OUT[0])["input_ids"], hf_tok(HELD_OUT[1])["input_ids"][: len(hf_tok(HELD_OUT[0])["input_ids"])]])
    assert (_logits_hf(folder, ids) - _logits_ember(folder, ids)).abs().max().item() < 1e-5
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_to_id(demo.EOS), tok.token_to_id(demo.END)]


def test_ember_tokenizer_reads_the_demo_like_hf(demo_dirs):
    from transformers import AutoTokenizer

    from ember.tokenizer import Tokenizer as EmberTokenizer

    folder, _ = demo_dirs
    ours, hf_tok = EmberTokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the sea like?"}]
    assert ours.encode_chat(messages) == hf_tok.apply_chat_template(messages, tokenize=True,
                                                                     add_generation_prompt=True, return_dict=False)
    assert ours.encode("The sea") == hf_tok("The sea")["input_ids"]
    assert set(ours.eos_token_ids) == {hf_tok.convert_tokens_to_ids(t) for t in (demo.EOS, demo.END)}


def _held_out_loss(folder: Path) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load_model(folder, dtype="fp32")
    with torch.no_grad():
        losses = [demo.lm_loss(model, torch.tensor([tok.encode(t).ids])).item() for t in HELD_OUT]
    return sum(losses) / len(losses)


def test_training_lowers_held_out_loss(demo_dirs):
    trained, untrained = demo_dirs
    assert (trained / "tokenizer.json").read_bytes() == (untrained / "tokenizer.json").read_bytes()
    before, after = _held_out_loss(untrained), _held_out_loss(trained)
    # Untrained is ~ln(1024) = 6.9 nats; DEMO_TEST_STEPS steps get well below that on unseen sentences.
    assert before > 6.0 and after < before - 1.5, (before, after)


def test_second_call_reuses_the_folder(demo_dirs, monkeypatch):
    folder, _ = demo_dirs
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a complete demo folder must be reused, not retrained")

    monkeypatch.setattr(demo, "train_demo_model", no_training)
    assert demo.build_demo_checkpoint(folder, steps=10_000, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_old_demo_is_replaced_foreign_folder_is_refused(demo_dirs, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(demo_dirs[1], old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["ember_demo_version"] = demo.DEMO_VERSION - 1
    (old / "config.json").write_text(json.dumps(cfg))
    assert not demo.is_demo_checkpoint(old)
    demo.build_demo_checkpoint(old, steps=1, progress=False)
    assert demo.is_demo_checkpoint(old)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an Ember demo"):
        demo.build_demo_checkpoint(foreign, steps=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_demo_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo.build_demo_checkpoint(tmp_path / "d", steps=1, progress=False)
    assert torch.equal(torch.rand(3), expected)
