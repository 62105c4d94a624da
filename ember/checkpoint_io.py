"""Atomic writing of files and whole HF-format checkpoint folders.

Everything Ember writes to disk that a later run will read (demo, quantize, merge, tune) goes
through here, so that a crash or Ctrl-C never leaves a file or folder that *looks* complete but
is not (docs/design.md, principle 7):

* single files are written to a temp file in the same directory, flushed and fsynced, then
  ``os.replace``-d over the target, and the directory is fsynced so the rename itself is durable;
* a checkpoint folder is built in a ``<name>.tmp-XXXX`` sibling and renamed into place only once
  every file in it is on disk. A left-over ``.tmp-`` folder is visibly not a checkpoint.

The folder written by :func:`save_hf_checkpoint` is an ordinary Hugging Face checkpoint:
``config.json`` (HF keys), ``model.safetensors`` or shards + ``model.safetensors.index.json``,
``generation_config.json`` and tokenizer files. No ``transformers`` import is needed to write it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors.torch import save_file

from ember.errors import OutputExistsError

if TYPE_CHECKING:  # pragma: no cover
    from ember.models import Transformer

# Read the process umask once so temp files (created 0600 by mkstemp) end up with the permissions
# a plain open() would have given them.
_UMASK = os.umask(0)
os.umask(_UMASK)

# model_type -> HF class name for ``architectures`` (what AutoModelForCausalLM dispatches on).
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
}

SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files whose format is not pt/tf/flax/mlx


# ---------------------------------------------------------------------------------------- temp folders
# Every temp folder Ember writes a checkpoint into holds this file from its creation until just before
# the rename. A folder left by a killed run is recognised by its name pattern AND this marker (whose
# process is gone), so cleaning up never touches a folder Ember did not make, or one still being written.
TEMP_MARKER = ".ember-partial"


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new ``<prefix>XXXXXXXX`` folder in ``parent`` holding :data:`TEMP_MARKER` (this process's id)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (tmp / TEMP_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    return tmp


def seal_temp_dir(tmp: str | os.PathLike) -> None:
    """Remove the marker from a finished temp folder and fsync it: the next step is the rename."""
    (Path(tmp) / TEMP_MARKER).unlink(missing_ok=True)
    fsync_dir(tmp)


def remove_stale_temp_dirs(parent: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete temp folders in ``parent`` left by Ember runs that were killed mid-write.

    A folder is removed only when its name matches the regular expression ``pattern`` (anchored at
    the start), it holds :data:`TEMP_MARKER`, and the process the marker names is not running on
    this host (a folder another live run is writing is left alone).

    Returns:
        The folders removed.
    """
    root = Path(parent)
    if not root.is_dir():
        return []
    rx = re.compile(pattern)
    removed = []
    for p in sorted(root.iterdir()):
        if not (rx.match(p.name) and p.is_dir() and not p.is_symlink()):
            continue
        marker = p / TEMP_MARKER
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # no marker (or not ours): not provably Ember's, leave it
        if isinstance(owner, dict) and owner.get("host") == socket.gethostname() and _alive(owner.get("pid")):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


