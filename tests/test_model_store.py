"""Models by name (ember.model_store): a Hugging Face cache and an Ollama store built here in their real layouts.

The HF cache is laid out as huggingface_hub writes it (``models--org--name/blobs`` holding the files by
hash, ``snapshots/<commit>/`` of relative symlinks into ``blobs``, ``refs/<branch>`` holding the commit);
the Ollama store as ``ollama pull`` does (``manifests/registry.ollama.ai/library/NAME/TAG`` JSON naming
``blobs/sha256-<hex>``, the GGUF file being the ``application/vnd.ollama.image.model`` layer).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

import ember
from conftest import save_word_tokenizer
from ember.cli import build_parser, main
from ember.errors import ModelNotFoundError
from ember.model_store import list_models, resolve
from test_gguf import write_model_gguf

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
COMMIT = "3f1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"
COMMIT_V2 = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a291807"


def hf_cache_repo(hub: Path, repo_id: str, src: Path, commit: str, ref: str | None = "main") -> Path:
    """Put the files of ``src`` in ``hub`` as huggingface_hub caches repo ``repo_id`` at ``commit``; the snapshot."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))  # "../../blobs/<hash>", as the hub links
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the hub writes the bare hash, no newline
    return snap


def ollama_store_model(store: Path, name: str, tag: str, gguf_file: Path) -> Path:
    """Put ``gguf_file`` in ``store`` as ``ollama pull NAME:TAG`` does; the blob's path."""
    data = gguf_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = store / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    template = b"{{ .Prompt }}"
    tdigest = hashlib.sha256(template).hexdigest()
    (store / "blobs" / f"sha256-{tdigest}").write_bytes(template)
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    cdigest = hashlib.sha256(config).hexdigest()
    (store / "blobs" / f"sha256-{cdigest}").write_bytes(config)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": f"sha256:{cdigest}", "size": len(config)},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                            "size": len(data)},
                           {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{tdigest}",
                            "size": len(template)}]}
    path = store / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob


@pytest.fixture(scope="module")
def chat_folder(hf_checkpoint, tmp_path_factory) -> Path:
    """A tiny llama checkpoint with a chat template (chat needs one)."""
    src, _ = hf_checkpoint("llama")
    folder = tmp_path_factory.mktemp("chat-model")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(src / f, folder / f)
    save_word_tokenizer(folder, chat_template=CHATML)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(hf_checkpoint, tmp_path_factory) -> Path:
    _, hf = hf_checkpoint("llama")
    return write_model_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf, "llama")


