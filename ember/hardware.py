"""Hardware: what a machine offers the planner — memory, bandwidth, FLOP/s, and how fast Ember runs there.

Three sources, in order of trust:

1. :func:`measure` times *this* machine with Ember's own kernels (streaming matrix-vector bandwidth
   over several working-set sizes, matmul FLOP/s, per-layer dispatch overhead, the fraction of the
   matmul rate real LoRA training steps reach, the RSS of a fresh Ember process) and stores the
   result as JSON under ``~/.cache/ember/`` (``EMBER_CACHE_DIR`` overrides). :func:`detect`
   attaches it when the machine fingerprint matches.
2. :func:`detect` reads RAM (and a cgroup limit), cores, CUDA devices and their memory. A GPU that
   shares system memory (GB10 in the DGX Spark, Jetson, Apple silicon) is *unified*: its memory is
   the system's, not an extra pool.
3. :data:`PROFILES`: named machines with vendor-sheet numbers (source in each entry), for planning
   a machine you do not have: ``dgx-spark``, ``h100-80g``, ..., and ``2xdgx-spark``-style multiples.

FLOP/s are *dense* (no 2:4 sparsity) peaks with FP32 accumulation, the rate PyTorch matmuls get.
Units: bytes, bytes/s, FLOP/s, seconds; ``GiB`` = 2**30 bytes, ``GB`` = 1e9 bytes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GiB = 1 << 30
GB = 10**9
TB = 10**12

CALIBRATION_VERSION = 1


# ====================================================================== data


@dataclass(frozen=True)
class Calibration:
    """What :func:`measure` found on one device of one machine (all figures achieved, not peak).

    ``stream`` maps a kernel name to ``[(working-set bytes, bytes/s), ...]`` sorted by size:
    ``mv-bf16``/``mv-fp32``/``mv-fp16`` is one activation row times weight matrices (a batch-1 decode
    step), ``mm-...`` four rows (small-batch decode, the GEMM path). ``mv-bf16@1024`` streams the
    seven matrices of a decoder layer of hidden size 1024 (MLP 2.75x, kv 1/4), repeated: narrow
    layers stream slower (short rows, small calls). Working sets that fit in the cache this process
    gets stream faster, so the planner interpolates on the model's hidden size and total weight bytes.
    ``stream_efficiency`` is what a whole decode step of a synthetic model (hidden 1536) achieves
    of those rates once its other work (norms, attention, dispatch) is taken out: the other ops
    evict the cache and break the prefetcher's stride between weights. Keyed by dtype, and (CPU) by
    quant mode for the same model with quantized projections, which the planner uses for that kernel.
    ``train_efficiency`` maps the training dtype to ``[(hidden size, fraction), ...]``: the fraction
    of ``matmul_flops`` that real LoRA training steps of synthetic models of that hidden size reached
    (FLOPs counted as :func:`ember.planner.train_flops_per_token` counts them); ``{dtype}-qlora`` the
    same for QLoRA steps (NF4 base weights). Calibrations stored
    before it existed load without it (the planner then falls back to ``compute_efficiency``).
    """

    device: str
    fingerprint: str
    stream: dict[str, list[tuple[int, float]]]
    copy_bandwidth: float                      # bytes/s, read + write counted
    matmul_flops: dict[str, float]             # dtype -> achieved FLOP/s on a large square matmul
    layer_overhead_s: dict[str, float]         # dtype -> seconds of dispatch per dense decoder layer per step
    expert_overhead_s: dict[str, float]        # dtype -> extra seconds per routed expert call per step
    step_overhead_s: dict[str, float]          # dtype -> seconds per step outside the layers
    runtime_bytes: int                         # RSS of a fresh process after `import ember` + one tiny forward
    stream_efficiency: dict[str, float] = field(default_factory=dict)  # dtype or quant mode -> in-model / alone
    context_bytes: int = 0                     # CUDA: device memory the context takes before any tensor
    train_efficiency: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # dtype -> [(hidden, MFU)]
    threads: int = 1
    torch_version: str = ""
    measured_at: str = ""
    seconds: float = 0.0                       # how long measuring took

    def bandwidth(self, kernel: str, working_set: float, hidden: int | None = None) -> float | None:
        """Achieved streaming bytes/s of ``kernel`` for a working set of ``working_set`` bytes.

        With ``hidden`` and decoder-shaped curves measured (``kernel@H``), interpolates between the
        two nearest hidden sizes (log scale, clamped); else the plain curve. Within a curve,
        log-linear between measured sizes, clamped to the ends (the largest is well past the cache).
        """
        if hidden:
            shaped = sorted((int(k.split("@")[1]), k) for k in self.stream if k.startswith(kernel + "@"))
            if shaped:
                lo = max([hk for hk in shaped if hk[0] <= hidden], default=shaped[0])
                hi = min([hk for hk in shaped if hk[0] >= hidden], default=shaped[-1])
                b_lo = _interp(self.stream[lo[1]], working_set)
                if hi == lo:
                    return b_lo
                b_hi = _interp(self.stream[hi[1]], working_set)
                f = (math.log(hidden) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
                return math.exp(math.log(b_lo) + f * (math.log(b_hi) - math.log(b_lo)))
        pts = self.stream.get(kernel)
        return _interp(pts, working_set) if pts else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stream"] = {k: [list(p) for p in v] for k, v in self.stream.items()}
        d["train_efficiency"] = {k: [list(p) for p in v] for k, v in self.train_efficiency.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibration":
        d = dict(d)
        d["stream"] = {k: [(int(s), float(b)) for s, b in v] for k, v in d.get("stream", {}).items()}
        d["train_efficiency"] = {k: sorted((int(h), float(e)) for h, e in v)
                                 for k, v in (d.get("train_efficiency") or {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _interp(pts: list[tuple[int, float]], x: float) -> float:
    """Log-log interpolation in sorted (size, value) points, clamped to the ends."""
    if x <= pts[0][0]:
        return pts[0][1]
    for (s0, b0), (s1, b1) in zip(pts, pts[1:]):
        if x <= s1:
            f = (math.log(x) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))
    return pts[-1][1]


@dataclass(frozen=True)
class Hardware:
    """One machine (or ``nodes`` identical machines) as the planner sees it.

    Attributes:
        name: profile name (``dgx-spark``) or ``this machine (...)``.
        device: where weights live: ``cpu``, ``cuda`` or ``mps``.
        memory_bytes: memory of one node that models can use before reserves (GPU memory for a
            discrete GPU; system memory for CPU and unified machines).
        reserved_bytes: of that, what the OS/desktop/driver keeps at idle (unified machines).
        bandwidth: peak memory bandwidth of one node, bytes/s.
        flops: dense peak FLOP/s per precision (``bf16``, ``fp16``, ``fp8``, ``fp4``, ``fp32``); absent = unsupported.
        unified: the GPU shares system memory with the CPU (one pool, counted once).
        nodes: identical machines joined by ``interconnect`` (layers split across them, pipeline style).
        decode_efficiency: achieved fraction of ``bandwidth`` when streaming weights in a decode step.
        compute_efficiency: achieved fraction of peak FLOP/s in prefill matmuls (MFU), and in training
            when no training step was measured (:meth:`train_efficiency`).
        layer_overhead_s / expert_overhead_s / step_overhead_s: per-step dispatch costs (see Calibration).
        available_bytes: memory free right now (detected machines only), per node.
        runtime_bytes: memory a fresh Ember process takes before any model (torch, CUDA context, ...).
        calibration: measurements of this machine, when :func:`measure` has run.
        source: where the numbers come from.
    """

    name: str
    device: str
    memory_bytes: int
    bandwidth: float
    flops: dict[str, float]
    reserved_bytes: int = 0
    unified: bool = False
    nodes: int = 1
    cpu_cores: int | None = None
    interconnect_bandwidth: float | None = None
    interconnect_latency_s: float = 0.0
    decode_efficiency: float = 0.65
    compute_efficiency: float = 0.5
    layer_overhead_s: float = 150e-6
    expert_overhead_s: float = 40e-6
    step_overhead_s: float = 200e-6
    runtime_bytes: int = 3 * GiB // 2
    available_bytes: int | None = None
    calibration: Calibration | None = None
    gpu_name: str | None = None
    source: str = ""
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        """Memory one node can give to Ember: free memory now (detected) or memory less reserve (profiles)."""
        if self.available_bytes is not None:
            return self.available_bytes
        return self.memory_bytes - self.reserved_bytes

    @property
    def measured(self) -> bool:
        return self.calibration is not None

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for a compute dtype name (``bf16``, ``fp16``, ``fp32``, ``fp8``, ``fp4``)."""
        if self.calibration is not None and dtype in self.calibration.matmul_flops:
            return self.calibration.matmul_flops[dtype]
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype == "fp16" and "bf16" in self.flops:
            return self.flops["bf16"]
        if dtype in ("fp8", "fp4"):  # no native low-precision path: runs at 16-bit rate
            return self.flops.get("bf16", self.flops.get("fp32", 1e12))
        return self.flops.get("fp32", self.flops.get("bf16", 1e12) / 4)

    def stream_bandwidth(self, kernel: str, working_set: float, fallback: str | None = None,
                         hidden: int | None = None) -> float:
        """Achieved bytes/s streaming weights with ``kernel`` (``mv-bf16``, ``mm-fp32``, ``mv-int4``, ...).

        Measured curve (for a model of this ``hidden`` size when measured) when calibrated
        (``fallback``'s, then ``mv-fp32``'s, when ``kernel`` was not measured); else
        ``bandwidth x decode_efficiency``.
        """
        if self.calibration is not None:
            se = self.calibration.stream_efficiency
            base = (fallback or kernel).split("-")[1] if "-" in (fallback or kernel) else ""
            for k in (kernel, fallback, "mv-fp32"):
                bw = self.calibration.bandwidth(k, working_set, hidden) if k else None
                if bw is not None:
                    # a quantized kernel's own measured efficiency (a real quantized decode), else the float one's
                    own = k.split("-")[1] if "-" in k else ""
                    eff = se.get(own, se.get(base, 1.0)) if k == kernel else se.get(base, 1.0)
                    return bw * self.decode_efficiency * eff
        return self.bandwidth * self.decode_efficiency

    def train_efficiency(self, dtype: str, hidden: int | None = None, method: str = "lora") -> float:
        """Achieved fraction of :meth:`peak_flops` in a training step of a model of hidden size ``hidden``.

        Measured (log-log between the measured hidden sizes, clamped to the ends; another dtype's
        measurement when this one was not timed) when calibrated; else ``compute_efficiency``.
        ``method="qlora"`` takes the QLoRA steps' measurement (``{dtype}-qlora``) where there is one.
        """
        c = self.calibration
        if c is None or not c.train_efficiency:
            return self.compute_efficiency
        plain = {k: v for k, v in c.train_efficiency.items() if "-" not in k}
        pts = c.train_efficiency.get(f"{dtype}-qlora") if method == "qlora" else None
        if not pts and not plain:
            return self.compute_efficiency
        pts = pts or plain.get(dtype) or plain.get("bf16") or next(iter(plain.values()))
        return _interp(pts, hidden if hidden else pts[-1][0])

    def overheads(self, dtype: str) -> tuple[float, float, float]:
        """(per step, per dense layer, per routed expert) dispatch seconds for a compute dtype."""
        c = self.calibration
        if c is not None and dtype in c.layer_overhead_s:
            return c.step_overhead_s[dtype], c.layer_overhead_s[dtype], c.expert_overhead_s.get(dtype, 0.0)
        return self.step_overhead_s, self.layer_overhead_s, self.expert_overhead_s

    def times(self, n: int) -> "Hardware":
        """``n`` of these machines joined by their interconnect (``2xdgx-spark``)."""
        if n < 1:
            raise ValueError("a multiple needs at least one machine")
        if n == 1:
            return self
        return replace(self, name=f"{n}x{self.name}", nodes=self.nodes * n)

    def describe(self) -> str:
        """One line: memory, bandwidth, 16-bit FLOP/s."""
        mem = f"{self.memory_bytes / GiB:.1f} GiB" + (" unified" if self.unified and self.device != "cpu" else "")
        nodes = f"{self.nodes} x " if self.nodes > 1 else ""
        fl = self.peak_flops("bf16")
        return (f"{self.name}: {nodes}{mem}, {self.bandwidth / GB:.0f} GB/s, "
                f"{fl / TB:.1f} TFLOP/s bf16{' (measured)' if self.measured else ''}")


