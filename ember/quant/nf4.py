"""NF4Linear: bitsandbytes' 4-bit NormalFloat, blocks of 64, optional double quantization of the absmax.

The algorithm is bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64)``:

* the weight (out, in) is read row-major as one flat vector and cut into blocks of 64 values;
* ``absmax[b] = max |w|`` over block b; each value is normalised ``w / absmax[b]`` into [-1, 1] and
  replaced by the index of the nearest of the 16 :data:`NF4_CODE` values;
* two indices per byte, the first in the high nibble (``byte = q[2j] << 4 | q[2j+1]``);
* double quantization (``compress_statistics=True``): ``offset = mean(absmax)``; ``absmax - offset``
  is quantized blockwise (256 per block) to 8 bits with bitsandbytes' signed dynamic map
  (:data:`DYNAMIC_CODE`): ``absmax_scale[c] = max |absmax - offset|`` over block c, index = nearest
  code of ``(absmax - offset) / absmax_scale``. Dequantized: ``code[idx] * absmax_scale + offset``.

Dequantized weight: ``NF4_CODE[q] * absmax`` in fp32 (then the compute dtype), as bitsandbytes does.
Ties between two code values (a value exactly on a midpoint) round down here; bitsandbytes' CUDA
kernel breaks some ties upwards. With real weights this is a measure-zero difference.

Kernels: on CPU, Ember's native kernel (:mod:`ember.kernels`) reads the bitsandbytes bytes as they are:
bf16 activations look each nibble up in the bf16-rounded code book (``vpshufb`` on the high and low
bytes) for ``vdpbf16ps`` with the block's absmax applied per 64 values (double quantization undone in
the kernel); fp32 activations use the exact fp32 code book; more than two activation rows dequantize a
cache-sized tile for a PyTorch GEMM. Elsewhere (CUDA, no compiler) PyTorch has no NF4 matmul, so
forward is dequantize-then-matmul in row chunks: a byte -> (2 values) lookup table (one
``index_select`` per chunk), the absmax scaling, then ``torch.mv`` (one row, CPU) or a GEMM.
"""

from __future__ import annotations

import functools

import torch

from ember import kernels
from ember.errors import QuantizationError
from ember.quant.base import QUANT_CHUNK_ELEMENTS, QuantizedLinear, RowSource, lcm, row_chunks, tensor_rows

BLOCK_SIZE = 64
DOUBLE_QUANT_BLOCK_SIZE = 256

# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4")): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), 256 sorted fp32 values.

    For exponent i in 0..6 it holds the midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by
    ``10**(i - 6)``, with both signs, plus 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` for each value of fp32 ``x`` (ties -> lower index)."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, mids.to(x.device), right=False).to(torch.uint8)


def blockwise_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| per block of ``block`` values of a 1-D fp32 tensor (the last block may be short)."""
    n = flat.numel()
    full = n // block
    parts = [flat[: full * block].view(full, block).abs().amax(dim=1)] if full else []
    if n % block:
        parts.append(flat[full * block:].abs().amax().view(1))
    return torch.cat(parts)


def _normalise(flat: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    scale = absmax.repeat_interleave(block)[: flat.numel()]
    return torch.where(scale > 0, flat / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' nested quantization of fp32 block absmax values.

    Returns:
        ``(codes (n,) uint8, absmax_scale (ceil(n/256),) fp32, offset () fp32)``.
    """
    offset = absmax.mean()
    centred = absmax - offset
    scale = blockwise_absmax(centred, DOUBLE_QUANT_BLOCK_SIZE)
    codes = nearest_code(_normalise(centred, scale, DOUBLE_QUANT_BLOCK_SIZE), DYNAMIC_CODE)
    return codes, scale, offset


def quantize_nf4(rows: RowSource, out_features: int, in_features: int, device: torch.device | str,
                 name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize an (out, in) weight in blocks of 64 over its row-major flattening.

    Returns:
        ``codes`` (out, in/2) uint8 (high nibble first), ``absmax`` (ceil(out*in/64),) fp32.
    """
    if in_features % 2:
        raise QuantizationError(f"{name}: NF4 packs two values per byte; in_features {in_features} is odd")
    device = torch.device(device)
    numel = out_features * in_features
    codes = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-numel // BLOCK_SIZE), dtype=torch.float32, device=device)
    multiple = lcm(in_features, BLOCK_SIZE) // in_features  # chunks start on block boundaries
    for a, b in row_chunks(out_features, in_features, QUANT_CHUNK_ELEMENTS, multiple):
        flat = rows(a, b).to(device=device, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(flat).all():
            raise QuantizationError(f"{name}: weight has inf/NaN values in rows {a}..{b - 1}; cannot quantize it")
        am = blockwise_absmax(flat, BLOCK_SIZE)
        q = nearest_code(_normalise(flat, am, BLOCK_SIZE), NF4_CODE).view(b - a, in_features)
        codes[a:b] = (q[:, 0::2] << 4) | q[:, 1::2]
        first = a * in_features // BLOCK_SIZE
        absmax[first:first + am.numel()] = am
    return codes, absmax


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256,) int64: byte -> its two fp32 code values (high nibble's first), bit-cast for one index_select."""
    b = torch.arange(256)
    pairs = torch.stack((NF4_CODE[b >> 4], NF4_CODE[b & 0x0F]), dim=-1).contiguous()  # (256, 2) fp32
    return pairs.view(torch.int64).view(256).to(device)


class NF4Linear(QuantizedLinear):
    """Weight-only NF4 Linear, bitsandbytes-compatible (algorithm and kernel path in the module docstring).

    Buffers (also the checkpoint tensors): ``weight`` (out, in/2) uint8 — byte for byte bitsandbytes'
    flattened ``(out*in/2, 1)`` tensor; without double quant ``absmax`` (blocks,) fp32; with it
    ``absmax`` (blocks,) uint8, ``absmax_scale`` (ceil(blocks/256),) fp32 and ``absmax_offset`` () fp32
    (bitsandbytes' ``state2.absmax`` and ``offset``); optional ``bias`` (out,) in the compute dtype.
    ``dtype`` is kept as a one-element buffer-free attribute: the compute dtype of ``dequantize``.
    """

    mode, bits = "nf4", 4

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                 absmax_scale: torch.Tensor | None = None, absmax_offset: torch.Tensor | None = None) -> None:
        out_f = codes.shape[0]
        super().__init__(in_features, out_f, bias)
        blocks = -(-out_f * in_features // BLOCK_SIZE)
        if codes.shape != (out_f, in_features // 2) or absmax.shape != (blocks,):
            raise QuantizationError(f"NF4 tensors have shapes {list(codes.shape)}/{list(absmax.shape)}, "
                                    f"expected {[out_f, in_features // 2]}/{[blocks]}")
        self.double_quant = double_quant
        self.register_buffer("weight", codes.contiguous())
        if double_quant and absmax.dtype != torch.uint8:  # fp32 absmax given: compress it now
            absmax, absmax_scale, absmax_offset = double_quantize(absmax.float())
        self.register_buffer("absmax", absmax if double_quant else absmax.float())
        if double_quant:
            n2 = -(-blocks // DOUBLE_QUANT_BLOCK_SIZE)
            if absmax_scale is None or absmax_offset is None or absmax_scale.shape != (n2,):
                raise QuantizationError(f"NF4 double quantization needs absmax_scale ({n2},) and absmax_offset ()")
            self.register_buffer("absmax_scale", absmax_scale.float())
            self.register_buffer("absmax_offset", absmax_offset.float().reshape(()))
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=codes.device), persistent=False)
        self.state_names = ("weight", "absmax", "absmax_scale", "absmax_offset") if double_quant else ("weight", "absmax")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, double_quant: bool = True, dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize an ``nn.Linear``; bias and compute dtype ``dtype`` (default: the weight's dtype)."""
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        codes, absmax = quantize_nf4(tensor_rows(w), w.shape[0], w.shape[1], w.device)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        return cls(codes, absmax, w.shape[1], bias, dtype, double_quant)

    @classmethod
    def from_rows(cls, rows: RowSource, out_features: int, in_features: int, bias: torch.Tensor | None,
                  dtype: torch.dtype, device: torch.device | str, name: str = "weight",
                  double_quant: bool = True, **_) -> "NF4Linear":
        codes, absmax = quantize_nf4(rows, out_features, in_features, device, name)
        return cls(codes, absmax, in_features, bias, dtype, double_quant)

    @classmethod
    def from_canonical(cls, state, in_features, out_features, bias, dtype, double_quant: bool = True,
                       **_) -> "NF4Linear":
        return cls(state["weight"], state["absmax"], in_features, bias, dtype, double_quant,
                   state.get("absmax_scale"), state.get("absmax_offset"))

    def _params(self) -> dict:
        return {"double_quant": self.double_quant}

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.state_names}

    def scale_tensor(self) -> torch.Tensor:
        return self._dtype_probe

    # ------------------------------------------------------------------ dequantization
    def block_absmax(self, first: int = 0, end: int | None = None) -> torch.Tensor:
        """fp32 absmax of blocks ``first:end`` (double quantization undone)."""
        a = self.absmax[first:end]
        if not self.double_quant:
            return a
        idx = torch.arange(first, first + a.numel(), device=a.device) // DOUBLE_QUANT_BLOCK_SIZE
        return DYNAMIC_CODE.to(a.device)[a.long()] * self.absmax_scale[idx] + self.absmax_offset

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        k = self.in_features
        packed = self.weight[start:end].reshape(-1)
        vals = torch.index_select(_pair_table(packed.device), 0, packed.to(torch.int32)).view(torch.float32)
        first = start * k // BLOCK_SIZE
        n = (end - start) * k
        full = n // BLOCK_SIZE
        absmax = self.block_absmax(first, first + -(-n // BLOCK_SIZE))
        if start * k % BLOCK_SIZE == 0:
            vals[: full * BLOCK_SIZE].view(full, BLOCK_SIZE).mul_(absmax[:full, None])
            if n % BLOCK_SIZE:
                vals[full * BLOCK_SIZE:].mul_(absmax[full])
        else:  # a range starting inside a block (only when in_features is not a multiple of 64)
            pos = torch.arange(start * k, end * k, device=vals.device) // BLOCK_SIZE - first
            vals.mul_(absmax[pos])
        return vals.view(end - start, k)

    def _chunk_rows(self) -> int:
        multiple = lcm(self.in_features, BLOCK_SIZE) // self.in_features
        return max(multiple, super()._chunk_rows() // multiple * multiple)

    def _build_cpu_kernel(self) -> "kernels.LinearKernel | None":
        if self.in_features % BLOCK_SIZE:
            return None
        if self.double_quant:
            return kernels.q4_kernel(self.weight, NF4_CODE, BLOCK_SIZE, am_code=self.absmax, am_dyn=DYNAMIC_CODE,
                                     am_scale2=self.absmax_scale, am_offset=float(self._offset()), bias=self.bias)
        return kernels.q4_kernel(self.weight, NF4_CODE, BLOCK_SIZE, absmax=self.absmax, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel_forward(x, x2)
        if y is not None:
            return y
        if x.device.type == "cpu" and self.in_features % BLOCK_SIZE == 0:
            if self.double_quant:
                y = kernels.q4(x2, self.weight, NF4_CODE, BLOCK_SIZE, am_code=self.absmax, am_dyn=DYNAMIC_CODE,
                               am_scale2=self.absmax_scale, am_offset=float(self._offset()))
            else:
                y = kernels.q4(x2, self.weight, NF4_CODE, BLOCK_SIZE, absmax=self.absmax)
            if y is not None:
                return self._finish(y, shape)
        return self._finish(self._dequant_linear(x2), shape)

    def _offset(self) -> float:
        """The double-quantization offset as a Python float (read once: ``.item()`` per call would sync)."""
        cached = self.__dict__.get("_offset_cache")
        if cached is None or cached[0] is not self.absmax_offset:
            cached = (self.absmax_offset, float(self.absmax_offset))
            self.__dict__["_offset_cache"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={BLOCK_SIZE}, double_quant={self.double_quant}"
