"""Int8Linear: int8 weights, one scale per output channel (symmetric, no zero point).

    w[n, k] ~= q[n, k] * scale[n],   q in [-127, 127],   scale[n] = max_k |w[n, k]| / 127

Kernels (PyTorch 2.13, eager):

* CPU with Ember's native kernels (:mod:`ember.kernels`): int8 -> fp32 in registers, FMA against fp32
  activations, the row scale applied once per output; up to 4 activation rows fused, more dequantize
  a tile of rows for a PyTorch GEMM. Exact against the dequantized weight in fp32.
* CPU without them: ``torch._weight_int8pack_mm`` (ATen's AVX512/AVX2 int8-weight GEMV/GEMM: int8 -> fp32 in
  registers, fp32 accumulate, scale applied to the output). It streams the int8 weight at the
  speed ``torch.mv`` streams bf16, so decode reads half the bytes. Used for every batch size up to
  :data:`CPU_KERNEL_MAX_ROWS` rows; beyond that (long prefill) dequantize-then-matmul wins because
  oneDNN's bf16 GEMM (AMX where present) has far more compute than the int8 kernel.
* CUDA: dequantize (in chunks) then cuBLAS. PyTorch's CUDA ``_weight_int8pack_mm`` is a naive
  one-thread-per-output kernel with uncoalesced loads, slower than dequantize + cuBLAS in our
  reading of it (not measured: no GPU was available when this was written).
"""

from __future__ import annotations

import torch

from ember import kernels
from ember.errors import QuantizationError
from ember.quant.base import QUANT_CHUNK_ELEMENTS, QuantizedLinear, RowSource, row_chunks, tensor_rows

# Above this many activation rows, dequantize + oneDNN/MKL GEMM beats the int8 kernel on CPU (bench/quant.py).
CPU_KERNEL_MAX_ROWS = 32
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_int8(rows: RowSource, out_features: int, in_features: int, dtype: torch.dtype,
                  device: torch.device | str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization.

    Scales are rounded to ``dtype`` first and the codes computed against the rounded scales, so the
    stored pair is the best one ``dtype`` can hold.

    Args:
        rows: row source over the (out, in) float weight.
        dtype: dtype of the scales (the model's compute dtype).
        name: tensor name for error messages.
    Returns:
        ``q`` (out, in) int8 and ``scales`` (out,) in ``dtype``, on ``device``.
    """
    device = torch.device(device)
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
    scales = torch.empty(out_features, dtype=dtype, device=device)
    for a, b in row_chunks(out_features, in_features, QUANT_CHUNK_ELEMENTS):
        w = rows(a, b).to(device=device, dtype=torch.float32)  # (rows, in)
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{name}: weight has inf/NaN values in rows {a}..{b - 1}; cannot quantize it")
        s = (w.abs().amax(dim=1) / 127).to(dtype)
        sf = s.float()[:, None]
        qf = torch.where(sf > 0, w / sf.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        q[a:b] = qf.round_().clamp_(-127, 127).to(torch.int8)
        scales[a:b] = s
    return q, scales


class Int8Linear(QuantizedLinear):
    """Weight-only int8 Linear with per-output-channel scales (see module docstring for kernels).

    Buffers (also the checkpoint tensors): ``weight`` (out, in) int8, ``scales`` (out,) in the compute
    dtype, optional ``bias`` (out,).
    """

    mode, bits = "int8", 8
    state_names = ("weight", "scales")

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, dtype: torch.dtype | None = None) -> "Int8Linear":
        """Quantize an ``nn.Linear`` (any float dtype); scales and bias in ``dtype`` (default: the weight's)."""
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        q, s = quantize_int8(tensor_rows(w), w.shape[0], w.shape[1], dtype, w.device)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        return cls(q, s, bias)

    @classmethod
    def from_rows(cls, rows: RowSource, out_features: int, in_features: int, bias: torch.Tensor | None,
                  dtype: torch.dtype, device: torch.device | str, name: str = "weight", **_) -> "Int8Linear":
        q, s = quantize_int8(rows, out_features, in_features, dtype, device, name)
        return cls(q, s, bias)

    @classmethod
    def from_canonical(cls, state, in_features, out_features, bias, dtype, **_) -> "Int8Linear":
        return cls(state["weight"], state["scales"].to(dtype), bias)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scales": self.scales}

    def scale_tensor(self) -> torch.Tensor:
        return self.scales

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        return self.weight[start:end].float() * self.scales[start:end, None].float()

    def _scales_f32(self) -> torch.Tensor:
        """The scales in fp32 for the native kernel (made once; rebuilt when the module moves)."""
        cached = self.__dict__.get("_scales_f32_cache")
        if cached is None or cached.data_ptr() == 0 or cached.shape != self.scales.shape:
            cached = self.scales.float().contiguous()
            self.__dict__["_scales_f32_cache"] = cached
        return cached

    def _build_cpu_kernel(self) -> "kernels.LinearKernel | None":
        return kernels.int8_kernel(self.weight, self._scales_f32(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel_forward(x, x2)
        if y is not None:
            return y
        if x.device.type == "cpu" and self.weight.is_contiguous():
            y = kernels.int8(x2, self.weight, self._scales_f32())
            if y is not None:
                return self._finish(y, shape)
        if (x.device.type == "cpu" and x2.shape[0] <= CPU_KERNEL_MAX_ROWS and x.dtype in _KERNEL_DTYPES
                and not (torch.is_grad_enabled() and x.requires_grad)):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = self._dequant_linear(x2)
        return self._finish(y, shape)
