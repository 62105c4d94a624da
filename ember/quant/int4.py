"""Int4Linear: 4-bit weights in groups of 32/64/128 along ``in``, asymmetric (a scale and a zero per group).

    w[n, k] ~= (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g],   q in 0..15

``zero`` is the weight value at the middle code 8 (``zero = min + 8 * scale``,
``scale = (max - min) / 15``), the convention of PyTorch's int4 kernels (tinygemm, gpt-fast,
torchao), so the stored scales and zeros feed them unchanged. Asymmetric because one extra
16-bit number per group buys back the code a symmetric grid wastes on a lopsided group.

Checkpoint tensors (portable, any device/ISA): ``weight`` (out, in/2) uint8 with element 2j in the
high nibble and 2j+1 in the low nibble of byte j (the bitsandbytes order), ``scales`` and ``zeros``
(out, in/g) in the compute dtype. At build time the codes are re-packed for the kernel:

* CPU with Ember's native kernels, group 32, bf16 scales (``--quant int4 --group-size 32``): 20-byte blocks
  like GGUF's Q4_1 (bf16 ``scale``, bf16 ``zero``, 16 bytes of nibbles, element i < 16 in the low nibble of
  byte i, i >= 16 in the high nibble of byte i - 16), the same bytes as the codes + scales + zeros they are
  made from, exactly. They run on the GGUF block kernels (ember/kernels/gguf.cpp, type ``Q4_G32``): int8
  activations per 32 values as llama.cpp's Q4_0, and ``w = scale * (q - 8) + zero`` on the exact paths.
  Layout ``blocks``; fp32 scales keep the ``native`` layout below.
* CPU with Ember's native kernels (:mod:`ember.kernels`, the default wherever a C++ compiler is
  found): the canonical codes as stored, ``scales``/``zeros`` (out, in/g); bf16 activations decode
  nibbles straight into bf16 (``0x4300 | q`` is exactly ``128 + q``) for ``vdpbf16ps``, fp32 ones
  look the 16 values up in fp32 (exact against the dequantized weight). One or two activation rows
  run fused; more dequantize a cache-sized tile of rows for a PyTorch GEMM. Layout ``native``.
* CPU without them, bf16 activations: ``torch._weight_int4pack_mm_for_cpu`` (ATen AVX512/AVX2 "tinygemm" CPU
  kernel: dequantizes 64 output columns at a time in registers with a 16-entry permute table, fp32
  accumulate). Its weight layout, made by ``_convert_weight_to_int4pack_for_cpu``, interleaves
  rows in blocks of 64 (AVX512) or 32 (AVX2); we pack and unpack it with tensor reshapes, checked
  once per process against the ATen op (a mismatch, or another ISA, selects the plain layout).
  Used up to :data:`CPU_KERNEL_MAX_ROWS` activation rows; longer prefills dequantize and matmul.
* CUDA (sm80+, bf16): ``torch._weight_int4pack_mm`` (tinygemm tensor-core kernel) on the layout
  of ``torch._convert_weight_to_int4pack`` (inner k-tiles 8/4/2). Unpacking that layout (for
  saving or ``.cpu()``) is done in torch and verified against the ATen packer on first use.
* Anything else (fp32/fp16 activations, other devices, shapes a kernel rejects): dequantize in
  row chunks, then matmul.
"""

from __future__ import annotations

import functools

import torch

from ember import kernels
from ember.errors import QuantizationError
from ember.quant.base import QUANT_CHUNK_ELEMENTS, QuantizedLinear, RowSource, row_chunks, tensor_rows

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
CPU_KERNEL_MAX_ROWS = 32
PLAIN, CPU, CUDA, NATIVE, BLOCKS = "plain", "cpu", "cuda", "native", "blocks"
Q4_G32 = 1040  # the block type id of the BLOCKS layout in ember/kernels/gguf.cpp (not a ggml type)
_BLOCK_BYTES = 20  # bf16 scale, bf16 zero, 16 bytes of nibbles per 32 weights
_CODE_VALUES = torch.arange(16, dtype=torch.float32) - 8  # value of code q before scaling


