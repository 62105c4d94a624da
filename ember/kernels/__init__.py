"""Native CPU kernels for decode and small batches (see ``cpu.cpp`` for what each computes).

Decode is memory-bandwidth bound: every weight is read once per step. PyTorch's CPU GEMV paths
stream bf16 weights at ~15-20 GB/s on a 2-core AVX512 machine whose plain reads reach ~60 GB/s;
these kernels reach ~45 GB/s and decode int8/int4/NF4 weights in registers on the way.

The source is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``;
``-O3 -march=native -fopenmp``) into ``$EMBER_CACHE/kernels`` (default ``~/.cache/ember``), keyed by
a hash of the source, the flags and the CPU, written atomically, and loaded with :mod:`ctypes`
(calls release the GIL). Without a compiler, or with ``EMBER_KERNELS=0``, everything falls back
to PyTorch ops; ``EMBER_KERNELS=portable`` builds the plain C++ loops instead of the AVX512 ones
(the tests use it to check both). :func:`status` says which is in use (``ember hw`` prints it).

Every entry point takes ``x2`` (M, I) and returns (M, O) in ``x2``'s dtype, or ``None`` when the
kernels are unavailable or the shape/dtype is not one they handle, so callers write
``y = kernels.dense(x2, w); if y is None: y = F.linear(x2, w)``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu.cpp")
# Fused kernels up to this many activation rows; above it (prefill, large batches) quantized weights are
# dequantized a cache-sized tile of rows at a time into a float buffer for a PyTorch (oneDNN/MKL) GEMM,
# and dense weights go straight to PyTorch: those GEMMs are blocked for compute, the kernels for streaming.


def _cpu_has(flag: str) -> bool:
    try:
        return any(ln.startswith("flags") and flag in ln.split() for ln in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


# A CPU with AMX tiles (Intel Sapphire Rapids and later): from AMX_MIN_ROWS activation rows on, bf16 x bf16
# goes to the AMX kernel (16 weight rows x 32 inputs x 16 activation rows per instruction), where the
# AVX512 dot products run out of compute on a small core count.
AMX_BF16 = _cpu_has("amx_bf16")
AMX_MIN_ROWS = int(os.environ.get("EMBER_AMX_MIN_ROWS", "5"))
# int8/int4 weights with bf16 activations: quantize the activations to int8 per 128 values and multiply bytes
# with AVX512-VNNI (llama.cpp's Q8 activations), where the build has it; EMBER_INT8_ACTIVATIONS=0 keeps them
# in bf16 (vdpbf16ps). fp32 activations always take the path that is exact against the dequantized weight.
INT8_ACTIVATIONS = os.environ.get("EMBER_INT8_ACTIVATIONS", "1").strip().lower() not in ("0", "off", "false", "no")
MAX_ROWS = {"dense": 32, "int8": 4, "q4": 2}
TILE_BYTES = 1 << 20  # float tile of dequantized rows: L2-resident

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_status = "not built yet"

_FLOAT = (torch.bfloat16, torch.float32)
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float


def _mode() -> str:
    return os.environ.get("EMBER_KERNELS", "native").strip().lower() or "native"


def cache_dir() -> Path:
    """Where built kernels live: ``$EMBER_CACHE/kernels`` or ``~/.cache/ember/kernels``."""
    root = os.environ.get("EMBER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ember")
    return Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    """Model name + ISA flags: a cache built for one CPU is never loaded on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _flag_sets(portable: bool) -> list[list[str]]:
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if portable:
        base.append("-DEMBER_PORTABLE")
    # -march=native where the compiler takes it (x86, recent aarch64 gcc/clang), else -mcpu=native, else none.
    return [base + ["-march=native"], base + ["-mcpu=native"], base]


