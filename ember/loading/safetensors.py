"""HF checkpoint folders: single or sharded safetensors, memory-mapped, every key checked.

We parse the safetensors header ourselves (8-byte little-endian length + JSON) so that a corrupt
file produces an error naming the file and tensor, and so tensors can be zero-copy views over a
private memory map: a bf16 checkpoint loaded as bf16 on CPU is never held twice in memory.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ember.config import ModelConfig
from ember.errors import CheckpointError
from ember.loading.paths import file_inside

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on header size
_MAX_DIM = 1 << 40  # no real tensor dimension comes near; keeps byte counts small integers
_MAX_RANK = 8


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range inside the data section."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file: validated header and lazily mapped tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: file is truncated ({size} bytes); re-download or re-convert it")
                n = int.from_bytes(head, "little")
                if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file or truncated (header length {n}, file size {size})"
                    )
                header_bytes = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        header = _parse_header(self.path, header_bytes)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header ('__metadata__' is not an object)")
        self.metadata: dict[str, str] = meta
        self.tensors: dict[str, TensorInfo] = _tensor_infos(self.path, header, 8 + n, size)
        self._mmap: mmap.mmap | None = None

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a CPU view over the mapped file (copy-on-write, never written back)."""
        info = self.tensors[name]
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = info.end - info.begin
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.begin % info.dtype.itemsize:
            # Misaligned data cannot be viewed in place; copy just this tensor.
            raw = bytearray(self._mmap[info.begin:info.end])
            return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.frombuffer(self._mmap, dtype=info.dtype, count=count // info.dtype.itemsize, offset=info.begin)
        return t.reshape(info.shape)


def _parse_header(path: Path, header_bytes: bytes) -> dict:
    """The header's JSON object; any malformation is a one-line CheckpointError."""
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _tensor_infos(path: Path, header: dict, data_start: int, size: int) -> dict[str, TensorInfo]:
    """Validate every entry of a safetensors header as the format requires, then check that the byte
    ranges, taken in order, start at 0, follow each other with no gap or overlap, and end exactly at
    the end of the file (what the ``safetensors`` library itself enforces)."""
    infos: dict[str, TensorInfo] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dt!r}; Ember reads {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > _MAX_RANK
                or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= _MAX_DIM for d in shape)):
            raise CheckpointError(f"{where}: malformed shape {_short(shape)} (expected up to {_MAX_RANK} "
                                  "non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets)):
            raise CheckpointError(f"{where}: malformed data_offsets {_short(offsets)} (expected [begin, end])")
        b, e = offsets
        dtype = DTYPES[dt]
        nbytes = dtype.itemsize * math.prod(shape)
        if e - b != nbytes:
            raise CheckpointError(f"{where}: claims {e - b} bytes but shape {shape} {dt} needs {nbytes}")
        infos[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + b, data_start + e)
    at = data_start
    for t in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != at:
            what = "overlaps the tensor before it" if t.begin < at else f"leaves a gap of {t.begin - at} bytes before it"
            raise CheckpointError(f"{path}: corrupt header: tensor {t.name!r} at data offset {t.begin - data_start} "
                                  f"{what} (offsets must be in order, back to back)")
        at = t.end
    if at > size:
        raise CheckpointError(f"{path}: truncated: the tensors end at byte {at} but the file has {size}; "
                              "re-download or re-convert it")
    if at < size:
        raise CheckpointError(f"{path}: corrupt header: the tensors end at byte {at} but the file has {size} "
                              f"({size - at} bytes no tensor covers); re-download or re-convert it")
    return infos


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Checkpoint:
    """All tensors of an HF checkpoint folder (``model.safetensors`` or a sharded index)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.files: dict[Path, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            weight_map = _read_weight_map(index)
            for name, fname in weight_map.items():
                path = file_inside(self.folder, fname, f"{index}: weight_map[{name!r}]")
                if path not in self.files:
                    if not path.exists():
                        raise CheckpointError(f"{index}: shard {fname!r} (holding {name!r}) is missing from {self.folder}")
                    self.files[path] = SafetensorsFile(path)
                shard = self.files[path]
                if name not in shard.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {index.name} is not in this shard")
                self.where[name] = shard
        elif single.exists():
            file_inside(self.folder, single.name, str(self.folder))
            self.files[single] = SafetensorsFile(single)
            self.where = {name: self.files[single] for name in self.files[single].tensors}
        else:
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if len(others) == 1:
                f = SafetensorsFile(file_inside(self.folder, others[0], str(self.folder)))
                self.files[f.path] = f
                self.where = {name: f for name in f.tensors}
            else:
                pickles = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt*")]
                hint = (f" (found {', '.join(pickles)}: pickle checkpoints are not loaded for safety; "
                        "convert them to safetensors)") if pickles else ""
                raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json{hint}")

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.where:
            yield name, self.get(name)

    def dtype(self) -> torch.dtype:
        """The most common floating dtype among the tensors (the checkpoint's dtype)."""
        counts: dict[torch.dtype, int] = {}
        for f in self.files.values():
            for t in f.tensors.values():
                if t.dtype.is_floating_point:
                    counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > _MAX_HEADER:
            raise CheckpointError(f"{index}: {index.stat().st_size} bytes is too large for an index")
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (KeyError, TypeError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError too
        raise CheckpointError(f"{index}: malformed index (expected a JSON object with 'weight_map')") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed index ('weight_map' is not an object of tensor -> file)")
    return weight_map


def check_layers(cfg: ModelConfig, ckpt) -> None:
    """Refuse a config whose sizes the checkpoint's tensors contradict, before any model is built.

    Compares ``num_hidden_layers`` with the layers present and ``vocab_size``/``hidden_size`` with the
    embedding table, so that a config claiming 100000 layers over a 2-layer checkpoint fails at once
    instead of building (or planning) 100000 layers first.

    Raises:
        CheckpointError: naming config.json's value and what the tensors hold.
    """
    found = [int(m.group(1)) for n in ckpt.names() if (m := _LAYER.match(n))]
    have = max(found) + 1 if found else 0
    if have != cfg.num_hidden_layers:
        raise CheckpointError(f"{ckpt.folder}: config.json says num_hidden_layers = {cfg.num_hidden_layers} but the "
                              f"checkpoint holds {have} layer(s) of tensors; the config does not belong to these weights")
    emb = "model.embed_tokens.weight"
    if emb in set(ckpt.names()):
        shape = tuple(ckpt.info(emb).shape)
        want = (cfg.vocab_size, cfg.hidden_size)
        if shape != want:
            raise CheckpointError(f"{ckpt.info(emb).file}: tensor {emb!r} has shape {list(shape)}, config.json "
                                  f"implies {list(want)} (vocab_size, hidden_size)")


def load_weights(module: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device,
                 ignore: tuple[str, ...] = ()) -> None:
    """Fill a meta-device ``module`` from ``ckpt``, checking every name and shape.

    Tensors already of ``dtype`` on CPU stay zero-copy views over the mapped files. The tensors of a module whose
    class sets ``keep_fp32 = True`` (the GLM-4.5/DeepSeek-V3 routers, as HF's ``_keep_in_fp32_modules_strict``) are
    loaded in fp32 whatever ``dtype`` is.
    Names in ``ignore`` are neither required nor loaded (e.g. a tied ``lm_head.weight``).

    Raises:
        CheckpointError: naming every missing/unexpected tensor, or the first mis-shaped one.
    """
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in ignore}
    have = set(ckpt.names()) - set(ignore)
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{ckpt.folder}: weights do not match config.json: {'; '.join(parts)}")
    fp32 = {f"{mn}.{n}" for mn, m in module.named_modules() if getattr(m, "keep_fp32", False)
            for n, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    state: dict[str, torch.Tensor] = {}
    for name, param in expected.items():
        info = ckpt.info(name)
        if tuple(info.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config.json implies {list(param.shape)}"
            )
        if param.is_floating_point() and not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {str(info.dtype).removeprefix('torch.')}, "
                                  "a float weight is needed; the file is corrupt or holds quantized data "
                                  "without a 'quantization' section in config.json")
        t = ckpt.get(name)
        want = torch.float32 if name in fp32 else dtype
        if t.dtype.is_floating_point and t.dtype != want:
            t = t.to(want)
        state[name] = t.to(device) if device.type != "cpu" else t
    result = module.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(ignore), result