# ============================================================================== quantization
def quantize_int4(rows: RowSource, out_features: int, in_features: int, group_size: int, dtype: torch.dtype,
                  device: torch.device | str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit quantization (see module docstring for the formula).

    Scales and zeros are rounded to ``dtype`` first; codes are computed against the rounded values.

    Returns:
        ``codes`` (out, in/2) uint8 (canonical nibble order), ``scales`` and ``zeros`` (out, in/g) in ``dtype``.
    Raises:
        QuantizationError: unsupported group size, or ``in_features`` not a multiple of it (names ``name``).
    """
    check_group_size(group_size, in_features, name)
    device = torch.device(device)
    groups = in_features // group_size
    codes = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(out_features, groups, dtype=dtype, device=device)
    zeros = torch.empty(out_features, groups, dtype=dtype, device=device)
    for a, b in row_chunks(out_features, in_features, QUANT_CHUNK_ELEMENTS):
        w = rows(a, b).to(device=device, dtype=torch.float32).view(b - a, groups, group_size)
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{name}: weight has inf/NaN values in rows {a}..{b - 1}; cannot quantize it")
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (rows, G)
        s = ((hi - lo) / 15).to(dtype)
        z = (lo + 8 * s.float()).to(dtype)
        sf, zf = s.float()[..., None], z.float()[..., None]
        q = torch.where(sf > 0, (w - zf) / sf.clamp_min(torch.finfo(torch.float32).tiny) + 8, 8.0)
        q = q.round_().clamp_(0, 15).to(torch.uint8).view(b - a, in_features)
        codes[a:b] = join_nibbles(q)
        scales[a:b], zeros[a:b] = s, z
    return codes, scales, zeros


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use --group-size {fits[-1]}" if fits else "leave this layer unquantized"
        raise QuantizationError(f"{name}: in_features {in_features} is not a multiple of the int4 group size "
                                f"{group_size}; {hint}")


def split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k/2) uint8 -> (n, k) uint8 codes: byte j holds element 2j (high nibble) and 2j+1 (low)."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).view(packed.shape[0], -1)


def join_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 codes in 0..15 -> (n, k/2) uint8, element 2j in the high nibble of byte j."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


# ============================================================================== Q4_G32 blocks
def to_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Canonical codes (N, K/2) uint8 + bf16 ``scales``/``zeros`` (N, K/32) -> Q4_G32 blocks (N, K/32 * 20) uint8.

    Block g of a row: bytes 0-1 ``scales[g]``, 2-3 ``zeros[g]`` (little-endian bf16), 4-19 nibbles with element
    i < 16 of the group in the low nibble of byte 4 + i and element i + 16 in its high nibble (Q4_0's order)."""
    n, groups = scales.shape
    q = split_nibbles(codes).view(n, groups, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)  # (N, G, 16)
    parts = (scales.contiguous().view(torch.uint8).view(n, groups, 2), zeros.contiguous().view(torch.uint8).view(n, groups, 2), qs)
    return torch.cat(parts, dim=-1).view(n, groups * _BLOCK_BYTES)


def from_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_blocks`: (N, K/32 * 20) uint8 -> canonical codes (N, K/2), scales, zeros (N, K/32) bf16."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, _BLOCK_BYTES)
    s = b[..., 0:2].contiguous().view(torch.bfloat16).view(n, -1)
    z = b[..., 2:4].contiguous().view(torch.bfloat16).view(n, -1)
    qs = b[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).view(n, -1)  # (N, K) in element order
    return join_nibbles(q), s, z


# ============================================================================== CPU kernel layout
# ATen's int4 CPU packing (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
# rows in blocks of BLOCK_N (64 with AVX512, 32 with AVX2), block i at byte i*K*BLOCK_N/2, laid out
# (K, BLOCK_N/2): with AVX512 byte [k, j*16+d] = row(32+16j+d) << 4 | row(16j+d); with AVX2
# byte [k, d] = row(16+d) << 4 | row(d). A last partial block of t rows is (K, t/2) with
# byte [k, m] = row(2m+1) << 4 | row(2m).
def pack_cpu(codes: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) uint8 codes -> (N, K/2) uint8 in the CPU kernel layout for BLOCK_N = ``block``."""
    n, k = codes.shape
    full = n // block
    lanes = block // 32  # byte lanes per k: 2 (AVX512) or 1 (AVX2)
    parts = []
    if full:
        c = codes[: full * block].view(full, 2 * lanes, 16, k)
        byte = (c[:, lanes:] << 4) | c[:, :lanes]  # (full, lanes, 16, K)
        parts.append(byte.permute(0, 3, 1, 2).reshape(-1))
    tail = n - full * block
    if tail:
        c = codes[full * block:].view(tail // 2, 2, k)
        parts.append(((c[:, 1] << 4) | c[:, 0]).t().reshape(-1))  # (K, tail/2)
    return torch.cat(parts).view(n, k // 2)


def unpack_cpu(packed: torch.Tensor, n: int, k: int, block: int, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_cpu` for rows ``start:end`` (any range) -> (end-start, K) uint8 codes."""
    end = n if end is None else end
    flat = packed.reshape(-1)
    full = n // block
    lanes = block // 32
    pieces = []
    b0, b1 = start // block, min(full, -(-end // block))
    if b0 < b1:
        byte = flat[b0 * block * k // 2: b1 * block * k // 2].view(b1 - b0, k, lanes, 16).permute(0, 2, 3, 1)
        c = torch.cat((byte & 0x0F, byte >> 4), dim=1).reshape((b1 - b0) * block, k)  # (rows, K)
        pieces.append(c[max(0, start - b0 * block): end - b0 * block])
    if end > full * block:
        tail = n - full * block
        byte = flat[full * block * k // 2:].view(k, tail // 2).t()  # (tail/2, K)
        c = torch.stack((byte & 0x0F, byte >> 4), dim=1).reshape(tail, k)
        pieces.append(c[max(0, start - full * block): end - full * block])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@functools.lru_cache(maxsize=None)
def cpu_kernel_block() -> int | None:
    """BLOCK_N of this CPU's int4 kernel layout (64 AVX512, 32 AVX2), verified against ATen; None = no kernel."""
    block = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if block is None or op is None:
        return None
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (block + 16, 64), generator=g, dtype=torch.int32)  # a full block + a tail
    try:
        ref = op(codes, 1)
    except RuntimeError:
        return None
    mine = pack_cpu(codes.to(torch.uint8), block)
    return block if ref.dtype == torch.uint8 and torch.equal(ref.view(-1), mine.view(-1)) else None