def _alive(pid: object) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def stale_note(removed: list[Path], what: str) -> str:
    """The one line that says which stale temp folders were removed."""
    names = ", ".join(p.name for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
    return (f"removed {len(removed)} unfinished {what} temp folder{'s' if len(removed) > 1 else ''} "
            f"left by an interrupted run in {removed[0].parent}: {names}")


# ---------------------------------------------------------------------------------------- files
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames/creations inside it survive a power loss (no-op off POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _new_file_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777  # replacing a file keeps its permissions
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a torn one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (trailing newline, key order kept) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically.

    Tensors are moved to CPU and made contiguous. Tensors sharing storage (tied weights) are
    refused by safetensors; the caller drops or clones them first.
    Streams to a temp file rather than building the file in memory, so a large shard is never
    held twice.
    """
    target = Path(path)
    meta = dict(SAFETENSORS_METADATA if metadata is None else metadata)
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(prepared, tmp, metadata=meta)
        _fsync_file(tmp)
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)


def _unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- config
def hf_config_dict(cfg: Any, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The HF ``config.json`` object for a :class:`~ember.config.ModelConfig`.

    Keys Ember did not model (``cfg.extra``) are written back unchanged; Ember's own fields win.
    Derived fields (``qk_norm``, ``qkv_bias_only``) are family facts, not HF keys, and are omitted.
    """
    out: dict[str, Any] = {
        "architectures": cfg.extra.get("architectures") or [ARCHITECTURES.get(cfg.model_type, "LlamaForCausalLM")],
        "model_type": cfg.model_type,
    }
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        out[key] = getattr(cfg, key)
    # Written even when null: Mistral's HF default window is 4096, so "absent" would change the model.
    if cfg.model_type != "llama" or cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.use_sliding_window
        out["max_window_layers"] = cfg.max_window_layers
    if cfg.layer_types is not None:
        out["layer_types"] = list(cfg.layer_types)
    for key, value in cfg.extra.items():
        if key not in out and key != "transformers_version":  # we are not transformers; don't claim a version
            out[key] = value
    if "rope_parameters" in out:
        # transformers 5 reads RoPE from here when present; keep it consistent with rope_theta/scaling.
        out["rope_parameters"] = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    name = _DTYPE_NAMES.get(dtype) if dtype is not None else cfg.torch_dtype
    if name:
        out["torch_dtype"] = name  # transformers 4 key
        out["dtype"] = name        # transformers 5 key
    return out


# ---------------------------------------------------------------------------------------- folders
def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: persistent state, ``lm_head.weight`` dropped when tied, and the
    multi-token-prediction heads kept beside the forward pass (``model.extra_weights``' ``mtp.*``, under their
    checkpoint names and dtype, so a derived checkpoint keeps them).

    Any other tensors that still share storage are cloned, because safetensors refuses aliasing.
    """
    cfg = getattr(model, "config", None)
    state = dict(model.state_dict())
    extra = getattr(model, "extra_weights", None) or {}
    state.update({n: t for n, t in extra.items() if n.startswith("mtp.")})  # GGUF names stay out of an HF folder
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    seen: set[tuple[int, int]] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; load or materialise the model before saving")
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel() > 0:
            state[name] = t.clone()
        else:
            seen.add(key)
    return state


def shard_state(state: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into groups of at most ``max_shard_bytes`` (a bigger single tensor gets its own)."""
    if not max_shard_bytes or max_shard_bytes <= 0:
        return [dict(state)]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _model_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None


def save_hf_checkpoint(
    folder: str | os.PathLike,
    model: "Transformer",
    tokenizer_files: Mapping[str, str | bytes] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder, all or nothing.

    Args:
        folder: destination; must not exist or be empty unless ``overwrite``.
        model: an Ember :class:`~ember.models.Transformer` (``model.config`` is its ModelConfig).
        tokenizer_files: file name -> content (``tokenizer.json``, ``tokenizer_config.json``, ...).
        generation_config: written as ``generation_config.json`` when given.
        max_shard_bytes: when the weights exceed this, write ``model-0000i-of-0000N.safetensors``
            plus ``model.safetensors.index.json`` as HF does; otherwise one ``model.safetensors``.
        overwrite: replace an existing non-empty folder (the old one is removed only after the
            new one is in place).
        extra_files: any other files to include (e.g. a README), name -> content.
    Returns:
        The folder path.
    Raises:
        OutputExistsError: ``folder`` exists, is not empty, and ``overwrite`` is False.
    """
    dest = Path(folder)
    _check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(model)
    tmp = make_temp_dir(dest.parent, temp_prefix(dest))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        _write_weights(tmp, state, max_shard_bytes)
        atomic_write_json(tmp / "config.json", hf_config_dict(model.config, _model_dtype(state)))
        if generation_config is not None:
            atomic_write_json(tmp / "generation_config.json", dict(generation_config))
        for name, content in {**(tokenizer_files or {}), **(extra_files or {})}.items():
            if Path(name).name != name:
                raise ValueError(f"file name {name!r} must be a plain name inside the checkpoint folder")
            atomic_write_bytes(tmp / name, content.encode("utf-8") if isinstance(content, str) else bytes(content))
        seal_temp_dir(tmp)
        _move_into_place(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def temp_prefix(dest: str | os.PathLike) -> str:
    """The name prefix of :func:`save_hf_checkpoint`'s temp folders for ``dest``."""
    return f"{Path(dest).name}.tmp-"


def remove_stale_checkpoint_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove ``<dest>.tmp-*`` folders a killed :func:`save_hf_checkpoint` to ``dest`` left behind."""
    dest = Path(dest)
    return remove_stale_temp_dirs(dest.parent, re.escape(temp_prefix(dest)) + r"[a-z0-9_]+$")


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest}: exists and is not a folder; choose another output path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise OutputExistsError(f"{dest}: folder exists and is not empty; choose another path or pass overwrite=True")


def _write_weights(tmp: Path, state: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    shards = shard_state(state, max_shard_bytes)
    if len(shards) == 1:
        save_safetensors(tmp / "model.safetensors", shards[0])
        return
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_safetensors(tmp / fname, shard)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    atomic_write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to ``dest``; an old ``dest`` is set aside first, removed last."""
    old: Path | None = None
    if dest.is_dir():
        if any(dest.iterdir()):
            if not overwrite:  # re-checked: someone may have written there while we were saving
                raise OutputExistsError(f"{dest}: folder exists and is not empty; choose another path or pass overwrite=True")
            old = Path(tempfile.mkdtemp(prefix=f"{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.rename(dest, old)
        else:
            os.rmdir(dest)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Files copied next to rewritten weights (quantized, MXFP4): everything small that is not weights or config.
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".md")
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}
_MAX_COPY_BYTES = 64 << 20


def side_files(folder: Path) -> dict[str, bytes]:
    """Tokenizer, generation config, chat template, README ... of a checkpoint folder, name -> bytes."""
    out = {}
    for p in sorted(folder.iterdir()):
        if (p.is_file() and p.suffix in _COPY_SUFFIXES and p.name not in _NOT_COPIED
                and p.stat().st_size <= _MAX_COPY_BYTES):
            out[p.name] = p.read_bytes()
    return out