@pytest.fixture
def stores(tmp_path, monkeypatch, chat_folder, tiny_gguf):
    """HF_HOME, OLLAMA_MODELS and EMBER_MODELS pointing at stores built in tmp_path; their paths by name."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "ember-models"))
    hub = tmp_path / "hf" / "hub"
    snap = hf_cache_repo(hub, "tiny-org/tiny-chat", chat_folder, COMMIT)
    v2 = hf_cache_repo(hub, "tiny-org/tiny-chat", chat_folder, COMMIT_V2, ref="v2")
    blob = ollama_store_model(tmp_path / "ollama", "tiny", "latest", tiny_gguf)
    ollama_store_model(tmp_path / "ollama", "tiny", "q8", tiny_gguf)
    mine = tmp_path / "ember-models" / "mine"
    shutil.copytree(chat_folder, mine)
    monkeypatch.chdir(tmp_path)
    return {"snap": snap, "v2": v2, "blob": blob, "mine": mine, "hub": hub}


# ------------------------------------------------------------------------------------------- resolving
def test_hf_cache_names_resolve_by_revision(stores, tmp_path, monkeypatch):
    assert resolve("tiny-org/tiny-chat") == stores["snap"]
    assert resolve("tiny-org/tiny-chat@main") == stores["snap"]
    assert resolve("tiny-org/tiny-chat@v2") == stores["v2"]
    assert resolve(f"tiny-org/tiny-chat@{COMMIT_V2[:10]}") == stores["v2"]
    assert resolve("Tiny-Org/Tiny-Chat") == stores["snap"]  # one cached repo matches in another case
    with pytest.raises(ModelNotFoundError, match=r"revision 'nope'.*cached revisions: main, v2"):
        resolve("tiny-org/tiny-chat@nope")
    # HF_HUB_CACHE wins over HF_HOME
    other = tmp_path / "other-hub"
    snap = hf_cache_repo(other, "tiny-org/tiny-chat", stores["snap"], COMMIT_V2)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve("tiny-org/tiny-chat") == snap


def test_ollama_and_ember_names_resolve(stores):
    assert resolve("ollama:tiny") == stores["blob"]
    assert resolve("ollama:tiny:latest") == stores["blob"]
    assert resolve("ollama:tiny:q8") == stores["blob"]  # the same content is one blob
    assert resolve("mine") == stores["mine"]


def test_a_path_comes_first_and_missing_paths_pass_through(stores, tmp_path):
    local = tmp_path / "tiny-org" / "tiny-chat"  # a relative folder spelled like a Hub id
    local.mkdir(parents=True)
    assert resolve("tiny-org/tiny-chat") == Path("tiny-org/tiny-chat")
    assert resolve(str(tmp_path / "gone")) == tmp_path / "gone"  # the loader names a missing path itself
    assert resolve("x/y/model.gguf") == Path("x/y/model.gguf")


def test_unknown_names_list_close_matches(stores):
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache.*close matches: tiny-org/tiny-chat"):
        resolve("tiny-org/tiny-caht")
    with pytest.raises(ModelNotFoundError, match=r"not in the Ollama store.*close matches: ollama:tiny:latest"):
        resolve("ollama:tiyn")
    with pytest.raises(ModelNotFoundError, match=r"close matches: mine"):
        resolve("mien")


def test_ollama_manifest_without_its_blob_is_named(stores, tmp_path):
    stores["blob"].unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing from .*blobs; pull the model again"):
        resolve("ollama:tiny")


def test_list_finds_every_store(stores):
    found = {m.name: m for m in list_models()}
    assert set(found) == {"mine", "tiny-org/tiny-chat", "tiny-org/tiny-chat@v2", "ollama:tiny:latest",
                          "ollama:tiny:q8"}
    assert found["tiny-org/tiny-chat"].path == stores["snap"]
    # each blob once: the two snapshots share theirs
    blobs = sum(p.stat().st_size for p in (stores["hub"] / "models--tiny-org--tiny-chat" / "blobs").iterdir())
    assert found["tiny-org/tiny-chat"].size_bytes() == blobs
    assert found["ollama:tiny:q8"].size_bytes() == stores["blob"].stat().st_size


# ------------------------------------------------------------------------------------------- every verb
def test_generate_by_name_equals_by_path(stores, capsys):
    want = ember.load(stores["snap"], dtype="fp32").generate("w3 w4", max_new_tokens=5, temperature=0).text
    assert main(["generate", "tiny-org/tiny-chat", "w3 w4", "-n", "5", "--dtype", "fp32", "-q"]) == 0
    assert capsys.readouterr().out == want + "\n"
    want = ember.load(stores["blob"], dtype="fp32").generate("hello", max_new_tokens=5, temperature=0).text
    assert main(["generate", "ollama:tiny", "hello", "-n", "5", "--dtype", "fp32", "-q"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "mine", "w3", "-n", "2", "--dtype", "fp32", "-q"]) == 0


def test_chat_by_name(stores, capsys, monkeypatch):
    for name in ("tiny-org/tiny-chat@v2", "ollama:tiny:q8"):
        monkeypatch.setattr("sys.stdin", io.StringIO("w3 w4\nw5\n"))
        assert main(["chat", name, "-n", "3", "--temperature", "0", "--dtype", "fp32"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2


def test_serve_resolves_the_name_and_serves_under_it(stores):
    from ember.commands.serve import load_engine, server_settings

    for name, path in (("tiny-org/tiny-chat", stores["snap"]), ("ollama:tiny", stores["blob"])):
        args = build_parser().parse_args(["serve", name, "--dtype", "fp32", "--max-batch", "2"])
        assert server_settings(args).model_name == name
        assert load_engine(args).path == path
    args = build_parser().parse_args(["serve", str(stores["mine"]), "--dtype", "fp32"])
    assert server_settings(args).model_name == "mine"  # a path is served by its folder name, as before


def test_plan_eval_and_quantize_by_name(stores, capsys, tmp_path):
    assert main(["plan", "tiny-org/tiny-chat", "--quant", "none"]) == 0
    assert "tiny-chat" in capsys.readouterr().out
    assert main(["plan", "ollama:tiny", "--quant", "none"]) == 0
    assert "GGUF file" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-8b", "--quant", "int4"]) == 0  # a catalog name still plans without weights
    capsys.readouterr()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3, 60)))
    assert main(["eval", "ppl", "mine", "--text", str(text), "--window", "32", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "mine"
    assert main(["quantize", "tiny-org/tiny-chat", "--to", "int8", "-o", str(tmp_path / "q8")]) == 0
    assert (tmp_path / "q8" / "config.json").is_file()


def test_unknown_name_is_one_line_with_close_matches(stores, capsys):
    for argv in (["generate", "tiny-org/tiny-chta", "hi"], ["plan", "ollama:tinny"], ["serve", "mnie"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ember: error:") and err.count("\n") == 1 and "close matches:" in err, err


def test_list_verb_table_and_json(stores, capsys):
    assert main(["list", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "FORMAT", "SIZE", "FITS"]
    assert any(ln.startswith("ollama:tiny:latest") and " gguf F32 " in ln and ln.endswith("yes") for ln in lines)
    assert main(["list", "--device", "cpu", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    hf = rows["tiny-org/tiny-chat"]
    n_params = ember.load(stores["snap"], dtype="fp32").config.num_parameters()
    assert (hf["source"], hf["family"], hf["format"], hf["fits"]) == ("hf", "llama", "safetensors fp32", "yes")
    assert hf["parameters"] == n_params and hf["size_bytes"] > 0
    assert rows["ollama:tiny:latest"]["family"] == "llama" and rows["ollama:tiny:latest"]["parameters"] == n_params
    assert rows["mine"]["source"] == "ember"


def test_list_with_no_models_says_where_it_looked(tmp_path, monkeypatch, capsys):
    for var in ("HF_HUB_CACHE", "HF_HOME", "OLLAMA_MODELS", "EMBER_MODELS"):
        monkeypatch.setenv(var, str(tmp_path / var))
    assert main(["list"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no local models found" in out.err and str(tmp_path / "OLLAMA_MODELS") in out.err
