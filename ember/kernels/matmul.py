"""Matrix products on the CPU: dense (bf16/fp32), int8, 4-bit (int4, NF4) and MXFP4 weights times a few activation rows.

Decode is memory-bandwidth bound: every weight is read once per step, so these kernels stream the weights
and decode int8/int4/NF4 in registers on the way. Every entry point takes ``x2`` (M, I) and returns
(M, O) in ``x2``'s dtype, or None when the kernels are unavailable or the shape/dtype is not one they
handle, so callers write ``y = dense(x2, w); if y is None: y = F.linear(x2, w)``. Above ``MAX_ROWS`` rows
(prefill) quantized weights are dequantized a cache-sized tile at a time for a PyTorch GEMM.

:class:`LinearKernel` binds one weight to its kernel once (a C struct of pointers and sizes), so a decode
call is one short ctypes call; :func:`linear_many` runs several that read the same activations in one.
"""

from __future__ import annotations

import ctypes
import platform
import weakref

import torch
import torch.nn.functional as F

from ember.kernels import loader as _loader
from ember.kernels.loader import _FLOAT, _F, _P, AMX_BF16, AMX_MIN_ROWS, INT8_ACTIVATIONS, MAX_ROWS, TILE_BYTES

def _usable(x2: torch.Tensor, *tensors: torch.Tensor) -> bool:
    if x2.device.type != "cpu" or x2.dim() != 2:
        return False
    if torch.is_grad_enabled() and (x2.requires_grad or any(t.requires_grad for t in tensors)):
        return False  # autograd needs PyTorch ops
    return True