def build(portable: bool = False, quiet: bool = True) -> Path:
    """Compile ``cpu.cpp`` for this machine (or reuse the cached build); return the shared library's path.

    Raises:
        RuntimeError: no compiler, or every flag set failed (the message holds the compiler's output).
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++/clang++)")
    src = SOURCE.read_bytes()
    errors = []
    for flags in _flag_sets(portable):
        key = hashlib.sha256(src + " ".join([cxx] + flags).encode() + _cpu_fingerprint().encode()
                             + platform.machine().encode()).hexdigest()[:16]
        out = cache_dir() / f"ember_cpu_{key}.so"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
        os.close(fd)
        if not errors:  # a real compile is about to happen (a few seconds; cached for the next runs)
            print("ember: building CPU kernels for this machine (once)…", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent builder or a crash never leaves half a library
                return out
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-400:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling ember/kernels/cpu.cpp failed:\n" + "\n".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    lib.ember_kernels_isa.restype = _INT
    lib.ember_kernels_isa.argtypes = []
    lib.ember_kernels_amx.restype = _INT
    lib.ember_kernels_amx.argtypes = []
    lib.ember_kernels_vnni.restype = _INT
    lib.ember_kernels_vnni.argtypes = []
    lib.ember_kernels_act_q8_levels.restype = _INT
    lib.ember_kernels_act_q8_levels.argtypes = []
    lib.ember_dense_bf16.restype = None
    lib.ember_dense_bf16.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT, _INT]
    lib.ember_dense_bf16_amx.restype = _INT
    lib.ember_dense_bf16_amx.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT, _INT]
    lib.ember_dense_f32.restype = None
    lib.ember_dense_f32.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT, _INT]
    lib.ember_int8.restype = None
    lib.ember_int8.argtypes = [_P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT, _INT]
    lib.ember_q4.restype = None
    lib.ember_q4.argtypes = [_P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT, _I64, _P, _P, _INT, _P, _P, _P, _P, _F,
                             _P, _INT, _INT]
    lib.ember_rms_norm.restype = None
    lib.ember_rms_norm.argtypes = [_P, _P, _P, _I64, _I64, _F, _INT, _INT]
    lib.ember_rope.restype = None
    lib.ember_rope.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT]
    lib.ember_linear.restype = _INT
    lib.ember_linear.argtypes = [_P, _P, _P, _I64, _INT, _INT]
    lib.ember_linear_many.restype = _INT
    lib.ember_linear_many.argtypes = [_INT, _P, _P, _P, _I64, _INT, _INT]
    lib.ember_attn_block.restype = _INT
    lib.ember_attn_block.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _INT, _INT]
    lib.ember_mlp_block.restype = _INT
    lib.ember_mlp_block.argtypes = [_P, _P, _INT, _INT]
    lib.ember_moe_block.restype = _INT
    lib.ember_moe_block.argtypes = [_P, _P, _INT, _INT]
    lib.ember_decode_layers.restype = _INT
    lib.ember_decode_layers.argtypes = [_P, _INT, _P, _P, _P, _I64, _P, _F, _P, _P, _INT, _INT]
    lib.ember_attn_decode.restype = _INT
    lib.ember_attn_decode.argtypes = [_P, _P, _P, _P] + [_I64] * 11 + [_P, _I64, _I64, _F, _INT, _INT]
    lib.ember_int8_dequant.restype = None
    lib.ember_int8_dequant.argtypes = [_P, _P, _I64, _I64, _I64, _P, _INT, _INT]
    lib.ember_q4_dequant.restype = None
    lib.ember_q4_dequant.argtypes = [_P, _I64, _I64, _I64, _P, _INT, _INT, _I64, _P, _P, _INT, _P, _P, _P, _P, _F, _P,
                                     _INT]


def load(portable: bool | None = None) -> ctypes.CDLL | None:
    """The kernel library (built on first call), or None when disabled or it cannot be built."""
    global _lib, _tried, _status
    if _lib is not None or (_tried and portable is None):
        return _lib
    with _lock:
        if _lib is not None or (_tried and portable is None):
            return _lib
        _tried = True
        mode = _mode()
        if mode in ("0", "off", "false", "no", "torch"):
            _status = "off (EMBER_KERNELS=0): PyTorch ops"
            return None
        want_portable = mode == "portable" if portable is None else portable
        try:
            import torch  # noqa: F401  (its libgomp must be loaded first so both share one OpenMP runtime)

            path = build(portable=want_portable)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (RuntimeError, OSError) as exc:
            _status = f"unavailable ({str(exc).splitlines()[0]}): PyTorch ops"
            print(f"ember: native CPU kernels unavailable, using PyTorch ops: {str(exc).splitlines()[0]}",
                  file=sys.stderr)
            return None
        _lib = lib
        isa = {1: "AVX512-BF16", 2: "AVX2+FMA"}.get(lib.ember_kernels_isa(), "portable C++")
        if lib.ember_kernels_isa() == 1 and AMX_BF16 and lib.ember_kernels_amx():
            isa += f" + AMX tiles for bf16 from {AMX_MIN_ROWS} rows"
        if lib.ember_kernels_act_q8_levels():
            how = "VNNI" if lib.ember_kernels_vnni() else "vpmaddubsw"
            isa += f" + int8 activations for int8/int4/nf4 ({how})" if INT8_ACTIVATIONS else " (int8 activations off)"
        _status = f"native ({isa}, {path.name})"
        return _lib


def reset() -> None:
    """Forget the loaded library (tests switch between native and portable builds)."""
    global _lib, _tried, _status
    with _lock:
        _lib, _tried, _status = None, False, "not built yet"


def status() -> str:
    """One line: which CPU matmul path decode uses."""
    load()
    return _status


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
    lib = _lib if _lib is not None else load()
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF-exact RMSNorm over the last axis (fp32 statistics, bf16 roundings as HF's); None when not handled."""
    if (x.dtype not in _FLOAT or weight.dtype is not x.dtype or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    lib = _lib if _lib is not None else load()
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    H = x.shape[-1]
    lib.ember_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // H, H, eps,
                       x.dtype is torch.bfloat16, torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate ``x`` (B, T, heads, hd), contiguous, in place by ``cos``/``sin`` (B, T, hd); False when not handled."""
    if (x.dtype not in _FLOAT or cos.dtype is not x.dtype or x.device.type != "cpu" or not x.is_contiguous()
            or not cos.is_contiguous() or not sin.is_contiguous()
            or (torch.is_grad_enabled() and x.requires_grad)):
        return False
    lib = _lib if _lib is not None else load()
    if lib is None:
        return False
    B, T, n, hd = x.shape
    if hd % 2:
        return False
    lib.ember_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B * T, n, hd, x.dtype is torch.bfloat16)
    return True


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of one new token per row: q (B, 1, nh, hd) contiguous against k/v (B, nkv, S, hd) (views of a
    cache: any batch/head/slot strides, the last axis contiguous), ``mask`` None or bool broadcastable to
    (B, 1, 1, S), True where a key is visible -> (B, 1, nh * hd), or None when not handled.

    What ``F.scaled_dot_product_attention`` computes for a single query (scale 1/sqrt(hd)), in one call that
    reads each cached key/value row once for all query heads of its group: fp32 scores and softmax, the output
    rounded once to the model dtype. SDPA's CPU kernel costs ~65-100 us a call at decode sizes, this ~10."""
    B, T, nh, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if (T != 1 or q.dtype not in _FLOAT or k.dtype is not q.dtype or v.dtype is not q.dtype or q.device.type != "cpu"
            or not q.is_contiguous() or k.stride(-1) != 1 or v.stride(-1) != 1 or nh % nkv
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if mask is not None:
        if mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[-1] != S or mask.shape[2] != 1:
            return None
        mask = mask.expand(B, 1, 1, S)
    lib = _lib if _lib is not None else load()
    if lib is None:
        return None
    out = torch.empty(B, 1, nh * hd, dtype=q.dtype)
    m_args = (mask.data_ptr(), mask.stride(0), mask.stride(3)) if mask is not None else (None, 0, 0)
    ok = lib.ember_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, nh, nkv, hd, S,
                               k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *m_args,
                               1.0 / hd ** 0.5, q.dtype is torch.bfloat16, torch.get_num_threads())
    return out if ok else None


class _LinearDesc(ctypes.Structure):
    """Mirror of ``LinearDesc`` in cpu.cpp (field for field)."""

    _fields_ = [(n, ctypes.c_int64) for n in ("kind", "O", "I", "w_bf16", "amx_min_rows", "act_q8")] + [
        ("W", _P), ("bias", _P), ("bias_bf16", ctypes.c_int64), ("scales", _P), ("mode", ctypes.c_int64),
        ("group", ctypes.c_int64), ("q_scales", _P), ("q_zeros", _P), ("stats_bf16", ctypes.c_int64),
        ("absmax", _P), ("am_code", _P), ("am_dyn", _P), ("am_scale2", _P), ("table", _P), ("am_offset", _F)]


class LinearKernel:
    """One CPU weight bound to its streaming kernel for few-row products (decode): ``k(x2)`` -> ``x2 @ W.T``
    (+ bias) in x2's dtype, or None where it does not apply (too many rows, another dtype).

    Built once per module (:func:`dense_kernel`, :func:`int8_kernel`, :func:`q4_kernel`) with every pointer,
    size and flag in a C struct, so a call costs a tensor allocation and one 6-argument ctypes call: about
    5 us of Python where the argument-by-argument wrappers took 15-25 (154 calls per token on a 1.1B model).
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
    if _lib is None and load() is None:
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
    lib = _lib if _lib is not None else load()
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
    lib = _lib if _lib is not None else load()
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
    lib = _lib if _lib is not None else load()
    if lib is None or b is None:
        return None
    return LinearKernel(lib, (codes, scales, zeros, absmax, am_code, am_scale2, bias), MAX_ROWS["q4"], _FLOAT,
                        kind=3, O=O, I=I, act_q8=int(INT8_ACTIVATIONS), W=codes.data_ptr(),
                        mode=0 if scales is not None else 1, group=group, q_scales=_ptr(scales), q_zeros=_ptr(zeros),
                        stats_bf16=int(scales is not None and scales.dtype is torch.bfloat16), absmax=_ptr(absmax),
                        am_code=_ptr(am_code), am_dyn=_ptr(am_dyn), am_scale2=_ptr(am_scale2),
                        table=table.data_ptr(), am_offset=float(am_offset), **b)


class _AttnBlockDesc(ctypes.Structure):
    """Mirror of ``AttnBlockDesc`` in cpu.cpp."""

    _fields_ = [(n, _P) for n in ("q", "k", "v", "o", "norm", "q_norm", "k_norm")] + [
        (n, ctypes.c_int64) for n in ("H", "nh", "nkv", "hd")] + [("eps", _F), ("qk_eps", _F)]


class _MlpBlockDesc(ctypes.Structure):
    """Mirror of ``MlpBlockDesc`` in cpu.cpp."""

    _fields_ = [(n, _P) for n in ("gate", "up", "down", "norm")] + [("H", ctypes.c_int64), ("F", ctypes.c_int64),
                                                                    ("eps", _F)]


class _MoeBlockDesc(ctypes.Structure):
    """Mirror of ``MoeBlockDesc`` in cpu.cpp."""

    _fields_ = [("router", _P), ("experts", _P), ("norm", _P)] + [
        (n, ctypes.c_int64) for n in ("H", "E", "k", "F", "norm_topk")] + [("eps", _F)]


class BlockKernel:
    """A pre-norm decoder block (attention or SwiGLU MLP, residual add included) bound to its kernels, for one
    token of one sequence: one call where the modules' forward makes 10-20 (see ``ember_attn_block`` and
    ``ember_mlp_block`` in cpu.cpp). Built by :func:`attn_block_kernel` / :func:`mlp_block_kernel` from the
    modules' own :class:`LinearKernel` objects and norm weights, which it keeps alive (``parts``)."""

    __slots__ = ("kind", "desc", "addr", "parts")

    def __init__(self, kind: str, desc: ctypes.Structure, parts: tuple) -> None:
        self.kind, self.desc, self.addr, self.parts = kind, desc, ctypes.addressof(desc), parts


