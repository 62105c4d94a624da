"""The offload option: a model that does not fit runs with part of its weights read from disk (docs/offload.md).

A mixture-of-experts model keeps everything but its routed experts resident and gives the rest of the budget to
an expert cache; a dense model keeps its leading layers resident and streams the others, with room for
``ahead + 1`` streamed layers. Per decode token the disk delivers

    experts:  (1 - h) x k x (bytes of one expert) x (MoE layers)       h: the cache's hit rate
    layers:   the bytes of every streamed layer

and the step takes the in-memory step (:func:`~ember.planner.speed.decode_step_seconds`) plus that many bytes at
the measured disk read rate (``ember hw --measure``; :data:`DEFAULT_DISK_BANDWIDTH` otherwise). The reads overlap
the compute (prefetch, read-ahead), so the sum is the conservative end of the estimate.

The expected hit rate is the cache's share of each layer's experts, ``h = slots / E`` with ``slots`` the experts
per layer the cache holds: what uniform routing gives. Real routers favour some experts, so LFU keeps the
favoured ones and measured hit rates come out higher (``bench/offload.py`` measures it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ember.config import ModelConfig
from ember.hardware import Hardware
from ember.planner.memory import weight_bytes
from ember.planner.workload import Workload

DEFAULT_DISK_BANDWIDTH = 1.5e9  # bytes/s assumed without a measurement: a PCIe 3 NVMe drive's sequential read


@dataclass
class OffloadPlan:
    """How a model that does not fit would run with offload."""

    mode: str                   # "experts" or "layers"
    fits: bool                  # the resident part and the minimal cache fit the budget
    budget: float               # bytes for weights + cache + KV + activations (per node)
    resident: float             # weight bytes kept in memory outside the cache
    cache: float                # expert cache / streamed-layer room, bytes
    reserve: float              # KV cache + activations (+ runtime), bytes
    hit_rate: float             # expected (experts); 0 for layers
    disk_bytes_per_token: float
    disk_bandwidth: float       # bytes/s used for the estimate
    disk_measured: bool
    decode_tok_s: float         # predicted, in-memory step + disk reads
    disk_roofline_tok_s: float  # disk_bandwidth / disk_bytes_per_token
    needs_quantize: bool = False  # quantized experts are read from an `ember quantize` folder: make it first

    def to_json(self) -> dict:
        return asdict(self)


def disk_bandwidth(hw: Hardware) -> tuple[float, bool]:
    """(bytes/s, measured) of the disk models are read from: ``ember hw --measure``'s O_DIRECT rate, else the guess."""
    c = hw.calibration
    bw = getattr(c, "disk_read_bandwidth", 0.0) if c is not None else 0.0
    return (bw, True) if bw else (DEFAULT_DISK_BANDWIDTH, False)


def offload_plan(cfg: ModelConfig, hw: Hardware, wl: Workload, usable: float, reserve: float,
                 step_seconds: float, stored_quant: bool = False) -> OffloadPlan | None:
    """The offload option for ``wl`` within ``usable`` bytes (per node), ``reserve`` of them for KV + activations.

    Quantized experts are read as an ``ember quantize`` folder stores them; a float folder planned with a quant
    gets ``needs_quantize`` (the loader refuses quantizing on every read).

    Args:
        step_seconds: the in-memory decode step's seconds (:func:`~ember.planner.speed.decode_step_seconds`).
        stored_quant: the checkpoint is already stored in ``wl.quant`` (a folder from ``ember quantize``).
    Returns:
        the plan, or None where offload does not apply (training, several nodes, quantized dense layers).
    """
    quantized = wl.weight_quant != "none"
    if wl.task != "infer" or hw.nodes > 1 or (quantized and not cfg.num_local_experts):
        return None
    from ember.offload.layers import DEFAULT_AHEAD  # noqa: PLC0415  (the streamer's own read-ahead; torch only when planning offload)

    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    bw, measured = disk_bandwidth(hw)
    if wb.moe_layers and wb.experts:
        one = wb.experts / (wb.moe_layers * wb.experts_per_layer)
        resident = wb.total - wb.experts
        cache = usable - reserve - resident
        fits = cache >= wb.experts_per_tok * one
        slots = max(0.0, cache) / one / wb.moe_layers  # experts per layer the cache holds
        hit = min(1.0, slots / wb.experts_per_layer)
        disk = (1 - hit) * wb.experts_per_tok * one * wb.moe_layers
        mode = "experts"
    else:
        L = cfg.num_hidden_layers
        per_layer = (wb.attention + wb.mlp + wb.other) / L
        resident_base = wb.embedding + wb.lm_head
        room = (min(DEFAULT_AHEAD, L - 1) + 1) * per_layer
        left = usable - reserve - resident_base - room
        fits = left >= 0
        keep = min(L, int(max(0.0, left) // per_layer)) if per_layer else L
        resident = resident_base + keep * per_layer
        cache = room
        hit = 0.0
        disk = (L - keep) * per_layer
        mode = "layers"
    t = step_seconds + disk / bw
    return OffloadPlan(mode=mode, fits=fits, budget=usable, resident=resident, cache=max(0.0, cache),
                       reserve=reserve, hit_rate=hit, disk_bytes_per_token=disk, disk_bandwidth=bw,
                       disk_measured=measured, decode_tok_s=1 / t,
                       disk_roofline_tok_s=bw / disk if disk else float("inf"),
                       needs_quantize=quantized and not stored_quant)
