"""Reading a GGUF file: header, metadata and tensor table, every read bounds-checked.

A GGUF file is one header (key/value metadata, then a table of tensor names, shapes, ggml types and
offsets) followed by aligned tensor data. We parse it with the ``gguf`` package's memory-mapped
``GGUFReader``, wrapped so that a truncated or corrupt file raises :class:`GGUFError` naming the file
(and tensor) instead of an IndexError deep in numpy, or a hang on a bogus array length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ember.errors import GGUFError, UnsupportedGGUFTypeError, UnsupportedModelError
from ember.loading.gguf.dequant import DEQUANTIZERS, FLOAT_TYPES, dequantize, supported_types_text, unpermute_rope_rows

GGUF_MAGIC = b"GGUF"


class _CheckedReader(gguf.GGUFReader):
    """``GGUFReader`` that refuses to read past the end of the file and checks tensor types.

    The stock reader slices its memory map without bounds checks, so a truncated file yields short
    arrays (IndexError later, or a loop over a huge bogus count); here every read is checked.
    """

    def _get(self, offset, dtype, count=1, override_order=None):  # noqa: ANN001 - GGUFReader's signature
        # GGUFReader._get, bounds-checked, and slicing a plain ndarray view of the map: np.memmap's
        # Python-level __getitem__ made parsing a 150k-token vocabulary take seconds.
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self._flat = self.data.view(np.ndarray)
        count = int(count)
        dt = np.dtype(dtype)
        end = int(offset) + dt.itemsize * count
        if count < 0 or end > flat.shape[0]:
            raise GGUFError(f"truncated or corrupt header: a field at byte {int(offset)} runs to byte {end} "
                            f"but the file has {flat.shape[0]}")
        arr = flat[offset:end].view(dt)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs, fields):  # noqa: ANN001
        size = len(self.data)
        for f in fields:
            # parts: name length, name bytes, n_dims, dims, ggml type, data offset (GGUF tensor info layout)
            name = bytes(f.parts[1]).decode("utf-8", errors="replace")
            raw_type = int(f.parts[4][0])
            try:
                qtype = QT(raw_type)
            except ValueError:
                raise UnsupportedGGUFTypeError(
                    f"tensor {name!r} has ggml type id {raw_type}, which is not a known ggml type "
                    f"(corrupt file, or newer than the installed gguf package); {supported_types_text()}"
                ) from None
            dims = [int(d) for d in f.parts[3]]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims and dims[0] % block:
                raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block {block}")
            if int(f.parts[5][0]) % self.alignment:
                raise GGUFError(f"tensor {name!r}: data offset {int(f.parts[5][0])} is not aligned to {self.alignment} bytes")
            n_bytes = math.prod(dims) // block * type_size
            end = int(start_offs) + int(f.parts[5][0]) + n_bytes
            if end > size:
                raise GGUFError(f"truncated: tensor {name!r} ends at byte {end} but the file has {size}")
        super()._build_tensors(start_offs, fields)


@dataclass
class GGUFFile:
    """One parsed ``.gguf`` file: metadata by key, tensor infos by name; data stays memory-mapped.

    Raises:
        GGUFError: the file is missing, not GGUF, truncated, or corrupt (the message says which).
    """

    path: Path
    reader: Any = field(repr=False)
    tensors: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        p = Path(path)
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise GGUFError(f"{p}: cannot read ({e.strerror or e})") from None
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{p}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
        if size < 24:
            raise GGUFError(f"{p}: truncated GGUF file ({size} bytes)")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if int.from_bytes(head[4:8], "big") in (2, 3) else ""
            raise GGUFError(f"{p}: GGUF version {version} is not supported (only 2 and 3){hint}")
        try:
            reader = _CheckedReader(p, "c")  # copy-on-write map: tensors are writable views, never written back
        except GGUFError as e:
            raise type(e)(f"{p}: {e}") from None
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise GGUFError(f"{p}: corrupt GGUF header: {e}") from None
        gf = cls(p, reader, {t.name: t for t in reader.tensors})
        splits = gf.get("split.count")
        if isinstance(splits, int) and splits > 1:
            # A split file names no other file; its siblings are found by name. Ember opens only the one
            # path it is given, so a split model is refused rather than searched for.
            raise GGUFError(f"{p}: part of a model split into {splits} files; merge them first "
                            "(llama-gguf-split --merge FIRST.gguf OUT.gguf) and load the merged file")
        return gf

    # ---------------------------------------------------------------- metadata
    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` as a Python scalar, str or list; ``default`` if absent."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} is corrupt ({e})") from None

    def get_int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        v = self.get(key)
        if v is None:
            if required:
                raise GGUFError(f"{self.path}: metadata {key!r} is missing")
            return default
        if isinstance(v, list):  # per-layer arrays (e.g. head counts): fine when uniform
            if not v or any(x != v[0] for x in v):
                raise UnsupportedModelError(f"{self.path}: metadata {key!r} varies per layer ({v[:8]}...); not supported")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(f"{self.path}: metadata {key!r} must be an integer, got {v!r}")
        return v

    def get_float(self, key: str, default: float | None = None) -> float | None:
        v = self.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GGUFError(f"{self.path}: metadata {key!r} must be a finite number, got {v!r}")
        return float(v)

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata 'general.architecture' is missing")
        return arch

    # ---------------------------------------------------------------- tensors
    def raw(self, name: str, unpermute_heads: int | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored: a CPU view over the map (quantized types: uint8 (rows, row_bytes)); with
        ``unpermute_heads``, a copy with llama.cpp's RoPE row permutation undone."""
        if unpermute_heads:
            return unpermute_rope_rows(self._read(name), unpermute_heads)
        return torch.from_numpy(self.tensors[name].data)

    def _read(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s bytes read from the file (not through the map), in the map view's dtype and shape.

        For tensors copied anyway (q/k rows un-permuted): pages of the map, once touched, stay resident in the
        process beside the copy, so the copy is made from ``read`` into the page cache's bytes instead.
        """
        view = self.tensors[name].data
        out = np.empty(view.shape, dtype=view.dtype)
        with open(self.path, "rb") as f:
            f.seek(int(self.tensors[name].data_offset))
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise GGUFError(f"{self.path}: truncated: tensor {name!r} could not be read whole")
        return torch.from_numpy(out)

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu",
               unpermute_heads: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in PyTorch layout, decoded to ``dtype`` on ``device``.

        Args:
            unpermute_heads: undo llama.cpp's RoPE row permutation with this many heads (q/k of llama).
        Raises:
            UnsupportedGGUFTypeError: the tensor's ggml type is not one Ember decodes.
        """
        t = self.tensors[name]
        qtype = QT(t.tensor_type)
        if qtype not in DEQUANTIZERS and qtype not in FLOAT_TYPES:
            raise UnsupportedGGUFTypeError(f"{self.path}: tensor {name!r} is {qtype.name}; {supported_types_text()}")
        # zero-copy view over the map (quantized types are uint8 (rows, row_bytes)); a read copy when permuted
        x = self._read(name) if unpermute_heads else torch.from_numpy(t.data)
        if qtype == QT.BF16:
            x = x.view(torch.bfloat16)
        if unpermute_heads:
            x = unpermute_rope_rows(x, unpermute_heads)  # rows of blocks permute like rows of floats
        device = torch.device(device)
        if qtype in FLOAT_TYPES:
            return x.to(device=device, dtype=dtype)
        return dequantize(x.to(device), qtype, dtype)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in PyTorch order (outermost first), as HF stores the same tensor."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file named ``*.gguf`` or starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
