"""Building and loading the native CPU kernels (``cpu.cpp`` and the other ``*.cpp`` beside it), and the flags
that steer their dispatch.

Every ``*.cpp`` in this folder is one translation unit of the same library (``common.h`` holds what they
share: ISA tiers, bf16 helpers). The sources are compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``;
``-O3 -march=native -fopenmp``) into ``$EMBER_CACHE/kernels`` (default ``~/.cache/ember``), keyed by
a hash of the source, the flags and the CPU, written atomically, and loaded with :mod:`ctypes`
(calls release the GIL). Without a compiler, or with ``EMBER_KERNELS=0``, :func:`load` returns None and
every caller falls back to PyTorch ops; ``EMBER_KERNELS=portable`` builds the plain C++ loops instead of the
vector ones (the tests use it to check both).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch  # noqa: F401  (loaded before the library: its libgomp is the one OpenMP runtime both use)

SOURCE = Path(__file__).with_name("cpu.cpp")
_HERE = SOURCE.parent


def sources() -> list[Path]:
    """The kernel sources compiled into the one library, ``cpu.cpp`` first, the others sorted by name."""
    return [SOURCE] + sorted(p for p in _HERE.glob("*.cpp") if p != SOURCE)


def _source_bytes() -> bytes:
    """Every source and header, for the build's cache key: a change to any of them rebuilds."""
    files = sources() + sorted(_HERE.glob("*.h"))
    return b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)


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

MAX_ROWS = {"dense": 32, "int8": 4, "q4": 2, "mxfp4": 8, "gguf": 8}
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


def _compile_and_link(cxx: str, flags: list[str], out: str) -> subprocess.CompletedProcess:
    """Each source compiled to an object in its own compiler process, up to one per core at once, then linked
    into ``out``: the translation units build in parallel. The first failure's process is returned as is."""
    with tempfile.TemporaryDirectory(prefix="ember_obj", dir=os.path.dirname(out)) as tmpdir:
        objs = [os.path.join(tmpdir, f"{i}_{p.stem}.o") for i, p in enumerate(sources())]

        def one(args: tuple[Path, str]) -> subprocess.CompletedProcess:
            return subprocess.run([cxx, *flags, "-c", str(args[0]), "-o", args[1]], capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            done = list(pool.map(one, zip(sources(), objs)))
        failed = [p for p in done if p.returncode != 0]
        if failed:
            return failed[0]
        return subprocess.run([cxx, *flags, *objs, "-o", out], capture_output=True, text=True)


def build(portable: bool = False, quiet: bool = True) -> Path:
    """Compile the kernel sources for this machine (or reuse the cached build); return the shared library's path.

    Raises:
        RuntimeError: no compiler, or every flag set failed (the message holds the compiler's output).
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++/clang++)")
    src = _source_bytes()
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
            proc = _compile_and_link(cxx, flags, tmp)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent builder or a crash never leaves half a library
                return out
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-400:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling the kernels in ember/kernels/ failed:\n" + "\n".join(errors))


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
    lib.ember_silu_mul.restype = None
    lib.ember_silu_mul.argtypes = [_P, _P, _I64, _INT]
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
    lib.ember_mla_block.restype = _INT
    lib.ember_mla_block.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _INT, _INT]
    lib.ember_sink_attn_block.restype = _INT
    lib.ember_sink_attn_block.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _INT, _INT]
    lib.ember_gptoss_moe_block.restype = _INT
    lib.ember_gptoss_moe_block.argtypes = [_P, _P, _INT, _INT]
    lib.ember_decode_layers.restype = _INT
    lib.ember_decode_layers.argtypes = [_P, _INT, _P, _P, _P, _I64, _P, _F, _P, _P, _INT, _INT]
    lib.ember_decode_layers_gemma.restype = _INT
    lib.ember_decode_layers_gemma.argtypes = [_P, _INT, _P, _P, _P, _I64, _P, _F, _I64, _F, _P, _P, _INT, _INT]
    lib.ember_decode_rows_v.restype = _INT
    lib.ember_decode_rows_v.argtypes = [_P, _INT, _P, _P, _P, _I64, _I64, _I64, _P, _F, _I64, _F, _P, _P, _INT, _INT]
    lib.ember_decode_rows.restype = _INT
    lib.ember_decode_rows.argtypes = [_P, _INT, _P, _P, _P, _I64, _I64, _P, _F, _P, _P, _INT, _INT]
    lib.ember_linear_rows.restype = _INT
    lib.ember_linear_rows.argtypes = [_INT, _P, _P, _P, _I64, _INT, _INT]
    lib.ember_attn_decode.restype = _INT
    lib.ember_attn_decode.argtypes = [_P, _P, _P, _P] + [_I64] * 11 + [_P, _I64, _I64, _F, _INT, _INT]
    lib.ember_attn_runs.restype = _INT
    lib.ember_attn_runs.argtypes = [_P, _P, _P, _P] + [_I64] * 12 + [_P, _I64, _I64, _I64, _F, _INT, _INT]
    lib.ember_int8_dequant.restype = None
    lib.ember_int8_dequant.argtypes = [_P, _P, _I64, _I64, _I64, _P, _INT, _INT]
    lib.ember_mxfp4.restype = _INT
    lib.ember_mxfp4.argtypes = [_P, _P, _P, _INT, _P, _INT, _I64, _I64, _I64, _INT, _INT]
    lib.ember_mxfp4_int8_path.restype = _INT
    lib.ember_mxfp4_int8_path.argtypes = []
    lib.ember_gguf_supports.restype = _INT
    lib.ember_gguf_supports.argtypes = [_INT]
    lib.ember_gguf_linear.restype = _INT
    lib.ember_gguf_linear.argtypes = [_P, _I64, _INT, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    lib.ember_gguf_rows_q8.restype = _INT
    lib.ember_gguf_rows_q8.argtypes = [_P, _I64, _INT, _P, _P, _I64, _I64, _I64, _INT]
    lib.ember_gguf_dequant.restype = _INT
    lib.ember_gguf_dequant.argtypes = [_P, _I64, _INT, _I64, _I64, _I64, _P, _INT, _INT]
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
            # torch (imported above) has loaded its libgomp first, so both share one OpenMP runtime
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


def library() -> ctypes.CDLL | None:
    """The kernel library if :func:`load` has loaded it, else None (never builds)."""
    return _lib
