"""HF checkpoint folders: single or sharded safetensors, memory-mapped, every key checked.

We parse the safetensors header ourselves (8-byte little-endian length + JSON) so that a corrupt
file produces an error naming the file and tensor, and so tensors can be zero-copy views over a
private memory map: a bf16 checkpoint loaded as bf16 on CPU is never held twice in memory.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ember.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on header size


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
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(o) for o in info["data_offsets"])
            except KeyError as ke:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype or missing field {ke}") from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            if e - b != nbytes or b < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} claims {e - b} bytes but shape {list(shape)} "
                    f"{info['dtype']} needs {nbytes}"
                )
            if data_start + e > size:
                raise CheckpointError(
                    f"{self.path}: truncated; tensor {name!r} ends at byte {data_start + e} but the file has {size}"
                )
            self.tensors[name] = TensorInfo(name, self.path, dtype, shape, data_start + b, data_start + e)
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


class Checkpoint:
    """All tensors of an HF checkpoint folder (``model.safetensors`` or a sharded index)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.files: dict[Path, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: malformed index (expected a JSON object with 'weight_map')") from None
            for name, fname in weight_map.items():
                path = self.folder / fname
                if path not in self.files:
                    if not path.exists():
                        raise CheckpointError(f"{index}: shard {fname!r} (holding {name!r}) is missing from {self.folder}")
                    self.files[path] = SafetensorsFile(path)
                shard = self.files[path]
                if name not in shard.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {index.name} is not in this shard")
                self.where[name] = shard
        elif single.exists():
            self.files[single] = SafetensorsFile(single)
            self.where = {name: self.files[single] for name in self.files[single].tensors}
        else:
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if len(others) == 1:
                f = SafetensorsFile(self.folder / others[0])
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


def load_weights(module: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device,
                 ignore: tuple[str, ...] = ()) -> None:
    """Fill a meta-device ``module`` from ``ckpt``, checking every name and shape.

    Tensors already of ``dtype`` on CPU stay zero-copy views over the mapped files.
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
    state: dict[str, torch.Tensor] = {}
    for name, param in expected.items():
        info = ckpt.info(name)
        if tuple(info.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config.json implies {list(param.shape)}"
            )
        t = ckpt.get(name)
        if t.dtype.is_floating_point and t.dtype != dtype:
            t = t.to(dtype)
        state[name] = t.to(device) if device.type != "cpu" else t
    result = module.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(ignore), result
