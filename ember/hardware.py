"""Machine facts: what a machine offers the planner (memory, bandwidth, FLOP/s, how fast Ember runs there).

Three sources, in order of trust:

1. A calibration: :func:`ember.calibrate.measure` (``ember hw --measure``) times *this* machine with
   Ember's own kernels and stores the result as JSON under ``~/.cache/ember/`` (``EMBER_CACHE_DIR``
   overrides). :func:`detect` attaches it when the machine fingerprint matches.
2. :func:`detect` reads RAM (and a cgroup limit), cores, CUDA devices and their memory. A GPU that
   shares system memory (GB10 in the DGX Spark, Jetson, Apple silicon) is *unified*: its memory is
   the system's, not an extra pool.
3. :data:`PROFILES`: named machines with vendor-sheet numbers (:mod:`ember.catalog.machines`, the
   source in each entry), for planning a machine you do not have: ``dgx-spark``, ``h100-80g``, ...,
   and ``2xdgx-spark``-style multiples.

FLOP/s are *dense* (no 2:4 sparsity) peaks with FP32 accumulation, the rate PyTorch matmuls get.
Units: bytes, bytes/s, FLOP/s, seconds; ``GiB`` = 2**30 bytes, ``GB`` = 1e9 bytes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.catalog.machines import GB, MACHINES, TB, GiB

__all__ = ["GB", "GiB", "TB", "Calibration", "Hardware", "PROFILES", "profile", "detect", "apply_calibration",
           "system_memory", "cpu_cores", "cpu_name", "cuda_devices", "fingerprint", "device_key", "cache_dir",
           "calibration_path", "load_calibration", "save_calibration", "describe_machine"]

CALIBRATION_VERSION = 1


# ====================================================================== data


@dataclass(frozen=True)
class Calibration:
    """What :func:`ember.calibrate.measure` found on one device of one machine (all figures achieved, not peak).

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
    disk_read_bandwidth: float = 0.0           # bytes/s of O_DIRECT reads from the cache dir's disk (0: not measured)
    disk_direct: bool = False                  # that rate bypassed the page cache (O_DIRECT, else fadvise)
    loopback_latency_s: float = 0.0           # one-way gloo latency between two processes here (0: not measured)
    loopback_bandwidth: float = 0.0           # bytes/s between two processes here (PP/TP on one host)
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
        calibration: measurements of this machine, when :func:`ember.calibrate.measure` has run.
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



# Named machines (ember.catalog.machines holds their spec-sheet figures and sources).
PROFILES: dict[str, Hardware] = {name: Hardware(**spec) for name, spec in MACHINES.items()}

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
    import torch

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
        use_calibration: attach :func:`ember.calibrate.measure` results stored for this machine, if any.
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


# ====================================================================== stored calibrations


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
        if c.disk_read_bandwidth:
            rows.append(("disk read", f"{c.disk_read_bandwidth / GB:.2f} GB/s ("
                         + ("O_DIRECT" if c.disk_direct else "page cache dropped with fadvise, no O_DIRECT")
                         + "; what offloaded weights are read at)"))
        rows.append(("matmul", ", ".join(f"{k} {v / TB:.2f} TFLOP/s" for k, v in c.matmul_flops.items())))
        rows.append(("decode overhead", ", ".join(
            f"{k}: {c.step_overhead_s[k] * 1e6:.0f} us/step + {c.layer_overhead_s[k] * 1e6:.0f} us/layer"
            f" + {c.expert_overhead_s[k] * 1e6:.0f} us/expert" for k in c.layer_overhead_s)))
        rows.append(("runtime memory", f"{c.runtime_bytes / 2**20:.0f} MiB RSS for a fresh Ember process"
                     + (f", CUDA context {c.context_bytes / 2**20:.0f} MiB" if c.context_bytes else "")))
        rows.append(("measured", f"{c.measured_at}, {c.threads} threads, torch {c.torch_version}, {c.seconds:.0f} s; "
                     f"{calibration_path()}"))
    return rows