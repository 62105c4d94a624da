"""Splitting one model over several processes or machines, and what their link costs per token.

* :func:`layer_bytes` prices every decoder layer's weights (the same per-matrix bytes as
  :func:`~ember.planner.memory.weight_bytes`), so a pipeline split can balance memory;
* :func:`split_layers` cuts the layers into contiguous stages whose largest share is as small as it can be;
* :func:`comm_seconds_per_token` predicts what the interconnect adds to one decode step for pipeline
  (``pp``) and tensor (``tp``) parallelism (docs/distributed.md has the equations).
"""

from __future__ import annotations

from ember.config import ModelConfig
from ember.hardware import Hardware
from ember.planner.memory import linear_bytes, linears, part_quant
from ember.planner.workload import DTYPE_BYTES

# bytes of one fp32 logit: the last stage broadcasts the step's logits in the compute dtype, priced at fp32
LOGIT_BYTES = 4


def layer_bytes(cfg: ModelConfig, dtype: str = "bf16", quant: str = "none") -> list[float]:
    """Weight bytes of each decoder layer (projections, experts, routers) with Linear layers stored as ``quant``."""
    b = DTYPE_BYTES[dtype]
    L = cfg.num_hidden_layers
    moe = [cfg.is_moe_layer(i) for i in range(L)]
    n_moe = sum(moe)
    every = dense = sparse = 0.0
    for lin in linears(cfg):
        if lin.kind == "lm_head":
            continue
        nbytes = lin.count * linear_bytes(lin.out_f, lin.in_f, part_quant(cfg, lin.kind, quant), b)
        if lin.kind == "attention":
            every += nbytes / L
        elif lin.kind == "experts" or (lin.kind == "mlp" and n_moe and lin.count == n_moe
                                       and lin.out_f != cfg.intermediate_size and lin.in_f != cfg.intermediate_size):
            sparse += nbytes / n_moe  # experts and shared experts live in the MoE layers
        else:
            dense += nbytes / (L - n_moe)
    router = cfg.num_local_experts * cfg.hidden_size * b if n_moe else 0.0
    return [every + (sparse + router if m else dense) for m in moe]


def split_layers(costs: list[float], parts: int, first_extra: float = 0.0,
                 last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges, one per stage, minimising the largest stage's total.

    Args:
        costs: per-layer cost (bytes).
        parts: number of stages (at most ``len(costs)``).
        first_extra / last_extra: what the first stage (embedding) and last stage (final norm, LM head) hold
            beside their layers.
    """
    L = len(costs)
    if not 1 <= parts <= L:
        raise ValueError(f"cannot split {L} layers into {parts} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage(a: int, b: int, k: int) -> float:
        return prefix[b] - prefix[a] + (first_extra if k == 0 else 0.0) + (last_extra if k == parts - 1 else 0.0)

    # best[k][i]: the smallest largest-stage total putting layers [0, i) into k + 1 stages
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(parts)]
    cut = [[0] * (L + 1) for _ in range(parts)]
    for i in range(1, L + 1):
        best[0][i] = stage(0, i, 0)
    for k in range(1, parts):
        for i in range(k + 1, L + 1):
            for j in range(k, i):
                v = max(best[k - 1][j], stage(j, i, k))
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], L
    for k in range(parts - 1, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    bounds.append((0, i))
    return bounds[::-1]


def comm_seconds_per_token(cfg: ModelConfig, hw: Hardware, mode: str, ranks: int, batch: int = 1,
                           dtype: str = "bf16") -> float:
    """Seconds the link adds to one decode step of ``batch`` sequences split over ``ranks`` processes.

    Pipeline: ``ranks - 1`` hops of the hidden state (B x hidden) plus one broadcast of the logits
    (B x vocab). Tensor: two all-reduces of the hidden state per layer (after attention and after the MLP),
    each a ring all-reduce moving ``2 (n-1)/n`` of the tensor and paying ``2 (n-1)`` latencies.

    Args:
        hw: the machine; its ``interconnect_bandwidth`` (bytes/s) and ``interconnect_latency_s`` price the link
            between nodes; on one node, the loopback ``ember hw --measure`` recorded (its calibration).
        mode: "pp" or "tp".
    """
    if ranks <= 1:
        return 0.0
    bw = hw.interconnect_bandwidth
    lat = hw.interconnect_latency_s
    cal = hw.calibration
    if hw.nodes == 1 and cal is not None and cal.loopback_bandwidth:  # processes of one host: its measured loopback
        bw, lat = cal.loopback_bandwidth, cal.loopback_latency_s
    hidden = batch * cfg.hidden_size * DTYPE_BYTES[dtype]

    def move(nbytes: float) -> float:
        return nbytes / bw if bw else 0.0

    if mode == "pp":
        logits = batch * cfg.vocab_size * LOGIT_BYTES
        return (ranks - 1) * (lat + move(hidden)) + lat + move(logits)
    if mode == "tp":
        per_reduce = 2 * (ranks - 1) * lat + move(2 * (ranks - 1) / ranks * hidden)
        return 2 * cfg.num_hidden_layers * per_reduce
    raise ValueError(f"mode must be 'pp' or 'tp', got {mode!r}")
