"""Checkpoint loading: sharded files, dtypes, memory mapping, and a clear error for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.config import ModelConfig
from ember.errors import CheckpointError, ConfigError, UnsupportedModelError
from ember.loading import load_model
from ember.loading.safetensors import SafetensorsFile


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_identically(hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = load_model(folder, dtype="fp32"), load_model(sharded, dtype="fp32")
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_same_dtype_weights_are_memory_mapped_not_copied(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = load_model(folder, dtype="fp32")
    # A view over the mapped file has no storage of its own allocated by torch's CPU allocator;
    # its data pointer lies inside the mmap, which we check via the file's SafetensorsFile mapping.
    f = SafetensorsFile(folder / "model.safetensors")
    t = f.get("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(t, model.model.layers[0].mlp.up_proj.weight)
    assert not t.untyped_storage().resizable()  # frombuffer storage: not torch-allocated


def test_dtype_cast_on_load(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = load_model(folder, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint("llama")[0], tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint("llama")[0], tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.layers\.0\.extra\.weight"):
        load_model(folder)


def test_misshaped_tensor_is_named(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint("llama")[0], tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*shape \[64, 100\].*\[64, 128\]"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["truncate", "bad_header", "empty", "bad_offsets"])
def test_corrupt_file_names_the_file(hf_checkpoint, tmp_path, damage):
    folder = copy_ckpt(hf_checkpoint("llama")[0], tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bad_header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        hb = json.dumps(header).encode()
        path.write_bytes(len(hb).to_bytes(8, "little") + hb + data[8 + n:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    _, hf = hf_checkpoint("llama")
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{victim.name}'.*missing"):
        load_model(folder)


def test_pickle_checkpoint_is_refused(tmp_path, hf_checkpoint):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(hf_checkpoint("llama")[0] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are not loaded"):
        load_model(folder)


def test_unsupported_model_type_lists_supported(tmp_path, hf_checkpoint):
    folder = copy_ckpt(hf_checkpoint("llama")[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2"):
        load_model(folder)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(ConfigError, match="line 2: invalid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="required field 'num_hidden_layers' is missing"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(UnsupportedModelError, match="rope type 'longrope'"):
        ModelConfig.from_dict({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 8,
                               "num_attention_heads": 2, "intermediate_size": 8,
                               "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_transformers4_style_rope_fields_are_read():
    raw = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8,
           "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("native_bf16,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_the_checkpoint_where_bf16_is_native(native_bf16, want, monkeypatch):
    import ember.loading as loading
    import ember.loading.dtypes as dtypes

    monkeypatch.setattr(dtypes, "device_supports_bf16", lambda device: native_bf16)
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", torch.bfloat16, cpu) == want
    assert loading.resolve_dtype("auto", torch.float32, cpu) == torch.float32
    assert loading.resolve_dtype("bf16", torch.float32, cpu) == torch.bfloat16  # asked for: always given