def _is_bf16(t: torch.Tensor) -> int:
    return int(t.dtype is torch.bfloat16)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dense(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x2 @ weight.T`` for bf16 x bf16 or fp32 x fp32, up to ``MAX_ROWS["dense"]`` rows; None when not handled.

    bf16 with at least :data:`AMX_MIN_ROWS` rows runs on AMX tiles where the CPU and OS have them."""
    dt = x2.dtype
    if (dt is not weight.dtype or x2.shape[0] > MAX_ROWS["dense"] or dt not in _FLOAT
            or x2.device.type != "cpu" or not weight.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad):
        return None
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return None
    x2 = x2.contiguous()
    M, I = x2.shape
    O = weight.shape[0]
    y = torch.empty(M, O, dtype=dt)
    bf = dt is torch.bfloat16
    if bf and AMX_BF16 and M >= AMX_MIN_ROWS and I % 32 == 0:
        if lib.ember_dense_bf16_amx(weight.data_ptr(), x2.data_ptr(), y.data_ptr(), M, O, I, 1, torch.get_num_threads()):
            return y
    (lib.ember_dense_bf16 if bf else lib.ember_dense_f32)(weight.data_ptr(), x2.data_ptr(), y.data_ptr(), M, O, I,
                                                            bf, torch.get_num_threads())
    return y


class _LinearDesc(ctypes.Structure):
    """Mirror of ``LinearDesc`` in cpu_api.h (field for field)."""

    _fields_ = [(n, ctypes.c_int64) for n in ("kind", "O", "I", "w_bf16", "amx_min_rows", "act_q8")] + [
        ("W", _P), ("bias", _P), ("bias_bf16", ctypes.c_int64), ("scales", _P), ("mode", ctypes.c_int64),
        ("group", ctypes.c_int64), ("q_scales", _P), ("q_zeros", _P), ("stats_bf16", ctypes.c_int64),
        ("absmax", _P), ("am_code", _P), ("am_dyn", _P), ("am_scale2", _P), ("table", _P), ("am_offset", _F)]


class LinearKernel:
    """One CPU weight bound to its streaming kernel for few-row products (decode): ``k(x2)`` -> ``x2 @ W.T``
    (+ bias) in x2's dtype, or None where it does not apply (too many rows, another dtype).

    Built once per module (:func:`dense_kernel`, :func:`int8_kernel`, :func:`q4_kernel`) with every pointer,
    size and flag in a C struct, so a call costs a tensor allocation and one 6-argument ctypes call instead
    of converting every argument on every call (a decode step makes one or more calls per weight).
    ``sources`` are the tensors it reads (kept alive here); :func:`cached_kernel` rebuilds it when their
    storage changes.
    """

    __slots__ = ("desc", "addr", "out_features", "max_rows", "dtypes", "sources", "_fn")

    def __init__(self, lib, sources: tuple, max_rows: int, dtypes: tuple, **fields) -> None:
        self.desc = _LinearDesc(**fields)
        self.addr = ctypes.addressof(self.desc)
        self.out_features = fields["O"]
        self.max_rows, self.dtypes, self.sources = max_rows, dtypes, sources
        self._fn = lib.ember_linear

    def accepts(self, x2: torch.Tensor) -> bool:
        return x2.shape[0] <= self.max_rows and x2.dtype in self.dtypes

    def __call__(self, x2: torch.Tensor) -> torch.Tensor | None:
        if x2.shape[0] > self.max_rows or x2.dtype not in self.dtypes:
            return None
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype)
        if not self._fn(self.addr, x2.data_ptr(), y.data_ptr(), x2.shape[0], x2.dtype is torch.bfloat16,
                        torch.get_num_threads()):
            return None
        return y


def cached_kernel(owner, sources: tuple, build) -> LinearKernel | None:
    """``owner``'s :class:`LinearKernel` from ``build()``, made once and remade when the storage of any of
    ``sources`` (the module's own tensors; None where absent) changes: a ``.to()``, a re-load, a swap."""
    if _loader._lib is None and _loader.load() is None:
        return None
    return cached(owner, "linear", tuple(0 if t is None else t.data_ptr() for t in sources), build)


def cached(owner, what: str, key, build):
    """``build()``, kept for ``owner`` under ``what`` until ``key`` changes."""
    slot = _kernel_of.get(owner)
    if slot is None:
        slot = _kernel_of[owner] = {}
    hit = slot.get(what)
    if hit is None or hit[0] != key:
        hit = slot[what] = (key, build())
    return hit[1]


# Beside the modules, not in them: a module holding ctypes pointers could not be deep-copied or pickled.
_kernel_of: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _bias_fields(bias: torch.Tensor | None) -> dict | None:
    if bias is None:
        return {"bias": None, "bias_bf16": 0}
    if bias.dtype not in _FLOAT or bias.device.type != "cpu" or not bias.is_contiguous() or bias.dim() != 1:
        return None
    return {"bias": bias.data_ptr(), "bias_bf16": int(bias.dtype is torch.bfloat16)}


def dense_kernel(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearKernel | None:
    """A :class:`LinearKernel` for a bf16 or fp32 weight (O, I) (activations of the same dtype); None where the
    kernels are off or the weight does not fit them."""
    if (weight.dtype not in _FLOAT or weight.device.type != "cpu" or weight.dim() != 2
            or not weight.is_contiguous()):
        return None
    b = _bias_fields(bias)
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None or b is None:
        return None
    bf = weight.dtype is torch.bfloat16
    return LinearKernel(lib, (weight, bias), MAX_ROWS["dense"], (weight.dtype,), kind=1, O=weight.shape[0],
                        I=weight.shape[1], w_bf16=int(bf), amx_min_rows=AMX_MIN_ROWS if bf and AMX_BF16 else 0,
                        W=weight.data_ptr(), **b)


def int8_kernel(weight: torch.Tensor, scales_f32: torch.Tensor, bias: torch.Tensor | None = None) -> LinearKernel | None:
    """A :class:`LinearKernel` for int8 ``weight`` (O, I) with fp32 per-row ``scales_f32`` (O,)."""
    if weight.device.type != "cpu" or not weight.is_contiguous() or not scales_f32.is_contiguous():
        return None
    b = _bias_fields(bias)
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None or b is None:
        return None
    return LinearKernel(lib, (weight, scales_f32, bias), MAX_ROWS["int8"], _FLOAT, kind=2, O=weight.shape[0],
                        I=weight.shape[1], act_q8=int(INT8_ACTIVATIONS), W=weight.data_ptr(),
                        scales=scales_f32.data_ptr(), **b)


def q4_kernel(codes: torch.Tensor, table: torch.Tensor, group: int, *, scales: torch.Tensor | None = None,
              zeros: torch.Tensor | None = None, absmax: torch.Tensor | None = None,
              am_code: torch.Tensor | None = None, am_dyn: torch.Tensor | None = None,
              am_scale2: torch.Tensor | None = None, am_offset: float = 0.0,
              bias: torch.Tensor | None = None) -> LinearKernel | None:
    """A :class:`LinearKernel` for 4-bit weights, arguments as :func:`q4`."""
    O, half = codes.shape
    I = 2 * half
    if codes.device.type != "cpu" or I % group or group % 32 or not codes.is_contiguous():
        return None
    for t in (scales, zeros):
        if t is not None and (t.dtype not in _FLOAT or not t.is_contiguous()):
            return None
    b = _bias_fields(bias)
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None or b is None:
        return None
    return LinearKernel(lib, (codes, scales, zeros, absmax, am_code, am_scale2, bias), MAX_ROWS["q4"], _FLOAT,
                        kind=3, O=O, I=I, act_q8=int(INT8_ACTIVATIONS), W=codes.data_ptr(),
                        mode=0 if scales is not None else 1, group=group, q_scales=_ptr(scales), q_zeros=_ptr(zeros),
                        stats_bf16=int(scales is not None and scales.dtype is torch.bfloat16), absmax=_ptr(absmax),
                        am_code=_ptr(am_code), am_dyn=_ptr(am_dyn), am_scale2=_ptr(am_scale2),
                        table=table.data_ptr(), am_offset=float(am_offset), **b)


def gguf_kernel(raw: torch.Tensor, ggml_type: int, in_features: int,
                bias: torch.Tensor | None = None) -> LinearKernel | None:
    """A :class:`LinearKernel` for a GGUF tensor kept as its blocks (gguf.cpp): ``raw`` uint8 (O, row_bytes), rows
    of ggml blocks of type id ``ggml_type``, ``in_features`` elements per row; None where the kernels are off or
    do not take the type."""
    if raw.device.type != "cpu" or raw.dim() != 2 or not raw.is_contiguous() or raw.dtype is not torch.uint8:
        return None
    b = _bias_fields(bias)
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None or b is None or not lib.ember_gguf_supports(int(ggml_type)):
        return None
    return LinearKernel(lib, (raw, bias), MAX_ROWS["gguf"], _FLOAT, kind=4, O=raw.shape[0], I=in_features,
                        act_q8=int(INT8_ACTIVATIONS), W=raw.data_ptr(), mode=int(ggml_type), group=raw.shape[1], **b)


def gguf_supports(ggml_type: int) -> bool:
    """Whether the loaded kernels take block type id ``ggml_type`` (False where they are off)."""
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    return lib is not None and bool(lib.ember_gguf_supports(int(ggml_type)))


def gguf_dequant(raw: torch.Tensor, ggml_type: int, in_features: int, out: torch.Tensor) -> bool:
    """Decode GGUF block rows ``raw`` uint8 (n, row_bytes) into ``out`` (n, in_features) bf16/fp32 with the kernels
    (the reference's roundings); False where they do not apply (the caller decodes with torch)."""
    if (raw.device.type != "cpu" or not raw.is_contiguous() or out.dtype not in _FLOAT or not out.is_contiguous()
            or out.device.type != "cpu"):
        return False
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return False
    return bool(lib.ember_gguf_dequant(raw.data_ptr(), raw.shape[1], int(ggml_type), in_features, 0, raw.shape[0],
                                       out.data_ptr(), _is_bf16(out), torch.get_num_threads()))


def gguf_tiled(x2: torch.Tensor, raw: torch.Tensor, ggml_type: int) -> torch.Tensor | None:
    """``x2 @ W.T`` for many rows (prefill) of a GGUF block weight: bf16 rows of a 32-value type on the
    int8-activation path (AVX2/AVX512-VNNI builds, with :data:`INT8_ACTIVATIONS`: the blocks multiplied as bytes,
    four activation rows per decode of the codes); else a cache-sized tile of rows decoded at a time by the kernels,
    multiplied by PyTorch (:func:`_tiled`). None where the kernels do not apply."""
    if not _usable(x2) or x2.dtype not in _FLOAT:
        return None
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None or not lib.ember_gguf_supports(int(ggml_type)) or not raw.is_contiguous():
        return None
    I, nt, rb = x2.shape[1], torch.get_num_threads(), raw.shape[1]
    if x2.dtype is torch.bfloat16 and INT8_ACTIVATIONS:
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], raw.shape[0], dtype=torch.bfloat16)
        if lib.ember_gguf_rows_q8(raw.data_ptr(), rb, int(ggml_type), x2.data_ptr(), y.data_ptr(), x2.shape[0],
                                  raw.shape[0], I, nt):
            return y
    return _tiled(x2.contiguous(), raw.shape[0], lambda a, b, buf: lib.ember_gguf_dequant(
        raw.data_ptr(), rb, int(ggml_type), I, a, b, buf.data_ptr(), _is_bf16(buf), nt))


_native_bf16: bool | None = None


def native_bf16_gemm() -> bool:
    """Whether PyTorch's CPU bf16 GEMM is native here (AVX512-BF16/AMX) rather than emulated.

    Emulated bf16 GEMMs run several times slower than fp32 ones, so wide bf16 products (prefill) are computed
    in fp32 where it is emulated."""
    global _native_bf16
    if _native_bf16 is None:
        try:
            _native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _native_bf16 = platform.machine().lower() not in ("x86_64", "amd64")
    return _native_bf16


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear`` of a bf16 CPU product computed in fp32 (rounded back to bf16) where bf16 GEMMs are emulated;
    None where they are native, or for anything else (other dtypes, devices, autograd)."""
    if (x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 or x.device.type != "cpu"
            or native_bf16_gemm() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    # fp32 a cache-sized tile of rows at a time: a whole fp32 copy of the weight per call cost more than its GEMM
    x2 = x.reshape(-1, x.shape[-1])
    y = _tiled(x2, weight.shape[0], lambda a, b, buf: buf.copy_(weight[a:b]), bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _tiled(x2: torch.Tensor, out_features: int, dequant, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W.T (+ bias)`` for large M: ``dequant(a, b, buf)`` fills rows a..b of W into ``buf`` (in ``buf``'s
    dtype); PyTorch multiplies, in fp32 where bf16 GEMMs are emulated (:func:`native_bf16_gemm`)."""
    M, I = x2.shape
    out_dtype = x2.dtype
    if x2.dtype is torch.bfloat16 and not native_bf16_gemm():
        x2 = x2.float()
    step = max(16, TILE_BYTES // (I * x2.element_size()) // 16 * 16)
    buf = torch.empty(min(step, out_features), I, dtype=x2.dtype)
    yt = torch.empty(out_features, M, dtype=x2.dtype)  # (O, M): each tile's product is a contiguous row range
    xt = x2.t()
    for a in range(0, out_features, step):
        b = min(out_features, a + step)
        tile = buf[: b - a]
        dequant(a, b, tile)
        torch.mm(tile, xt, out=yt[a:b])
        if bias is not None:  # before the output's rounding, as F.linear adds it
            yt[a:b] += bias[a:b, None]
    # callers (LoRA, views of the output) expect a row-major result: one copy, cast on the way where needed
    return torch.empty(M, out_features, dtype=out_dtype).copy_(yt.t())


def int8(x2: torch.Tensor, weight: torch.Tensor, scales_f32: torch.Tensor) -> torch.Tensor | None:
    """``x2 @ (q * s).T`` for int8 ``weight`` (O, I) and fp32 ``scales_f32`` (O,); x2 bf16 or fp32."""
    if x2.dtype not in (torch.bfloat16, torch.float32) or not _usable(x2):
        return None
    lib = _loader.load()
    if lib is None:
        return None
    x2 = x2.contiguous()
    M, I = x2.shape
    O = weight.shape[0]
    bf = int(x2.dtype == torch.bfloat16)
    nt = torch.get_num_threads()
    if M > MAX_ROWS["int8"]:
        return _tiled(x2, O, lambda a, b, buf: lib.ember_int8_dequant(weight.data_ptr(), scales_f32.data_ptr(), I, a, b,
                                                                        buf.data_ptr(), _is_bf16(buf), nt))
    y = torch.empty(M, O, dtype=x2.dtype)
    lib.ember_int8(weight.data_ptr(), scales_f32.data_ptr(), x2.data_ptr(), bf, y.data_ptr(), M, O, I, bf,
                   int(INT8_ACTIVATIONS), nt)
    return y


def q4(x2: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, group: int, *, scales: torch.Tensor | None = None,
       zeros: torch.Tensor | None = None, absmax: torch.Tensor | None = None, am_code: torch.Tensor | None = None,
       am_dyn: torch.Tensor | None = None, am_scale2: torch.Tensor | None = None,
       am_offset: float = 0.0) -> torch.Tensor | None:
    """4-bit weight matmul: int4 (``scales``/``zeros`` (O, I/group)) or NF4 (``absmax`` or its double quantization).

    ``codes`` (O, I/2) uint8 in the canonical order (element 2j in the high nibble of byte j);
    ``table`` (16,) fp32: the value of each code before scaling.
    """
    if x2.dtype not in (torch.bfloat16, torch.float32) or not _usable(x2):
        return None
    M, I = x2.shape
    if I % group or group % 32 or not codes.is_contiguous():
        return None
    for t in (scales, zeros):
        if t is not None and (t.dtype not in (torch.bfloat16, torch.float32) or not t.is_contiguous()):
            return None
    lib = _loader.load()
    if lib is None:
        return None
    x2 = x2.contiguous()
    O = codes.shape[0]
    bf = int(x2.dtype == torch.bfloat16)
    mode = 0 if scales is not None else 1
    stats_bf16 = int(scales is not None and scales.dtype == torch.bfloat16)
    nt = torch.get_num_threads()
    stats = (_ptr(scales), _ptr(zeros), stats_bf16, _ptr(absmax), _ptr(am_code), _ptr(am_dyn), _ptr(am_scale2),
             float(am_offset), table.data_ptr())
    if M > MAX_ROWS["q4"]:
        return _tiled(x2, O, lambda a, b, buf: lib.ember_q4_dequant(codes.data_ptr(), I, a, b, buf.data_ptr(),
                                                                      _is_bf16(buf), mode,
                                                                      group, *stats, nt))
    y = torch.empty(M, O, dtype=x2.dtype)
    lib.ember_q4(codes.data_ptr(), x2.data_ptr(), bf, y.data_ptr(), M, O, I, bf, mode, group, *stats,
                 int(INT8_ACTIVATIONS), nt)
    return y


# bf16 rows per int8-path MXFP4 call when many rows take it (prefill on a CPU without native bf16 GEMMs): its
# activation scratch is ~3 bytes per value.
MXFP4_Q8_CHUNK = 256


def mxfp4(x2: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """``x2 @ W.T`` for an MXFP4 weight W (O, I) as stored: ``blocks`` (O, I/32, 16) uint8 (element 2j in the low
    nibble), ``scales`` (O, I/32) uint8 E8M0; x2 (M, I) bf16 or fp32.

    fp32 activations take the path exact against the dequantized weight (fp32 sums), up to ``MAX_ROWS["mxfp4"]``
    rows; bf16 ones the int8-activation path (int8 per block of 32, AVX2 or VNNI) where the build has it and
    :data:`INT8_ACTIVATIONS` is on: up to ``MAX_ROWS["mxfp4"]`` rows, or any number (in chunks) where the CPU's
    bf16 GEMM is emulated, since dequantizing tiles for it costs more than the byte products of a whole prompt.
    None where the kernels do not take the call (the caller dequantizes tile by tile)."""
    if x2.dtype not in _FLOAT or not _usable(x2):
        return None
    O, G = scales.shape
    I = G * 32
    if (x2.shape[1] != I or blocks.dtype is not torch.uint8 or scales.dtype is not torch.uint8
            or not blocks.is_contiguous() or not scales.is_contiguous() or blocks.numel() != O * G * 16):
        return None
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return None
    M, bf = x2.shape[0], _is_bf16(x2)
    q8 = bf and INT8_ACTIVATIONS and lib.ember_mxfp4_int8_path()
    if M > MAX_ROWS["mxfp4"] and not (q8 and not native_bf16_gemm()):
        return None
    x2 = x2.contiguous()
    y = torch.empty(M, O, dtype=x2.dtype)
    for a in range(0, M, MXFP4_Q8_CHUNK):
        n = min(MXFP4_Q8_CHUNK, M - a)
        lib.ember_mxfp4(blocks.data_ptr(), scales.data_ptr(), x2[a:].data_ptr(), bf, y[a:].data_ptr(), bf, n, O, I,
                        int(INT8_ACTIVATIONS), torch.get_num_threads())
    return y


def linear_rows(ks: list[LinearKernel], x2: torch.Tensor) -> list[torch.Tensor] | None:
    """:func:`linear_many` with each row's products rounded as that row alone would be (``ember_linear_rows``:
    dense weights still stream once for every row); None where the call does not take them all."""
    if len(ks) > 8 or not all(k.accepts(x2[:1]) for k in ks):
        return None
    x2 = x2.contiguous()
    M = x2.shape[0]
    ys = [torch.empty(M, k.out_features, dtype=x2.dtype) for k in ks]
    descs = (_P * len(ks))(*[k.addr for k in ks])
    outs = (_P * len(ks))(*[y.data_ptr() for y in ys])
    ok = _loader._lib.ember_linear_rows(len(ks), descs, x2.data_ptr(), outs, M, x2.dtype is torch.bfloat16,
                                        torch.get_num_threads())
    return ys if ok else None


def linear_many(ks: list[LinearKernel], x2: torch.Tensor) -> list[torch.Tensor] | None:
    """``[k(x2) for k in ks]`` in one kernel call (one parallel region over all their rows); None where the
    call does not take them all (the caller then runs them one by one)."""
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    ys = [torch.empty(M, k.out_features, dtype=x2.dtype) for k in ks]
    n = len(ks)
    descs = (_P * n)(*[k.addr for k in ks])
    outs = (_P * n)(*[y.data_ptr() for y in ys])
    if _loader._lib.ember_linear_many(n, descs, x2.data_ptr(), outs, M, x2.dtype is torch.bfloat16,
                                     torch.get_num_threads()) == n:
        return ys
    return None