def attn_block_kernel(q: LinearKernel, k: LinearKernel, v: LinearKernel, o: LinearKernel, norm: torch.Tensor,
                      eps: float, nh: int, nkv: int, hd: int, q_norm: torch.Tensor | None = None,
                      k_norm: torch.Tensor | None = None, qk_eps: float = 0.0) -> BlockKernel:
    """The attention block of a decoder layer: ``x += o(attn(rope(q/k/v(rms_norm(x, norm)))))``."""
    desc = _AttnBlockDesc(q=q.addr, k=k.addr, v=v.addr, o=o.addr, norm=norm.data_ptr(), q_norm=_ptr(q_norm),
                          k_norm=_ptr(k_norm), H=norm.shape[0], nh=nh, nkv=nkv, hd=hd, eps=eps, qk_eps=qk_eps)
    return BlockKernel("attn", desc, (q, k, v, o, norm, q_norm, k_norm))


def mlp_block_kernel(gate: LinearKernel, up: LinearKernel, down: LinearKernel, norm: torch.Tensor,
                     eps: float) -> BlockKernel:
    """The MLP block of a decoder layer: ``x += down(silu(gate(h)) * up(h))``, ``h = rms_norm(x, norm)``."""
    desc = _MlpBlockDesc(gate=gate.addr, up=up.addr, down=down.addr, norm=norm.data_ptr(), H=norm.shape[0],
                         F=gate.out_features, eps=eps)
    return BlockKernel("mlp", desc, (gate, up, down, norm))