# ============================================================================== CUDA kernel layout
# ATen's tinygemm B layout (aten/src/ATen/native/cuda/int4mm.cu, matrix_to_m16n8k16_Bint4_layout):
# int32 [N/8][K/(ikt*16)][32 lanes][ikt/2]; lane t = 4r + c holds row 8*nTile + r; its int32 packs the
# 4 bytes at columns kO*ikt*8 + (2p + a)*8 + 4b + c (i = 2a + b) as high nibbles in bits 4i and low
# nibbles in bits 16 + 4i.
def pack_cuda(canonical: torch.Tensor, ikt: int) -> torch.Tensor:
    """(N, K/2) canonical uint8 -> int32 (N/8, K/(ikt*16), 32, ikt/2) tinygemm layout (torch reference)."""
    n, half = canonical.shape
    ko = half // (ikt * 8)
    v = canonical.view(n // 8, 8, ko, ikt // 2, 2, 2, 4).permute(0, 2, 1, 6, 3, 4, 5)  # (nT, kO, r, c, p, a, b)
    v = v.reshape(n // 8, ko, 32, ikt // 2, 4).to(torch.int64)
    shifts = 4 * torch.arange(4, device=v.device)
    word = (((v & 0x0F) << (16 + shifts)) | ((v >> 4) << shifts)).sum(dim=-1)  # disjoint bits: sum == or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_cuda(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_cuda` -> (N, K/2) canonical uint8."""
    ikt = packed.shape[-1] * 2
    ko = packed.shape[1]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=w.device)
    nib = (w[..., None] >> shifts) & 0x0F  # (nT, kO, 32, ikt/2, 8)
    v = (nib[..., :4] << 4) | nib[..., 4:]  # (nT, kO, 32, ikt/2, 4) bytes, i = 2a + b
    v = v.view(n // 8, ko, 8, 4, ikt // 2, 2, 2).permute(0, 2, 1, 4, 5, 6, 3)  # (nT, r, kO, p, a, b, c)
    return v.reshape(n, k // 2).to(torch.uint8)


def _cuda_ikt(k: int) -> int | None:
    for ikt in (8, 4, 2):
        if k % (ikt * 16) == 0:
            return ikt
    return None


@functools.lru_cache(maxsize=None)
def cuda_kernel_ok(device_index: int) -> tuple[bool, bool]:
    """(tinygemm usable on this GPU, our torch unpacking matches its layout)."""
    if torch.version.hip is not None or torch.cuda.get_device_capability(device_index) < (8, 0):
        return False, False
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    canon = torch.randint(0, 256, (16, 128), generator=g, device=dev, dtype=torch.int32).to(torch.uint8)
    try:
        ref = torch._convert_weight_to_int4pack(canon, 8)
    except RuntimeError:
        return False, False
    return True, bool(torch.equal(ref, pack_cuda(canon, 8)))


# ============================================================================== module
class Int4Linear(QuantizedLinear):
    """Weight-only group-wise int4 Linear (formula, kernels and layouts in the module docstring).

    Runtime buffers: ``weight`` (kernel layout: uint8 (out, in/2) for plain/CPU, int32 4-D for CUDA)
    and ``scales_and_zeros`` (in/g, out, 2) in the compute dtype (the kernels' format), plus ``bias``.
    ``state_dict`` holds the portable ``weight`` (out, in/2) uint8, ``scales``, ``zeros`` (out, in/g).

    Attributes:
        group_size: 32, 64 or 128.  layout: "blocks", "native", "plain", "cpu" or "cuda" (which kernel forward uses).
    """

    mode, bits = "int4", 4
    state_names = ("weight", "scales", "zeros")

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, layout: str = "auto") -> None:
        out_f, half = codes.shape
        in_f = half * 2
        super().__init__(in_f, out_f, bias)
        check_group_size(group_size, in_f)
        if scales.shape != (out_f, in_f // group_size) or zeros.shape != scales.shape:
            raise QuantizationError(f"int4 scales/zeros have shapes {list(scales.shape)}/{list(zeros.shape)}, "
                                    f"expected {[out_f, in_f // group_size]}")
        self.group_size = group_size
        self.layout = self._choose_layout(codes.device, scales.dtype) if layout == "auto" else layout
        if self.layout == BLOCKS:  # codes, scales and zeros interleaved per group of 32, the same bytes
            self.register_buffer("weight", to_blocks(codes, scales, zeros))
            # empty: carries the compute dtype and device through .to() (QuantizedLinear.scale_tensor)
            self.register_buffer("dtype_probe", torch.empty(0, dtype=scales.dtype, device=codes.device))
            return
        if self.layout == NATIVE:  # codes as stored; scales and zeros (out, in/g) as the kernel reads them
            self.register_buffer("weight", codes.contiguous())
            self.register_buffer("scales", scales.contiguous())
            self.register_buffer("zeros", zeros.contiguous())
            return
        if self.layout == CPU:
            self.block = cpu_kernel_block()
            weight = pack_cpu(split_nibbles(codes), self.block)
        elif self.layout == CUDA:
            weight = torch._convert_weight_to_int4pack(codes.contiguous(), _cuda_ikt(in_f))
        else:
            weight = codes.contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", torch.stack((scales.t(), zeros.t()), dim=-1).contiguous())

    def _choose_layout(self, device: torch.device, dtype: torch.dtype) -> str:
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and kernels.load() is not None:
            # bf16 scales and zeros fit the blocks exactly; fp32 ones keep the native layout
            return BLOCKS if self.group_size == 32 and dtype == torch.bfloat16 and kernels.gguf_supports(Q4_G32) \
                else NATIVE
        if dtype != torch.bfloat16:
            return PLAIN  # both kernels take bf16 activations only (fp32 on CPU is a scalar reference loop)
        n, k = self.out_features, self.in_features
        if device.type == "cpu" and cpu_kernel_block() and n % 16 == 0:
            return CPU
        if (device.type == "cuda" and n % 8 == 0 and _cuda_ikt(k)
                and cuda_kernel_ok(device.index if device.index is not None else torch.cuda.current_device())[0]):
            return CUDA
        return PLAIN

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int = DEFAULT_GROUP_SIZE,
                    dtype: torch.dtype | None = None, layout: str = "auto") -> "Int4Linear":
        """Quantize an ``nn.Linear``; scales, zeros and bias in ``dtype`` (default: the weight's dtype)."""
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        codes, s, z = quantize_int4(tensor_rows(w), w.shape[0], w.shape[1], group_size, dtype, w.device)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        return cls(codes, s, z, group_size, bias, layout)

    @classmethod
    def from_rows(cls, rows: RowSource, out_features: int, in_features: int, bias: torch.Tensor | None,
                  dtype: torch.dtype, device: torch.device | str, name: str = "weight",
                  group_size: int = DEFAULT_GROUP_SIZE, layout: str = "auto", **_) -> "Int4Linear":
        codes, s, z = quantize_int4(rows, out_features, in_features, group_size, dtype, device, name)
        return cls(codes, s, z, group_size, bias, layout)

    @classmethod
    def from_canonical(cls, state, in_features, out_features, bias, dtype, group_size: int = DEFAULT_GROUP_SIZE,
                       layout: str = "auto", **_) -> "Int4Linear":
        """From checkpoint tensors: ``weight`` (out, in/2) uint8, ``scales``/``zeros`` (out, in/g).

        Also the way to wrap codes quantized elsewhere exactly (e.g. GGUF Q4_0: blocks of 32,
        ``w = d * (q - 8)`` -> ``scales = d``, ``zeros = 0``, nibbles re-ordered with :func:`join_nibbles`).
        """
        return cls(state["weight"], state["scales"].to(dtype), state["zeros"].to(dtype), group_size, bias, layout)

    def _params(self) -> dict:
        return {"group_size": self.group_size}

    # ------------------------------------------------------------------ views of the weight
    def scale_tensor(self) -> torch.Tensor:
        if self.layout == BLOCKS:
            return self.dtype_probe
        return self.scales if self.layout == NATIVE else self.scales_and_zeros

    def codes_rows(self, start: int, end: int) -> torch.Tensor:
        """Codes of rows ``start:end``, (end-start, in) uint8 in 0..15."""
        if self.layout == CPU:
            return unpack_cpu(self.weight, self.out_features, self.in_features, self.block, start, end)
        return split_nibbles(self.canonical_codes(start, end))

    def canonical_codes(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.out_features if end is None else end
        if self.layout == CPU:
            return join_nibbles(self.codes_rows(start, end))
        if self.layout == BLOCKS:
            return from_blocks(self.weight[start:end])[0]
        if self.layout == CUDA:
            if not cuda_kernel_ok(self.weight.device.index)[1]:
                raise QuantizationError("this PyTorch's CUDA int4 layout differs from the one Ember unpacks; "
                                        "quantize on CPU (ember quantize) to save or dequantize int4 weights")
            a, b = start // 8, -(-end // 8)
            rows = unpack_cuda(self.weight[a:b], (b - a) * 8, self.in_features)
            return rows[start - a * 8: end - a * 8]
        return self.weight[start:end]

    def canonical_state(self) -> dict[str, torch.Tensor]:
        if self.layout == NATIVE:
            return {"weight": self.weight, "scales": self.scales, "zeros": self.zeros}
        if self.layout == BLOCKS:
            return dict(zip(self.state_names, from_blocks(self.weight)))
        sz = self.scales_and_zeros
        return {"weight": self.canonical_codes(), "scales": sz[..., 0].t().contiguous(),
                "zeros": sz[..., 1].t().contiguous()}

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        g = self.group_size
        if self.layout == BLOCKS:
            codes, s, z = from_blocks(self.weight[start:end])
            q = split_nibbles(codes).view(end - start, -1, g).float()
            return ((q - 8) * s.float()[..., None] + z.float()[..., None]).view(end - start, self.in_features)
        q = self.codes_rows(start, end).view(end - start, -1, g).float()  # (rows, G, g)
        if self.layout == NATIVE:
            s, z = self.scales[start:end].float()[..., None], self.zeros[start:end].float()[..., None]  # (rows, G, 1)
        else:
            sz = self.scales_and_zeros[:, start:end].float()  # (G, rows, 2)
            s, z = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (rows, G, 1)
        return ((q - 8) * s + z).view(end - start, self.in_features)

    def _chunk_rows(self) -> int:
        return max(64, super()._chunk_rows() // 64 * 64)  # whole CPU-layout blocks (and CUDA 8-row tiles)

    # ------------------------------------------------------------------ compute
    def _build_cpu_kernel(self) -> "kernels.LinearKernel | None":
        if self.layout == BLOCKS:
            return kernels.gguf_kernel(self.weight, Q4_G32, self.in_features, self.bias)
        if self.layout != NATIVE:
            return None
        return kernels.q4_kernel(self.weight, _CODE_VALUES, self.group_size, scales=self.scales, zeros=self.zeros,
                                 bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel_forward(x, x2)
        if y is not None:
            return y
        if self.layout == BLOCKS:  # many rows (prefill): tiles of rows decoded by the block kernels, then a GEMM
            y = kernels.gguf_tiled(x2, self.weight, Q4_G32) if x.device.type == "cpu" else None
            return self._finish(y if y is not None else self._dequant_linear(x2), shape)
        if self.layout == NATIVE:
            y = kernels.q4(x2, self.weight, _CODE_VALUES, self.group_size, scales=self.scales, zeros=self.zeros)
            return self._finish(y if y is not None else self._dequant_linear(x2), shape)
        fast = x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and x.requires_grad)
        if fast and self.layout == CPU and x2.shape[0] <= CPU_KERNEL_MAX_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        elif fast and self.layout == CUDA:
            y = torch._weight_int4pack_mm(x2.contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = self._dequant_linear(x2)
        return self._finish(y, shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"
