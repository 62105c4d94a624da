"""ggml block types in a GGUF file: which ones Ember takes, and llama.cpp's q/k row order undone.

The block decoders live with the modules that hold the blocks (:mod:`ember.quant.gguf_blocks`, bit-exact with
``gguf.quants.dequantize``); every type there is kept quantized at load (:mod:`ember.quant.gguf_linear`) and
read in place. Any other quantized type is refused, naming the tensor, before a byte is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from ember.errors import UnsupportedGGUFTypeError
from ember.quant.gguf_blocks import DEQUANTIZERS, FLOAT_TYPES, dequantize

__all__ = ["DEQUANTIZERS", "FLOAT_TYPES", "check_tensor_types", "dequantize", "supported_types_text",
           "unpermute_rope_rows"]


def supported_types_text() -> str:
    names = [t.name for t in (*FLOAT_TYPES, *DEQUANTIZERS)]
    return f"Ember reads {', '.join(names)} (re-quantize the file to one of these, e.g. with llama-quantize)"


def check_tensor_types(gf: Any, names: Any = None) -> None:
    """Refuse the file if any tensor (of ``names``, default all) is in a ggml type Ember does not take.

    Raises:
        UnsupportedGGUFTypeError: naming the file, the tensor and its type, and the types Ember reads.
    """
    for name in (names if names is not None else gf.tensors):
        qtype = QT(gf.tensors[name].tensor_type)
        if qtype not in DEQUANTIZERS and qtype not in FLOAT_TYPES:
            raise UnsupportedGGUFTypeError(f"{gf.path}: tensor {name!r} is {qtype.name}; {supported_types_text()}")


def unpermute_rope_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows stored (h, hd/2, 2) go back to HF's (h, 2, hd/2).

    Works on float rows and on rows of quantized blocks alike (blocks never cross rows).
    """
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