# ====================================================================== named profiles
#
# Peak numbers from vendor spec sheets; dense (no 2:4 sparsity), FP32 accumulate. Where a vendor
# publishes only a sparse or FP4 figure, the derivation is written next to it.
# Efficiencies are assumptions until `ember hw --measure` runs on the machine itself:
#   decode_efficiency 0.65 — achieved weight-streaming fraction of peak bandwidth seen in published
#     single-stream decode on the DGX Spark (Llama 3.1 8B: 38.7 tok/s NVFP4 and 20.5 tok/s FP8 on
#     273 GB/s are 0.65-0.70 of the bytes/token roofline; NVIDIA, "How DGX Spark Performance Enables
#     Intensive AI Tasks", developer.nvidia.com, ISL/OSL 2048/128, BS=1).
#   compute_efficiency 0.5 — typical large-matmul MFU for prefill/training in PyTorch.
#   layer/expert/step overhead — eager PyTorch dispatch, ~5 us per op on the host (measured for Ember
#     on a 2-core x86 host: 145-235 us per decoder layer); CUDA overlaps it with the GPU's work.

_SPARK_SOURCE = ("NVIDIA DGX Spark product page and hardware guide (nvidia.com/en-us/products/workstations/dgx-spark, "
                 "docs.nvidia.com/dgx/dgx-spark): GB10, 128 GB LPDDR5x unified, 273 GB/s, 1 PFLOP FP4 with sparsity, "
                 "ConnectX-7 200 Gb/s. Dense FP4 = 1000/2 = 500 TFLOP/s; FP8 = FP4/2; BF16 = FP4/8 (GeForce-class "
                 "Blackwell ratio, RTX 5070-sized GPU: 6144 CUDA cores) = 62.5, matching ~60 TFLOP/s BF16 measured by "
                 "J. Carmack / A. Hannun (Oct 2025)")