def moe_block_kernel(router: LinearKernel, experts: list[tuple[LinearKernel, LinearKernel, LinearKernel]],
                     norm: torch.Tensor, eps: float, top_k: int, norm_topk: bool) -> BlockKernel:
    """A mixture-of-experts block (:class:`ember.model.SparseMoE` after the post-attention norm, the residual add
    included): ``experts[e]`` = expert e's (gate, up, down) kernels."""
    flat = [k for triple in experts for k in triple]
    table = (_P * len(flat))(*[k.addr for k in flat])
    desc = _MoeBlockDesc(router=router.addr, experts=ctypes.addressof(table), norm=norm.data_ptr(), H=norm.shape[0],
                         E=len(experts), k=top_k, F=experts[0][0].out_features, norm_topk=int(norm_topk), eps=eps)
    return BlockKernel("moe", desc, (router, tuple(flat), table, norm))


def run_attn_block(block: BlockKernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: int) -> bool:
    """Apply an attention :class:`BlockKernel` to ``x`` (H,) in place for the token at cache slot ``pos``:
    cos/sin (hd,) of its position, k_cache/v_cache (1, nkv, max_len, hd) contiguous (its k/v written at pos)."""
    return bool(_lib.ember_attn_block(block.addr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                      v_cache.data_ptr(), k_cache.shape[2], pos, x.dtype is torch.bfloat16,
                                      torch.get_num_threads()))


