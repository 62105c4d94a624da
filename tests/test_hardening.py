"""Hostile inputs: absurd sizes, paths out of the folder, corrupt headers, bad config values, bad training
data, temp folders left by kills. Each must end in a one-line EmberError naming what is wrong (or load)."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import fuzz  # noqa: E402

from ember.errors import (  # noqa: E402
    AdapterError, CheckpointError, ConfigError, DataError, EmberError, GGUFError, TokenizerError,
)
from ember.loading import load_model  # noqa: E402
from ember.loading.gguf import config_from_gguf, load_gguf, GGUFFile  # noqa: E402


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def tiny(tmp_path: Path, name: str = "m", **config) -> Path:
    return fuzz.write_checkpoint(tmp_path / name, config={**fuzz.TINY_CONFIG, **config})


def test_tiny_inputs_load(tmp_path):
    assert load_model(tiny(tmp_path), dtype="fp32").config.num_hidden_layers == 2
    model, tok = load_gguf(fuzz.write_gguf(tmp_path / "m.gguf"), dtype="fp32")
    assert model.config.num_hidden_layers == 2 and tok.vocab_size == 32


# ---------------------------------------------------------------------------------------- 1. absurd sizes
@pytest.mark.parametrize("layers,error", [(100000, ConfigError), (2**31, ConfigError), (500, CheckpointError)])
def test_absurd_layer_count_is_refused_before_building(tmp_path, layers, error):
    with pytest.raises(error) as e:
        load_model(tiny(tmp_path, num_hidden_layers=layers))
    assert "num_hidden_layers" in one_line(e)


def test_embedding_shape_is_checked_against_the_config_first(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tiny(tmp_path, vocab_size=10**6))
    assert "embed_tokens" in one_line(e) and "vocab_size" in str(e.value)


@pytest.mark.parametrize("count", [2**31, 3, 0])
def test_gguf_block_count_must_match_the_tensor_table(tmp_path, count):
    path = fuzz.write_gguf(tmp_path / "m.gguf", {"llama.block_count": (count, VT.UINT32)})
    with pytest.raises(GGUFError) as e:
        config_from_gguf(GGUFFile.open(path))
    assert "block_count" in one_line(e)


# ---------------------------------------------------------------------------------------- 2. paths
def test_index_entry_outside_the_folder_is_not_opened(tmp_path):
    folder = tiny(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret-bytes\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../secret.txt"}}))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = one_line(e)
    assert "model.embed_tokens.weight" in msg and "outside" in msg and "secret-bytes" not in msg
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside"):
        load_model(folder)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tiny(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "outside" in one_line(e)


def test_hub_cache_snapshot_links_into_its_blobs_load(tmp_path):
    repo = tmp_path / "models--org--tiny"
    src = tiny(tmp_path)
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (src / f).rename(repo / "blobs" / f"{f}.blob")
        (snap / f).symlink_to(Path("../../blobs") / f"{f}.blob")
    assert load_model(snap, dtype="fp32").config.hidden_size == 16


def test_adapter_files_linked_out_of_the_folder_are_refused(tmp_path):
    from ember.train.adapter_files import read_adapter_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "cfg.json").write_text("{}")
    (adapter / "adapter_config.json").symlink_to(tmp_path / "cfg.json")
    with pytest.raises(AdapterError) as e:
        read_adapter_config(adapter)
    assert "outside" in one_line(e)


def test_split_gguf_is_refused_with_the_merge_command(tmp_path):
    path = fuzz.write_gguf(tmp_path / "m-00001-of-00002.gguf", {"split.count": (2, VT.UINT16)})
    with pytest.raises(GGUFError) as e:
        GGUFFile.open(path)
    assert "llama-gguf-split --merge" in one_line(e)


# ---------------------------------------------------------------------------------------- 3. safetensors
def _edit(tmp_path, edit) -> Path:
    shapes = fuzz.tiny_shapes()
    tensors = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    return fuzz.write_checkpoint(tmp_path / "m", weights=fuzz.safetensors_bytes(tensors, edit))


def _set(name: str, key: str, value):
    def edit(h):
        h[name][key] = value
        return h
    return edit


EMB, NORM, LAST = "model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda h: {**h, NORM: {**h[NORM], "data_offsets": [0, h[NORM]["data_offsets"][1] - h[NORM]["data_offsets"][0]]}},
     "overlaps"),
    (lambda h: {**h, EMB: {**h[EMB], "data_offsets": [8, h[EMB]["data_offsets"][1] + 8]}}, "gap"),
    (lambda h: {**h, LAST: {"dtype": "F32", "shape": [16, 64],
                            "data_offsets": [h[LAST]["data_offsets"][0], h[LAST]["data_offsets"][0] + 4096]}},
     "truncated"),
    (_set(NORM, "data_offsets", [10**12, 10**12 + 64]), "gap"),
    (_set(EMB, "shape", [float("inf"), 16]), "malformed shape"),
    (_set(EMB, "shape", [float("nan"), 16]), "malformed shape"),
    (_set(EMB, "shape", [2**80, 16]), "malformed shape"),
    (lambda h: json.dumps(h).replace('"shape": [32, 16]', '"shape": [' + "9" * 5000 + ", 16]"), "integer"),
    (_set(EMB, "dtype", "I32"), "float weight"),
    (_set(EMB, "data_offsets", [True, 2048]), "data_offsets"),
])
def test_corrupt_safetensors_headers_give_one_line(tmp_path, edit, match):
    with pytest.raises(CheckpointError) as e:
        load_model(_edit(tmp_path, edit))
    assert match in one_line(e)


def test_deeply_nested_header_is_one_line(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(_edit(tmp_path, lambda h: "[" * 100000))
    one_line(e)


# ---------------------------------------------------------------------------------------- 4. config values
@pytest.mark.parametrize("field,value", [
    ("tie_word_embeddings", "false"), ("rms_norm_eps", -1e-6), ("rms_norm_eps", None), ("rope_theta", 0),
    ("rope_theta", -1), ("rope_theta", float("nan")), ("head_dim", "8"), ("max_position_embeddings", 0),
    ("num_key_value_heads", 3), ("attention_bias", 1), ("eos_token_id", 32), ("hidden_size", True),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}), ("layer_types", ["full_attention"]),
    ("num_local_experts", "8"), ("torch_dtype", 16),
])
def test_bad_config_values_name_field_and_file(tmp_path, field, value):
    folder = tiny(tmp_path, **{field: value})
    with pytest.raises(ConfigError) as e:
        load_model(folder)
    msg = one_line(e)
    assert field in msg and str(folder / "config.json") in msg


def test_nan_rope_freq_base_in_gguf_is_refused(tmp_path):
    path = fuzz.write_gguf(tmp_path / "m.gguf", {"llama.rope.freq_base": (float("nan"), VT.FLOAT32)})
    with pytest.raises(GGUFError) as e:
        load_gguf(path)
    assert "freq_base" in one_line(e)


def test_tokenizer_ids_past_the_model_vocabulary_fail_at_load(tmp_path):
    import ember

    folder = tiny(tmp_path)
    fuzz.tiny_tokenizer()._backend.save(str(folder / "tokenizer.json"))  # 259 ids for a 32-row embedding
    with pytest.raises(TokenizerError) as e:
        ember.load(folder, check_memory=False)
    assert "vocab_size 32" in one_line(e)


# ---------------------------------------------------------------------------------------- 6. training data
def _jsonl(tmp_path, *lines: bytes) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_u2028_inside_a_string_is_not_a_line_break(tmp_path):
    from ember.train.data import read_jsonl

    text = json.dumps({"text": "a\u2028b\u0085c\u2029d"}, ensure_ascii=False).encode()
    recs = read_jsonl(_jsonl(tmp_path, text, b'{"text": 5}'.replace(b"5", b'"ok"')))
    assert [n for n, _ in recs] == [1, 2] and recs[0][1]["text"] == "a\u2028b\u0085c\u2029d"
    with pytest.raises(DataError, match=r"d\.jsonl:2: "):
        read_jsonl(_jsonl(tmp_path, text, b'{"text": 5}'))


@pytest.mark.parametrize("bad,match", [
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (b'{"text": ' + b"[" * 100000, "nested"),
    (b'{"text": "x", "n": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"text": "\\ud800"}', "surrogate"),
    (b'{"text": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}", "nested"),
])
def test_bad_lines_are_reported_by_line_number(tmp_path, bad, match):
    from ember.train.data import read_jsonl

    with pytest.raises(DataError) as e:
        read_jsonl(_jsonl(tmp_path, b'{"text": "fine"}', bad, b'{"text": "fine"}'))
    msg = one_line(e)
    assert "d.jsonl:2:" in msg and match in msg


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path):
    from ember.train.data import read_jsonl

    big = b'{"text": "' + b"x" * 5000 + b'"}'
    with pytest.raises(DataError) as e:
        read_jsonl(_jsonl(tmp_path, b'{"text": "a"}', big, b'{"text": "b"}'), max_line_bytes=1000)
    assert "d.jsonl:2:" in one_line(e) and "longer than" in str(e.value)


def test_long_records_tokenize_only_what_seq_len_can_use(tmp_path, monkeypatch):
    import ember.train.data as tdata

    tok = fuzz.tiny_tokenizer()
    words = " ".join(f"w{i}" for i in range(200_000))  # ~1.3 MB of text, one line
    path = _jsonl(tmp_path, json.dumps({"text": words}).encode(),
                  json.dumps({"prompt": words, "completion": " end"}).encode(),
                  json.dumps({"messages": [{"role": "user", "content": words},
                                           {"role": "assistant", "content": "ok"}]}).encode())
    seen: list[int] = []
    real = tdata.encode_with_offsets
    monkeypatch.setattr(tdata, "encode_with_offsets", lambda t, text, a: seen.append(len(text)) or real(t, text, a))
    examples, stats = tdata.load_jsonl(path, tok, seq_len=64, loss_on="all")
    assert max(seen) < 20_000  # never the whole 1.3 MB
    full = tok.encode(words)
    assert examples[0].ids == full[:64] and stats.truncated == 3
    assert examples[1].ids == tok.encode(words + " end")[:64]


# ---------------------------------------------------------------------------------------- 7. temp folders
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp(root: Path, name: str, pid: int | None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"x")
    if pid is not None:
        from ember.checkpoint_io import TEMP_MARKER
        import socket

        (d / TEMP_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return d


def test_stale_tune_temp_folders_are_removed_and_reported(tmp_path):
    from ember.train.data import BatchPlan, Example
    from ember.train.trainer import TrainConfig, Trainer

    ck = tmp_path / "run" / "checkpoints"
    stale = _temp(ck, ".step-000010.tmp-abc_12", _dead_pid())
    live = _temp(ck, ".step-000020.tmp-def34", os.getpid())     # a run still writing it
    foreign = _temp(ck, ".step-000030.tmp-ghi56", None)          # no marker: not provably ours
    other = _temp(ck, "step-000040", _dead_pid())                # a real checkpoint's name
    model = load_model(tiny(tmp_path), dtype="fp32")
    model.lm_head.weight.requires_grad_(True)
    plan = BatchPlan([Example([1, 2, 3], [True] * 3)], batch_size=1, seq_len=8)
    logs: list[str] = []
    Trainer(model, plan, TrainConfig(steps=1), out_dir=tmp_path / "run", progress=False, log=logs.append)
    assert not stale.exists() and live.exists() and foreign.exists() and other.exists()
    assert len(logs) == 1 and "removed 1" in logs[0] and stale.name in logs[0] and "\n" not in logs[0]


def test_stale_quantize_temp_folders_are_removed_and_reported(tmp_path):
    from ember.loading.quantized import quantize_checkpoint

    out = tmp_path / "out"
    stale = _temp(tmp_path, "out.tmp-k2x9_a1", _dead_pid())
    other = _temp(tmp_path, "outer.tmp-k2x9_a1", _dead_pid())  # another output's name
    dest, info = quantize_checkpoint(tiny(tmp_path), out, "int8")
    assert info["stale_removed"] == [stale] and not stale.exists() and other.exists()
    assert not list(dest.glob(".ember-partial")) and (dest / "config.json").exists()


# ---------------------------------------------------------------------------------------- import direction
def _imports(path: Path, module: str) -> set[str]:
    """Every ember module ``path`` imports, at any level (function-level imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ember")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ember"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _module_path(sub) is not None else node.module)
    return out - {module}


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def test_loading_quant_tokenizer_import_one_way():
    graph = {}
    for p in (ROOT / "ember").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = _imports(p, name)
    mine = [m for m in graph if m.startswith(("ember.loading", "ember.quant", "ember.config", "ember.checkpoint_io"))
            or m == "ember.tokenizer"]
    for m in mine:
        if m.startswith("ember.quant") and m != "ember.quant.cli":
            assert not any(d.startswith("ember.loading") for d in graph[m]), f"{m} imports loading"
        if m in ("ember.tokenizer", "ember.config"):
            assert not any(d.startswith(("ember.loading", "ember.quant")) for d in graph[m]), m
    # no cycle through any of these modules
    for start in mine:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, " -> ".join(trail + [nxt])
                if nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))


def test_ember_errors_only(tmp_path):
    """The header length field pointing past the file, a zero-byte file: still EmberErrors."""
    folder = tiny(tmp_path)
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[:8] = struct.pack("<Q", 2**64 - 1)
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(EmberError):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(EmberError):
        load_model(folder)