PROFILES: dict[str, Hardware] = {
    "dgx-spark": Hardware(
        name="dgx-spark", device="cuda", unified=True, gpu_name="NVIDIA GB10",
        memory_bytes=128 * GB, reserved_bytes=4 * GiB,  # DGX OS + desktop at idle (estimate); MemTotal ~119.7 GiB
        bandwidth=273 * GB, flops={"bf16": 62.5 * TB, "fp16": 62.5 * TB, "fp8": 250 * TB, "fp4": 500 * TB, "fp32": 31 * TB},
        cpu_cores=20, interconnect_bandwidth=25 * GB, interconnect_latency_s=20e-6,
        runtime_bytes=5 * GiB // 2, source=_SPARK_SOURCE),
    "dgx-station": Hardware(
        name="dgx-station", device="cuda", unified=True, gpu_name="NVIDIA GB300",
        # 288 GB HBM3e at 8 TB/s on the GPU + 496 GB LPDDR5X at 396 GB/s on the CPU, coherent (784 GB).
        # We plan on the HBM alone (what a model streams from at full speed); see notes.
        memory_bytes=288 * GB, reserved_bytes=0, bandwidth=8 * TB,
        flops={"bf16": 2.5e15, "fp16": 2.5e15, "fp8": 5e15, "fp4": 15e15, "fp32": 80 * TB},
        cpu_cores=72, runtime_bytes=3 * GiB,
        source="NVIDIA DGX Station product page (nvidia.com/en-us/products/workstations/dgx-station): GB300 Grace "
               "Blackwell Ultra Desktop Superchip, 288 GB HBM3e 8 TB/s GPU memory, 496 GB LPDDR5X 396 GB/s CPU memory; "
               "dense Blackwell Ultra FLOP/s from NVIDIA's Blackwell Ultra technical blog (NVFP4 15 PFLOP/s dense)",
        notes=("the 496 GB of CPU LPDDR5X (396 GB/s) is not counted: a model spilling into it decodes ~20x slower",)),
    "rtx-4090": Hardware(
        name="rtx-4090", device="cuda", gpu_name="NVIDIA GeForce RTX 4090",
        memory_bytes=24 * GiB, reserved_bytes=GiB // 2,  # display + driver
        bandwidth=1008 * GB, flops={"bf16": 165.2 * TB, "fp16": 165.2 * TB, "fp8": 330.3 * TB, "fp32": 82.6 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 24 GB GDDR6X, 1008 GB/s; FP16/BF16 tensor "
               "165.2 TFLOP/s dense with FP32 accumulate, FP8 330.3"),
    "rtx-5090": Hardware(
        name="rtx-5090", device="cuda", gpu_name="NVIDIA GeForce RTX 5090",
        memory_bytes=32 * GiB, reserved_bytes=GiB // 2,
        bandwidth=1792 * GB, flops={"bf16": 209.5 * TB, "fp16": 209.5 * TB, "fp8": 419 * TB, "fp4": 1676 * TB, "fp32": 104.8 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA RTX Blackwell GPU architecture whitepaper / GeForce RTX 5090 page: 32 GB GDDR7, 1792 GB/s; "
               "FP16 tensor 838 TFLOP/s sparse with FP16 accumulate -> 209.5 dense with FP32 accumulate; FP8 419; "
               "FP4 3352 AI TOPS sparse -> 1676 dense"),
    "a100-80g": Hardware(
        name="a100-80g", device="cuda", gpu_name="NVIDIA A100-SXM4-80GB",
        memory_bytes=80 * GiB, bandwidth=2039 * GB, flops={"bf16": 312 * TB, "fp16": 312 * TB, "fp32": 19.5 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 80 GB HBM2e, 2039 GB/s (SXM), "
               "BF16 312 TFLOP/s dense"),
    "h100-80g": Hardware(
        name="h100-80g", device="cuda", gpu_name="NVIDIA H100 80GB HBM3",
        memory_bytes=80 * GiB, bandwidth=3350 * GB, flops={"bf16": 989.5 * TB, "fp16": 989.5 * TB, "fp8": 1979 * TB, "fp32": 67 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 80 GB HBM3, 3.35 TB/s, BF16 1979 "
               "TFLOP/s with sparsity -> 989.5 dense, FP8 3958 -> 1979 dense"),
    "h200": Hardware(
        name="h200", device="cuda", gpu_name="NVIDIA H200",
        memory_bytes=141 * GB, bandwidth=4800 * GB, flops={"bf16": 989.5 * TB, "fp16": 989.5 * TB, "fp8": 1979 * TB, "fp32": 67 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 141 GB HBM3e, 4.8 TB/s, BF16 989.5 "
               "TFLOP/s dense, FP8 1979 dense"),
    "mac-m3-ultra-512": Hardware(
        name="mac-m3-ultra-512", device="mps", unified=True, gpu_name="Apple M3 Ultra (80-core GPU)",
        # macOS wires at most ~75% of RAM for the GPU by default (iogpu.wired_limit_mb raises it).
        memory_bytes=512 * GiB, reserved_bytes=128 * GiB,
        bandwidth=819 * GB, flops={"bf16": 28.4 * TB, "fp16": 28.4 * TB, "fp32": 28.4 * TB},
        cpu_cores=32, runtime_bytes=GiB,
        source="Apple Mac Studio (2025) tech specs (apple.com/mac-studio/specs): M3 Ultra, up to 512 GB unified memory, "
               "819 GB/s. Apple publishes no FLOP/s: 80 GPU cores x 128 ALUs x 2 FLOP x ~1.39 GHz = 28.4 TFLOP/s "
               "(FP16 at FP32 rate), our derivation"),
    "strix-halo-128": Hardware(
        name="strix-halo-128", device="cuda", unified=True, gpu_name="AMD Radeon 8060S (Ryzen AI Max+ 395)",
        memory_bytes=128 * GiB, reserved_bytes=8 * GiB,
        bandwidth=256 * GB, flops={"bf16": 59.4 * TB, "fp16": 59.4 * TB, "fp32": 29.7 * TB},
        cpu_cores=16, runtime_bytes=5 * GiB // 2,
        source="AMD Ryzen AI Max+ 395 product page (amd.com): 128 GB LPDDR5X-8000 on a 256-bit bus = 256 GB/s, "
               "Radeon 8060S 40 CUs at up to 2.9 GHz; FP16/BF16 WMMA 40 x 512 FLOP/clk x 2.9 GHz = 59.4 TFLOP/s "
               "(our derivation from RDNA 3.5 rates); no FP8/FP4 matrix units",
        notes=("ROCm exposes the GPU as 'cuda' in PyTorch; the BIOS carve-out (up to 96 GB) plus GTT decides how much "
               "of the 128 GB the GPU may map",)),
}

_MULTIPLE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(.+)$")


def profile(name: str) -> Hardware:
    """A named profile, or ``N x`` one (``2xdgx-spark``, ``4x h100-80g``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower()
    m = _MULTIPLE.match(key)
    if m:
        return profile(m.group(2)).times(int(m.group(1)))
    if key in PROFILES:
        return PROFILES[key]
    raise KeyError(f"unknown hardware profile {name!r}; known: {', '.join(PROFILES)} (or N x one of them, e.g. 2xdgx-spark)")


# ====================================================================== detection


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def _cgroup_limit() -> tuple[int | None, int | None]:
    """(memory limit, current usage) of this process's cgroup, or None where unlimited/unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_f).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None, None
        try:
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            usage = None
        return int(raw), usage
    return None, None


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of system memory for this process, honouring a cgroup limit."""
    mi = _meminfo()
    total, avail = mi.get("MemTotal"), mi.get("MemAvailable")
    if total is None:
        try:
            import psutil

            vm = psutil.virtual_memory()
            total, avail = vm.total, vm.available
        except ImportError:  # pragma: no cover - non-Linux without psutil
            total = avail = 0
    avail = avail if avail is not None else total
    limit, usage = _cgroup_limit()
    if limit is not None:
        total = min(total, limit)
        if usage is not None:
            avail = min(avail, max(0, limit - usage))
    return int(total), int(avail)


def cpu_cores() -> int:
    """Cores this process may run on (affinity mask, else os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


UNIFIED_GPU_NAMES = ("GB10", "Orin", "Thor", "Xavier", "Tegra", "Jetson", "GH200 480GB")


@dataclass(frozen=True)
class GPUInfo:
    """One CUDA device as PyTorch reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]
    multiprocessors: int
    unified: bool


def cuda_devices() -> list[GPUInfo]:
    """Every visible CUDA device; empty when torch has no CUDA. Initializes the CUDA context."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.cuda.is_available():
        return []
    total_sys, avail_sys = system_memory()
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:  # pragma: no cover - some integrated GPUs do not answer
            free, total = 0, int(getattr(p, "total_memory", 0))
        integrated = bool(getattr(p, "is_integrated", False))
        # A unified-memory GPU reports no memory of its own (nvidia-smi: "Not Supported"); PyTorch then
        # shows the system's memory. Treat it as one pool with the CPU so it is not counted twice.
        unified = integrated or any(n.lower() in p.name.lower() for n in UNIFIED_GPU_NAMES) or total == 0 \
            or (total_sys > 0 and abs(total - total_sys) < 0.05 * total_sys)
        if unified:
            total, free = total_sys, avail_sys
        out.append(GPUInfo(i, p.name, int(total), int(free), (p.major, p.minor), p.multi_processor_count, unified))
    return out


def fingerprint(device: str = "cpu") -> str:
    """A string that changes when the machine or the device under it does (calibrations are keyed by it)."""
    total, _ = system_memory()
    base = f"{platform.machine()}|{cpu_name()}|{cpu_cores()}c|{round(total / GiB)}GiB"
    if device.startswith("cuda"):
        try:
            import torch

            idx = int(device.split(":")[1]) if ":" in device else 0
            base += f"|{torch.cuda.get_device_name(idx)}"
        except Exception:  # pragma: no cover - no CUDA
            pass
    return base


def _match_profile(gpu_name: str) -> Hardware | None:
    n = gpu_name.lower()
    table = [("gb10", "dgx-spark"), ("gb300", "dgx-station"), ("4090", "rtx-4090"), ("5090", "rtx-5090"),
             ("a100", "a100-80g"), ("h200", "h200"), ("h100", "h100-80g")]
    for needle, prof in table:
        if needle in n:
            return PROFILES[prof]
    return None


def detect(device: str | None = None, use_calibration: bool = True) -> Hardware:
    """This machine as the planner sees it.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available, else CPU).
        use_calibration: attach :func:`measure` results stored for this machine, if any.
    Returns:
        Hardware with ``available_bytes`` = memory free now on the device (system RAM for CPU and
        unified GPUs; free GPU memory for a discrete GPU).
    """
    total, avail = system_memory()
    cores = cpu_cores()
    gpus: list[GPUInfo] = []
    if device is None or device.startswith("cuda"):
        gpus = cuda_devices()
        if device is None:
            device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA device")
        idx = int(device.split(":")[1]) if ":" in device else 0
        g = gpus[idx]
        known = _match_profile(g.name)
        hw = Hardware(
            name=f"this machine ({g.name}{', unified memory' if g.unified else ''})", device="cuda",
            memory_bytes=g.total_bytes, available_bytes=g.free_bytes, unified=g.unified, cpu_cores=cores,
            bandwidth=known.bandwidth if known else 500 * GB,
            flops=dict(known.flops) if known else {"bf16": 100 * TB, "fp32": 20 * TB},
            runtime_bytes=(known.runtime_bytes if known else (5 * GiB // 2 if g.unified else GiB // 2)),
            gpu_name=g.name,
            source=(f"detected {g.name} (sm_{g.capability[0]}{g.capability[1]}, {g.multiprocessors} SMs); "
                    + (f"peaks from profile {known.name}" if known else "peaks unknown: guessed, run `ember hw --measure`")),
        )
    else:
        hw = Hardware(
            name=f"this machine ({cpu_name()}, {cores} cores)", device="cpu", memory_bytes=total,
            available_bytes=avail, cpu_cores=cores, unified=True,
            # Unmeasured CPU guesses: ~10 GB/s per core up to 100 GB/s, ~50 GFLOP/s fp32 per core.
            bandwidth=min(100, 10 * cores) * GB, flops={"fp32": 50e9 * cores, "bf16": 50e9 * cores},
            decode_efficiency=1.0, compute_efficiency=0.8,
            layer_overhead_s=200e-6, expert_overhead_s=40e-6, step_overhead_s=150e-6, runtime_bytes=300 * 2**20,
            source="detected; bandwidth/FLOP/s are guesses until `ember hw --measure` runs",
        )
    if use_calibration:
        cal = load_calibration(device_key(device))
        if cal is not None:
            hw = apply_calibration(hw, cal)
    return hw


def apply_calibration(hw: Hardware, cal: Calibration) -> Hardware:
    """``hw`` with measured bandwidth, FLOP/s, overheads and runtime memory."""
    big = max((pts[-1][1] for k, pts in cal.stream.items() if k.startswith("mv-") and pts), default=hw.bandwidth)
    return replace(
        hw, calibration=cal, bandwidth=big, decode_efficiency=1.0, runtime_bytes=cal.runtime_bytes,
        compute_efficiency=0.8,  # fraction of the *measured* matmul rate that whole-model prefill reaches
        flops={**hw.flops, **cal.matmul_flops},
        source=f"measured {cal.measured_at} ({cal.threads} threads, torch {cal.torch_version}); " + hw.source,
    )


# ====================================================================== measurement


def device_key(device: str) -> str:
    """``cpu`` or ``cuda:N`` (calibrations are stored per device under this key)."""
    d = str(device)
    if d.startswith("cuda"):
        return d if ":" in d else "cuda:0"
    return d


def cache_dir() -> Path:
    """``$EMBER_CACHE_DIR`` or ``~/.cache/ember``."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember")


def calibration_path() -> Path:
    return cache_dir() / "hardware.json"


def load_calibration(device: str = "cpu") -> Calibration | None:
    """The stored calibration for ``device`` of this machine, or None (none stored, other machine, old format)."""
    try:
        data = json.loads(calibration_path().read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
        return None
    device = device_key(device)
    entry = data.get("devices", {}).get(device)
    if not entry:
        return None
    try:
        cal = Calibration.from_json(entry)
    except (TypeError, ValueError):
        return None
    return cal if cal.fingerprint == fingerprint(device) else None


def save_calibration(cal: Calibration) -> Path:
    """Merge ``cal`` into the calibration file atomically (temp file, fsync, rename)."""
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
            data = {}
    except (OSError, json.JSONDecodeError):
        data = {}
    data["version"] = CALIBRATION_VERSION
    data.setdefault("devices", {})[cal.device] = cal.to_json()
    fd, tmp = tempfile.mkstemp(prefix=".hardware-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int, min_seconds: float = 0.25, max_repeats: int = 200) -> float:
    """Fastest of at least ``repeats`` calls (and at least ``min_seconds`` of calls): on a shared
    machine other processes only ever slow a call down, so the minimum is the machine's own speed."""
    fn()
    _sync(device)
    best = float("inf")
    n, start = 0, time.perf_counter()
    while n < repeats or (time.perf_counter() - start < min_seconds and n < max_repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def _ember_linear(x2, w):
    """What :class:`ember.models.Linear` runs for ``x2 (M, in) @ w.T``: Ember's CPU kernel where it applies."""
    import torch.nn.functional as F

    from ember import kernels

    y = kernels.dense(x2, w) if x2.device.type == "cpu" else None
    return y if y is not None else F.linear(x2, w)


def _stream_curve(device, dtype, rows: int, sizes: list[int], repeats: int,
                  min_seconds: float = 0.25, chunk: int = 4 << 20, cols: int = 4096) -> list[tuple[int, float]]:
    """Bytes/s of ``rows`` activation rows times weights totalling each working-set size.

    Like a decode step, the working set is many matrices (``chunk`` bytes each, 4096 wide) touched in
    turn, so a set larger than the cache this process actually gets (shared with other tenants) is
    streamed from memory, and each call pays what ember.models.Linear pays (:func:`_ember_linear`).
    """
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    pts = []
    for size in sizes:
        n_mats = max(1, size // chunk)
        n_rows = max(1, min(size, chunk) // (cols * elem))
        ws = [torch.full((n_rows, cols), 0.01, dtype=dtype, device=device) for _ in range(n_mats)]
        x = torch.full((rows, cols), 0.5, dtype=dtype, device=device)

        def fn(ws=ws, x=x):
            for w in ws:
                _ember_linear(x, w)
        t = _best_time(fn, device, repeats, min_seconds)
        nbytes = n_mats * n_rows * cols * elem
        pts.append((nbytes, nbytes / t))
        del ws, x
    return pts


def _decoder_shapes(hidden: int) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's seven matrices: q, k, v, o, gate, up, down (kv = H/4, MLP = 2.75 H)."""
    kv = max(64, hidden // 4)
    inter = max(64, int(2.75 * hidden) // 64 * 64)
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def _decoder_stream(device, dtype, rows: int, hidden: int, sizes: list[int], repeats: int,
                    min_seconds: float) -> list[tuple[int, float]]:
    """Bytes/s streaming whole decoder layers of ``hidden`` (as many as fill each working-set size)."""
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    shapes = _decoder_shapes(hidden)
    layer = sum(o * i for o, i in shapes) * elem
    pts = []
    for n in sorted({max(1, round(size / layer)) for size in sizes}):
        ws = [torch.full(s, 0.01, dtype=dtype, device=device) for _ in range(n) for s in shapes]
        xs = {i: torch.full((rows, i), 0.5, dtype=dtype, device=device) for _, i in shapes}

        def fn(ws=ws, xs=xs):
            for w in ws:
                _ember_linear(xs[w.shape[1]], w)
        t = _best_time(fn, device, repeats, min_seconds)
        pts.append((n * layer, n * layer / t))
        del ws, xs
    return sorted(pts)


def _quant_decoder_stream(device, dtype, mode: str, rows: int, hidden: int, sizes: list[int], repeats: int,
                          min_seconds: float) -> list[tuple[int, float]]:
    """Like :func:`_decoder_stream` for layers quantized with ``ember.quant`` (``mode`` int8/int4/nf4):
    bytes/s of the *stored* (quantized) weights through the quant package's own kernels."""
    import copy

    import torch

    from ember.quant import quantize_linear

    g = torch.Generator().manual_seed(0)
    layer_mods = []
    for o, i in _decoder_shapes(hidden):
        lin = torch.nn.Linear(i, o, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) * 0.02)
        layer_mods.append(quantize_linear(lin.to(device=device, dtype=dtype), mode))
    layer = sum(m.weight_bytes() for m in layer_mods)
    xs = {i: torch.full((rows, i), 0.5, dtype=dtype, device=device) for _, i in _decoder_shapes(hidden)}
    pts = []
    with torch.inference_mode():
        for n in sorted({max(1, round(size / layer)) for size in sizes}):
            mods = layer_mods + [copy.deepcopy(m) for _ in range(n - 1) for m in layer_mods]

            def fn(mods=mods):
                for m in mods:
                    m(xs[m.in_features])
            t = _best_time(fn, device, repeats, min_seconds)
            pts.append((n * layer, n * layer / t))
            del mods
    return pts


def _stream_efficiency(device, dtype, name: str, stream: dict, step_s: float, layer_s: float,
                       quant: str | None = None) -> float:
    """Fraction of the streaming rate a real decode step gets: a synthetic model (hidden 1536, six
    layers, vocab 16384, ~400 MB in bf16) decoded for 20 steps, its dispatch overhead subtracted.

    With ``quant`` (int8/int4/nf4) the model's projections are quantized as ``--quant`` does, and the
    prediction it is compared with streams them at the ``mv-{quant}`` rate and the rest (the 16-bit head
    and norms) at the ``mv-{name}`` rate, as :func:`ember.planner.decode_step_seconds` does."""
    import torch

    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=16384, hidden_size=1536, intermediate_size=4096,
                                     num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4))
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.reset_rope()
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.01) if quant is None else p.uniform_(-0.02, 0.02)  # quantizers want a range to scale
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters()) - cfg.vocab_size * cfg.hidden_size * \
        torch.empty(0, dtype=dtype).element_size()
    qbytes = 0
    if quant is not None:
        from ember.quant import QuantizedLinear, quantize_model

        float_proj = sum(mod.weight.numel() * mod.weight.element_size() for n, mod in m.named_modules()
                         if isinstance(mod, torch.nn.Linear) and not n.endswith("lm_head"))
        quantize_model(m, quant)
        qbytes = sum(mod.weight_bytes() for mod in m.modules() if isinstance(mod, QuantizedLinear))
        nbytes -= float_proj
    times = []
    with torch.inference_mode():
        cache = StaticKVCache(cfg, 1, 96, dtype, device)
        m(torch.zeros(1, 64, dtype=torch.long, device=device), None, cache, 0, last_only=True)
        cache.advance(64)
        for _ in range(24):
            t = time.perf_counter()
            m(torch.zeros(1, 1, dtype=torch.long, device=device), None, cache, cache.pos)
            _sync(device)
            times.append(time.perf_counter() - t)
            cache.advance(1)
    times = sorted(times[4:])
    measured = times[len(times) // 10]
    probe = Calibration(device="", fingerprint="", stream=stream, copy_bandwidth=0.0, matmul_flops={},
                        layer_overhead_s={}, expert_overhead_s={}, step_overhead_s={}, runtime_bytes=0)

    bw = probe.bandwidth(f"mv-{name}", nbytes + qbytes, cfg.hidden_size)
    qbw = probe.bandwidth(f"mv-{quant}", nbytes + qbytes, cfg.hidden_size) if quant else None
    streaming = measured - step_s - cfg.num_hidden_layers * layer_s
    del m
    if bw is None or streaming <= 0 or (quant and qbw is None):
        return 1.0
    predicted = nbytes / bw + (qbytes / qbw if quant else 0.0)
    return min(1.5, max(0.3, predicted / streaming))


def _train_step_efficiency(device, name: str, matmul_flops: float, hidden: int, layers: int, seq: int,
                           steps: int = 5, method: str = "lora") -> float:
    """Fraction of ``matmul_flops`` that real LoRA training steps reach on a synthetic Llama of
    ``hidden`` (MLP 2.75x, kv heads 1/4, vocab 8192; ``ember tune``'s settings: r=16 on every
    projection, dropout 0.05, AdamW, clipping; one sequence of ``seq`` tokens, loss on all):
    :func:`ember.planner.train_flops_per_token` x tokens / the median of ``steps`` steps after a
    warm-up (the median, like the tok/s ``ember tune`` shows: the fastest step is ~20% faster than
    a typical one on a shared 2-core machine). ``method="qlora"``: the base projections are NF4, as
    ``ember tune --method qlora`` loads them (the FLOPs counted are the same; the dequantization is
    what makes the steps slower).

    Raises:
        ImportError: this build has no ``ember.train`` (or, for QLoRA, no ``ember.quant``).
    """
    import statistics

    import torch

    from ember.config import ModelConfig
    from ember.models import Transformer
    from ember.planner import Workload, train_flops_per_token
    from ember.train.data import BatchPlan, Example
    from ember.train.trainer import TrainConfig, Trainer
    from ember.train.tune import prepare_model

    heads = max(1, hidden // 64)
    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=8192, hidden_size=hidden,
                                     intermediate_size=max(64, int(2.75 * hidden) // 64 * 64), num_hidden_layers=layers,
                                     num_attention_heads=heads, num_key_value_heads=max(1, heads // 4)))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.reset_rope()
    with torch.no_grad():
        for prm in m.parameters():
            prm.fill_(0.01)
    m.eval().requires_grad_(False)
    if method == "qlora":
        from ember.quant import quantize_model

        quantize_model(m, "nf4")
    tc = TrainConfig(method=method, rank=16, alpha=32, dropout=0.05, steps=steps + 1, lr=2e-4, batch=1, seq_len=seq,
                     grad_checkpoint=False, dtype=name, loss_on="all")
    prepare_model(m, tc)
    examples = [Example([3 + (7 * i + 13 * j) % (cfg.vocab_size - 3) for i in range(seq)], [True] * seq)
                for j in range(steps + 1)]
    tr = Trainer(m, BatchPlan(examples, 1, seq, shuffle=False), tc, None, progress=False)
    times = []
    for _ in range(steps + 1):  # the step reads its loss on the host: the device's work is done when it returns
        t = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t)
    wl = Workload(task="tune", method=method, context=seq, batch=1, dtype=name, lora_rank=16, grad_checkpointing=False)
    flops = train_flops_per_token(cfg, wl) * seq
    del tr, m
    return min(1.0, max(0.01, flops / statistics.median(times[1:]) / matmul_flops))


def _tiny_layer_mv_seconds(device, dtype) -> float:
    """Seconds of the seven matrix-vector calls of one hidden-64 layer (the overhead models' own layers)."""
    import torch

    ws = [torch.full((o, i), 0.01, dtype=dtype, device=device) for o, i in
          [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]]
    xs = {i: torch.full((1, i), 0.5, dtype=dtype, device=device) for i in (64, 128)}

    def fn():
        for w in ws:
            _ember_linear(xs[w.shape[1]], w)
    return _best_time(fn, device, 20, 0.05)


def _matmul_flops(device, dtype, n: int, repeats: int = 3, min_seconds: float = 0.25) -> float:
    import torch

    a = torch.full((n, n), 0.01, dtype=dtype, device=device)
    b = torch.full((n, n), 0.01, dtype=dtype, device=device)
    t = _best_time(lambda: a @ b, device, repeats, min_seconds)
    return 2 * n**3 / t


def _decode_step_time(device, dtype, layers: int, experts_per_tok: int = 0, steps: int = 40) -> float:
    """Median-ish seconds of one decode step of a tiny model (all dispatch, no bandwidth)."""
    import torch

    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    raw = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2)
    if experts_per_tok:
        raw.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=experts_per_tok, moe_intermediate_size=64)
    cfg = ModelConfig.from_dict(raw)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    times = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up round, then the timed one
            cache = StaticKVCache(cfg, 1, 32 + steps, dtype, device)
            model(torch.zeros(1, 32, dtype=torch.long, device=device), None, cache, 0)
            cache.advance(32)
            tok = torch.zeros(1, 1, dtype=torch.long, device=device)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                logits = model(tok, torch.full((1, 1), cache.pos, device=device), cache, cache.pos)[:, -1]
                cache.advance(1)
                tok = logits.argmax(-1, keepdim=True)
                tok.item()  # the engine reads the token on the host every step
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 10]  # 10th percentile: other processes on a shared machine only add time


def runtime_probe(device: str = "cpu") -> tuple[int, int]:
    """Do in *this* process what every Ember process does before its model, and report its memory.

    Imports the engine, builds a model on the meta device (which pulls in ~800 more torch modules),
    and runs a prefill and decode steps in fp32 and bf16 so the kernels' code pages are resident.
    Returns (peak RSS so far, CUDA context bytes). Call it in a fresh process
    (:func:`measure_runtime_bytes`) for a clean number.
    """
    import torch

    import ember.engine  # noqa: F401
    import ember.loading  # noqa: F401
    import ember.sampling  # noqa: F401
    import ember.tokenizer  # noqa: F401
    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    dev = torch.device(device)
    free0 = 0
    if dev.type == "cuda":
        torch.cuda.init()
        free0, _ = torch.cuda.mem_get_info(dev)
    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=dev)
    m.reset_rope()
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.01)
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            m = m.to(dt)
            c = StaticKVCache(cfg, 2, 72, dt, dev)
            m(torch.zeros(2, 64, dtype=torch.long, device=dev), None, c, 0, last_only=True)
            c.advance(64)
            for _ in range(3):
                m(torch.zeros(2, 1, dtype=torch.long, device=dev), None, c, c.pos)
                c.advance(1)
                m(torch.zeros(1, 1, dtype=torch.long, device=dev), None, None, 0)
    ctx = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        free1, _ = torch.cuda.mem_get_info(dev)
        ctx = max(0, free0 - free1 - torch.cuda.memory_reserved(dev))
    del m
    return peak_rss_bytes(), ctx


def peak_rss_bytes() -> int:
    """This process's own peak RSS: VmHWM (ru_maxrss would inherit a parent's peak across fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure_runtime_bytes(device: str = "cpu") -> tuple[int, int]:
    """(peak RSS, CUDA context bytes) of a fresh process after :func:`runtime_probe` (a subprocess, so
    the number is not polluted by what this process already holds)."""
    code = f"from ember.hardware import runtime_probe; print(*runtime_probe({device!r}))"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"measuring the runtime baseline failed: {out.stderr.strip().splitlines()[-1:]}")
    rss, ctx = out.stdout.split()[-2:]
    return int(rss), int(ctx)


def measure(device: str = "cpu", quick: bool = False, save: bool = True, progress=None,
            threads: int | None = None, runtime: bool = True) -> Calibration:
    """Time this machine with Ember's own kernels and store the result for the planner.

    Measures, on ``device``: streaming bandwidth of one-row (``mv``) and four-row (``mm``) products
    over weight matrices of 16 MiB .. 1 GiB (past every cache; CPU) or 64 MiB .. 2 GiB (GPU), in fp32
    and bf16 (fp16 too on CUDA); a large matmul's FLOP/s; the per-layer, per-expert and per-step
    dispatch time of a decode step (tiny models of 2 and 6 layers, and MoE with 1 and 4 experts per
    token); the quantized kernels' streaming rates and (CPU) their share of a real quantized decode step;
    the fraction of the matmul rate real LoRA and QLoRA training steps reach (synthetic models of two
    hidden sizes); and the RSS of a fresh Ember process. Takes ~60 s on 2 CPU cores (``quick``: ~5 s).

    Args:
        device: ``cpu`` or ``cuda[:N]``.
        quick: fewer sizes and repeats (tests).
        save: write the result to :func:`calibration_path` (atomically).
        progress: optional callable(str) told what is being measured.
        threads: CPU threads to measure with (default: torch's current setting, what Ember will use).
        runtime: also measure a fresh process's memory (a subprocess); else ``runtime_bytes`` is 0.
    Returns:
        the :class:`Calibration`.
    """
    import torch

    from ember.loading import device_supports_bf16

    if threads is not None and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure(device, quick, save, progress, None, runtime)
        finally:
            torch.set_num_threads(before)
    t_start = time.perf_counter()
    dev = torch.device(device)
    say = progress or (lambda s: None)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        sizes = [64 << 20, 256 << 20, 1 << 30] if quick else [64 << 20, 256 << 20, 1 << 30, 2 << 30]
        shaped_sizes = [256 << 20, 1 << 30]
        hiddens = (1024, 4096) if quick else (1024, 2048, 4096, 8192)
        mm_n = 4096 if quick else 8192
    else:
        sizes = [16 << 20, 128 << 20, 512 << 20] if quick else [16 << 20, 64 << 20, 256 << 20, 1 << 30]
        shaped_sizes = [64 << 20, 256 << 20] if quick else [64 << 20, 128 << 20, 512 << 20]
        hiddens = (512, 2048) if quick else (512, 1024, 2048, 4096)
        mm_n = 1024 if quick else 2048
    repeats = 3 if quick else 5
    min_s = 0.02 if quick else 0.25
    dtypes = {"fp32": torch.float32}
    if device_supports_bf16(dev):
        dtypes["bf16"] = torch.bfloat16
    if on_gpu:
        dtypes["fp16"] = torch.float16

    stream: dict[str, list[tuple[int, float]]] = {}
    flops: dict[str, float] = {}
    layer_s: dict[str, float] = {}
    expert_s: dict[str, float] = {}
    step_s: dict[str, float] = {}
    efficiency: dict[str, float] = {}
    for name, dt in dtypes.items():
        say(f"streaming bandwidth, {name}")
        for kind, rows in (("mv", 1), ("mm", 4)):
            stream[f"{kind}-{name}"] = _stream_curve(dev, dt, rows, sizes, repeats, min_s)
            for h in hiddens:
                stream[f"{kind}-{name}@{h}"] = _decoder_stream(dev, dt, rows, h, shaped_sizes, repeats, min_s)
        say(f"matmul FLOP/s, {name}")
        flops[name] = _matmul_flops(dev, dt, mm_n, min_seconds=min_s)
        say(f"decode-step overheads, {name}")
        steps, tries = (10, 1) if quick else (40, 3)
        # Best of three: other processes on a shared machine only ever make a step slower.
        best = lambda *a: min(_decode_step_time(dev, dt, *a, steps=steps) for _ in range(tries))  # noqa: E731
        a, b = best(2), best(6)
        # The tiny layers' seven matrix-vector calls are already in the decoder-shaped curves.
        per_layer = max(0.0, (b - a) / 4 - _tiny_layer_mv_seconds(dev, dt))
        m1, m4 = best(2, 1), best(2, 4)
        layer_s[name] = per_layer
        expert_s[name] = max(0.0, (m4 - m1) / (2 * 3))
        step_s[name] = max(0.0, a - 2 * per_layer)
        if dev.type == "cpu":  # on a GPU the dispatch overlaps the streaming; nothing to take out
            say(f"decode-step streaming efficiency, {name}")
            efficiency[name] = _stream_efficiency(dev, dt, name, stream, step_s[name], per_layer)

    # Training: LoRA steps of synthetic models in the dtype `ember tune` trains in here (bf16 where the
    # device runs it, else fp32), at two hidden sizes (the planner interpolates between them).
    train_eff: dict[str, list[tuple[int, float]]] = {}
    train_dt = "bf16" if "bf16" in dtypes else "fp32"
    if quick:
        shapes, seq = [(512, 2)], 128
    elif on_gpu:
        shapes, seq = [(2048, 4), (4096, 2)], 1024
    else:
        shapes, seq = [(768, 4), (2048, 2)], 512
    try:
        pts = []
        for h, layers in shapes:
            say(f"LoRA training steps, {train_dt}, hidden {h}")
            pts.append((h, _train_step_efficiency(dev, train_dt, flops[train_dt], h, layers, seq,
                                                  steps=2 if quick else 5)))
        train_eff[train_dt] = sorted(pts)
        if not quick:  # QLoRA: the same steps over NF4 base weights, dequantized in every pass
            pts = []
            for h, layers in shapes:
                say(f"QLoRA training steps, {train_dt}, hidden {h}")
                pts.append((h, _train_step_efficiency(dev, train_dt, flops[train_dt], h, layers, seq, steps=5,
                                                      method="qlora")))
            train_eff[f"{train_dt}-qlora"] = sorted(pts)
    except ImportError:  # a build without ember.train: the planner falls back to compute_efficiency
        pass

    try:  # quantized kernels, when the quant package is installed: their speed is theirs, not the bytes'
        import ember.quant as quant_pkg

        qdtype = torch.bfloat16 if "bf16" in dtypes else torch.float32
        for mode in quant_pkg.MODES:
            say(f"quantized streaming, {mode}")
            for kind, rows in (("mv", 1), ("mm", 4)):
                for h in (hiddens[0], hiddens[-2] if len(hiddens) > 2 else hiddens[-1]):
                    stream[f"{kind}-{mode}@{h}"] = _quant_decoder_stream(dev, qdtype, mode, rows, h,
                                                                         [64 << 20, 256 << 20],
                                                                         max(2, repeats - 2), min_s)
            qname = "bf16" if qdtype == torch.bfloat16 else "fp32"
            if dev.type == "cpu" and not quick:  # a real quantized decode: its kernels' share of the step
                say(f"decode-step streaming efficiency, {mode}")
                efficiency[mode] = _stream_efficiency(dev, qdtype, qname, stream, step_s[qname], layer_s[qname],
                                                      quant=mode)
    except ImportError:
        pass

    copy_n = (sizes[-1] // 4)
    src = torch.full((copy_n,), 1.0, device=dev)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), dev, repeats)
    copy_bw = 2 * copy_n * 4 / t
    del src, dst
    rss = ctx = 0
    if runtime:
        say("runtime memory of a fresh process")
        rss, ctx = measure_runtime_bytes(str(dev))
    key = device_key(str(dev))
    cal = Calibration(
        device=key, fingerprint=fingerprint(key), stream=stream,
        copy_bandwidth=copy_bw, matmul_flops=flops, layer_overhead_s=layer_s, expert_overhead_s=expert_s,
        step_overhead_s=step_s, stream_efficiency=efficiency, runtime_bytes=rss, context_bytes=ctx,
        train_efficiency=train_eff,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__, measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - t_start,
    )
    if save:
        save_calibration(cal)
    return cal


def describe_machine(hw: Hardware) -> list[tuple[str, str]]:
    """Rows for ``ember hw``: (field, value)."""
    rows = [("machine", hw.name), ("device", hw.device + (" (unified memory)" if hw.unified and hw.device != "cpu" else ""))]
    total, avail = system_memory()
    rows.append(("system memory", f"{total / GiB:.1f} GiB total, {avail / GiB:.1f} GiB available"))
    rows.append(("cpu", f"{cpu_name()}, {cpu_cores()} cores"))
    if hw.device == "cpu":
        from ember import kernels

        rows.append(("cpu kernels", kernels.status()))
    if hw.device == "cuda":
        rows.append(("gpu memory", f"{hw.memory_bytes / GiB:.1f} GiB total, {hw.usable_bytes / GiB:.1f} GiB free"
                     + (" (shared with the CPU)" if hw.unified else "")))
    c = hw.calibration
    if c is None:
        rows.append(("bandwidth", f"{hw.bandwidth / GB:.0f} GB/s (not measured: run `ember hw --measure`)"))
        rows.append(("matmul", ", ".join(f"{k} {v / TB:.2f} TFLOP/s" for k, v in hw.flops.items()) + " (guess)"))
    else:
        for k, pts in sorted(c.stream.items()):
            curve = ", ".join(f"{s / 2**20:.0f} MiB {b / GB:.1f}" for s, b in pts)
            rows.append((f"stream {k}", f"{curve} GB/s"))
        if c.stream_efficiency:
            rows.append(("in a decode step", ", ".join(f"{k} {100 * v:.0f}% of the streaming rate"
                                                       for k, v in c.stream_efficiency.items())))
        if c.train_efficiency:
            rows.append(("in a training step", "; ".join(
                f"{k.split('-')[0]} " + ", ".join(f"hidden {h}: {100 * e:.0f}%" for h, e in pts)
                + f" of the matmul rate ({'QLoRA' if k.endswith('-qlora') else 'LoRA'})"
                for k, pts in c.train_efficiency.items())))
        rows.append(("copy", f"{c.copy_bandwidth / GB:.1f} GB/s (read + write)"))
        rows.append(("matmul", ", ".join(f"{k} {v / TB:.2f} TFLOP/s" for k, v in c.matmul_flops.items())))
        rows.append(("decode overhead", ", ".join(
            f"{k}: {c.step_overhead_s[k] * 1e6:.0f} us/step + {c.layer_overhead_s[k] * 1e6:.0f} us/layer"
            f" + {c.expert_overhead_s[k] * 1e6:.0f} us/expert" for k in c.layer_overhead_s)))
        rows.append(("runtime memory", f"{c.runtime_bytes / 2**20:.0f} MiB RSS for a fresh Ember process"
                     + (f", CUDA context {c.context_bytes / 2**20:.0f} MiB" if c.context_bytes else "")))
        rows.append(("measured", f"{c.measured_at}, {c.threads} threads, torch {c.torch_version}, {c.seconds:.0f} s; "
                     f"{calibration_path()}"))
    return rows