def run_mlp_block(block: BlockKernel, x: torch.Tensor) -> bool:
    """Apply an MLP or MoE :class:`BlockKernel` to ``x`` (H,) in place."""
    fn = _lib.ember_moe_block if block.kind == "moe" else _lib.ember_mlp_block
    return bool(fn(block.addr, x.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads()))


class _LayerStepDesc(ctypes.Structure):
    """Mirror of ``LayerStepDesc`` in cpu.cpp."""

    _fields_ = [("attn", _P), ("mlp", _P), ("moe", ctypes.c_int64), ("Kc", _P), ("Vc", _P), ("max_len", ctypes.c_int64)]


class LayerSteps:
    """Every layer's (attention, MLP or MoE) :class:`BlockKernel` pair bound to its key/value cache tensors, for
    :func:`run_decode_layers`. Keeps the blocks alive, not the caches: a KV cache can be gigabytes, and its owner
    (the running request) holds it while it is used."""

    __slots__ = ("table", "addr", "n", "parts")

    def __init__(self, blocks: list[tuple[BlockKernel, BlockKernel]],
                 caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.n = len(blocks)
        self.table = (_LayerStepDesc * self.n)(*[
            _LayerStepDesc(attn=a.addr, mlp=m.addr, moe=int(m.kind == "moe"), Kc=kc.data_ptr(), Vc=vc.data_ptr(),
                           max_len=kc.shape[2])
            for (a, m), (kc, vc) in zip(blocks, caches)])
        self.addr = ctypes.addressof(self.table)
        self.parts = blocks


def layer_steps(blocks: list[tuple[BlockKernel, BlockKernel]],
                caches: list[tuple[torch.Tensor, torch.Tensor]]) -> LayerSteps | None:
    """The layers' blocks with their caches (each (1, nkv, max_len, hd), contiguous, of x's dtype), or None where
    a cache is not laid out so."""
    for kc, vc in caches:
        if not (kc.is_contiguous() and vc.is_contiguous() and kc.shape == vc.shape and kc.dim() == 4
                and kc.shape[0] == 1 and kc.device.type == "cpu"):
            return None
    return LayerSteps(blocks, caches)


def run_decode_layers(steps: LayerSteps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                      head: "tuple[torch.Tensor, float, LinearKernel] | None" = None,
                      logits: torch.Tensor | None = None) -> int:
    """Apply every layer of ``steps`` to ``x`` (H,) in place, in one call, for the token at cache slot ``pos``
    (cos/sin (hd,) of its position), then, given ``head`` = (final norm weight, its eps, the LM head's kernel),
    write ``logits`` (V,) = head(rms_norm(x)). Returns the number of blocks applied, two a layer, plus one when
    the logits were written: the caller finishes the rest (a cache too short, a kernel that refused the dtype)."""
    norm, eps, k = head if head is not None else (None, 0.0, None)
    return _lib.ember_decode_layers(steps.addr, steps.n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos,
                                    None if norm is None else norm.data_ptr(), eps, None if k is None else k.addr,
                                    None if logits is None else logits.data_ptr(), x.dtype is torch.bfloat16,
                                    torch.get_num_threads())


def project(x: torch.Tensor, modules) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``, in one kernel call where every module offers a CPU kernel for x.

    q/k/v and gate/up read the same activations: one call quantizes nothing twice in Python and costs one
    ctypes round trip instead of three. A module offers one through ``cpu_kernel()`` (Ember's Linear and the
    quantized Linears do; LoRA and other wrappers do not, so they run as themselves), and never while it
    has forward hooks (they must see the call)."""
    if (x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) and len(modules) > 1
            and _lib is not None):
        ks = []
        x2 = x.reshape(-1, x.shape[-1])
        for m in modules:
            get = getattr(m, "cpu_kernel", None)
            k = get() if get is not None and not (m._forward_hooks or m._forward_pre_hooks) else None
            if k is None or not k.accepts(x2):
                break
            ks.append(k)
        else:
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            M = x2.shape[0]
            ys = [torch.empty(M, k.out_features, dtype=x2.dtype) for k in ks]
            n = len(ks)
            descs = (_P * n)(*[k.addr for k in ks])
            outs = (_P * n)(*[y.data_ptr() for y in ys])
            if _lib.ember_linear_many(n, descs, x2.data_ptr(), outs, M, x2.dtype is torch.bfloat16,
                                      torch.get_num_threads()) == n:
                return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]
    return [m(x) for m in modules]


_native_bf16: bool | None = None


def native_bf16_gemm() -> bool:
    """Whether PyTorch's CPU bf16 GEMM is native here (AVX512-BF16/AMX) rather than emulated.

    Emulated bf16 GEMMs run ~5x slower than fp32 ones (a 128 x 2048 x 5632 product: 194 vs 37 ms on a 2-core
    AVX2 EPYC), so wide bf16 products (prefill) are computed in fp32 where it is emulated."""
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
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)


def _tiled(x2: torch.Tensor, out_features: int, dequant) -> torch.Tensor:
    """``x2 @ W.T`` for large M: ``dequant(a, b, buf)`` fills rows a..b of W into ``buf`` (in ``buf``'s dtype);
    PyTorch multiplies, in fp32 where bf16 GEMMs are emulated (:func:`native_bf16_gemm`)."""
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
    # callers (LoRA, views of the output) expect a row-major result: one copy, cast on the way where needed
    return torch.empty(M, out_features, dtype=out_dtype).copy_(yt.t())


def int8(x2: torch.Tensor, weight: torch.Tensor, scales_f32: torch.Tensor) -> torch.Tensor | None:
    """``x2 @ (q * s).T`` for int8 ``weight`` (O, I) and fp32 ``scales_f32`` (O,); x2 bf16 or fp32."""
    if x2.dtype not in (torch.bfloat16, torch.float32) or not _usable(x2):
        return None
    lib = load()
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
    lib = load()
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
