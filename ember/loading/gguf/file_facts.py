"""Facts every GGUF config reader needs from the tensor table: how many layers it holds, what dtype it is in."""

from __future__ import annotations

import re

from gguf import GGMLQuantizationType as QT

from ember.errors import GGUFError
from ember.loading.gguf.reader import GGUFFile

_BLOCK = re.compile(r"blk\.(\d+)\.")


def check_layers_present(gf: GGUFFile, n_layers: int, at_most: int | None = None) -> None:
    """``block_count`` must equal the layers the tensor table holds (checked before anything loops over it);
    with ``at_most``, the table may hold from ``n_layers`` up to that many (multi-token-prediction layers)."""
    found = [int(m.group(1)) for name in gf.tensors if (m := _BLOCK.match(name))]
    have = max(found) + 1 if found else 0
    if not (n_layers <= have <= (at_most or n_layers)):
        raise GGUFError(f"{gf.path}: metadata block_count = {n_layers} but the file holds tensors for {have} "
                        "layer(s); the file is corrupt")


def file_dtype_name(gf: GGUFFile) -> str:
    """The dtype "auto" resolves from: that of the float tensors, bf16 for a quantized file."""
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        if len(t.shape) >= 2:  # matrices decide; norms are F32 in every file
            name = QT(t.tensor_type).name
            counts[name] = counts.get(name, 0) + 1
    top = max(counts, key=counts.get) if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(top, "bfloat16")
