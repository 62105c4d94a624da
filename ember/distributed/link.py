"""Measuring the link between two processes of this machine (loopback, gloo): latency and bandwidth.

``ember hw --measure`` stores the result in the machine's calibration; the planner prices PP/TP hops on one
host with it (:func:`ember.planner.parallel.comm_seconds_per_token`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# the bandwidth probe: 4 MiB of bf16, the size of a long prompt's hidden states (TinyLlama: 1024 tokens)
PROBE_ELEMENTS = 1 << 21


def _pingpong(rank: int, port: int, out: str, reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        def one_way(n: int, times: int) -> float:
            t = torch.zeros(n, dtype=torch.bfloat16)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(times):
                if rank == 0:
                    dist.send(t, 1)
                    dist.recv(t, 1)
                else:
                    dist.recv(t, 0)
                    dist.send(t, 0)
            return (time.perf_counter() - t0) / (2 * times)

        one_way(1, 10)  # connect and warm up
        lat = min(one_way(1, reps) for _ in range(3))
        big = min(one_way(PROBE_ELEMENTS, max(2, reps // 20)) for _ in range(3))
        if rank == 0:
            Path(out).write_text(json.dumps({"latency_s": lat,
                                             "bandwidth": 2 * PROBE_ELEMENTS / max(big - lat, 1e-9)}))
    finally:
        dist.destroy_process_group()


def measure_loopback(reps: int = 200) -> tuple[float, float]:
    """(one-way latency in seconds, bandwidth in bytes/s) between two gloo processes on this machine."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "link.json")
        mp.spawn(_pingpong, args=(port, out, reps), nprocs=2, join=True)
        r = json.loads(Path(out).read_text())
    return r["latency_s"], r["bandwidth"]
