"""GGUF tensors kept as their ggml blocks: :class:`GGUFLinear` and :class:`GGUFEmbedding`.

A quantized tensor of a GGUF file is held exactly as stored (uint8 (rows, row_bytes), a view of the file's
map or one copy on the target device), so a Q4_K_M file takes its own size in memory. Products:

* CPU, few rows (decode): the native kernel for the block type (ember/kernels/gguf.cpp), through the same
  :class:`~ember.kernels.LinearKernel` seam as Ember's int8/int4 Linears, so ``project()`` and the fused decode
  blocks (ember/runtime/decode.py) take it too;
* CPU, many rows (prefill): a cache-sized tile of rows decoded by the kernels, multiplied by PyTorch;
* anywhere else (CUDA, ``EMBER_KERNELS=0``): :meth:`QuantizedLinear._dequant_linear`, rows decoded by the torch
  decoders of :mod:`ember.quant.gguf_blocks` a chunk at a time, so the float weight is never whole.

With fp32 activations every path equals ``x @ dequantize(W).T`` to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from ember import kernels
from ember.quant.base import QuantizedLinear
from ember.quant.gguf_blocks import DEQUANTIZERS, block_shape, dequantize

# The ggml types kept as blocks (every type with a decoder): the native kernels take the same set.
KEPT_TYPES = tuple(DEQUANTIZERS)


def _row_elements(raw: torch.Tensor, qtype: Any) -> int:
    block, size = block_shape(qtype)
    return raw.shape[-1] // size * block


class GGUFLinear(QuantizedLinear):
    """``nn.Linear`` whose weight is a GGUF tensor's ggml blocks, multiplied as stored.

    Args:
        raw: uint8 (out, row_bytes), rows of whole blocks of ``qtype`` (q/k rows already in HF order).
        qtype: the ``gguf.GGMLQuantizationType`` (one of :data:`KEPT_TYPES`).
        bias: (out,) in the compute dtype, or None.
        dtype: the compute dtype (activations and outputs).
    """

    mode = "gguf"
    state_names = ("qweight",)

    def __init__(self, raw: torch.Tensor, qtype: Any, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        qtype = QT(qtype)
        if qtype not in DEQUANTIZERS:
            raise ValueError(f"GGUFLinear takes {', '.join(t.name for t in KEPT_TYPES)}, not {qtype.name}")
        super().__init__(_row_elements(raw, qtype), raw.shape[0], bias)
        self.qtype = qtype
        self.bits = 8 * raw.shape[1] / self.in_features  # bits per weight, scales included
        self.register_buffer("qweight", raw)
        # empty: carries the compute dtype and device through .to() (QuantizedLinear.scale_tensor)
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=raw.device))

    def scale_tensor(self) -> torch.Tensor:
        return self.dtype_probe

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        return dequantize(self.qweight[start:end], self.qtype, torch.float32)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight}

    @classmethod
    def from_canonical(cls, state: dict[str, torch.Tensor], in_features: int, out_features: int,
                       bias: torch.Tensor | None, dtype: torch.dtype, qtype: Any = None) -> "GGUFLinear":
        return cls(state["qweight"], qtype, bias, dtype)

    def _params(self) -> dict:
        return {"qtype": self.qtype}

    def cpu_kernel(self) -> "kernels.LinearKernel | None":
        if self.qweight.device.type != "cpu":
            return None
        return kernels.cached_kernel(self, (self.qweight, self.bias), lambda: kernels.gguf_kernel(
            self.qweight, int(self.qtype), self.in_features, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel_forward(x, x2)
        if y is not None:
            return y
        y = kernels.gguf_tiled(x2, self.qweight, int(self.qtype)) if x.device.type == "cpu" else None
        if y is None:
            y = self._dequant_linear(x2)
        return self._finish(y, x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, type={self.qtype.name}"


class GGUFEmbedding(nn.Module):
    """Token embedding whose table is a GGUF tensor's ggml blocks: ``forward`` decodes only the rows it looks up.

    Args:
        raw: uint8 (vocab, row_bytes) blocks of ``qtype``.
        dtype: the dtype of the returned embeddings.
    """

    def __init__(self, raw: torch.Tensor, qtype: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.qtype = QT(qtype)
        self.num_embeddings, self.embedding_dim = raw.shape[0], _row_elements(raw, self.qtype)
        self.register_buffer("qweight", raw)
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=raw.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids.reshape(-1).to(self.qweight.device)]  # (n, row_bytes): only the rows used
        out = torch.empty(rows.shape[0], self.embedding_dim, dtype=self.dtype_probe.dtype, device=rows.device)
        if not kernels.gguf_dequant(rows, int(self.qtype), self.embedding_dim, out):
            out = dequantize(rows, self.qtype, out.dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float table (vocab, dim)."""
        return dequantize(self.qweight, self.qtype, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.qtype.name}"
