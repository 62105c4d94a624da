"""``--pp N`` / ``--tp N`` on one host: start N workers with torch's elastic agent, as ``torchrun --standalone``.

The agent (:func:`torch.distributed.launcher.api.elastic_launch`) runs ``python -m ember ARGS`` N times with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), watches them, and when one exits with an
error stops the others (SIGTERM, then SIGKILL after a grace period), so no worker outlives a failed run. The
failure it reports names the rank and its exit code; the rank itself has printed what it was doing.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from ember.errors import DistributedError

MODE_ENV = "EMBER_PARALLEL"  # the mode the launcher chose, read by the workers
# seconds the agent waits after SIGTERM before it SIGKILLs a worker that does not exit
SHUTDOWN_GRACE_S = 5


def launch(nproc: int, mode: str, argv: list[str]) -> int:
    """Run ``ember ARGV`` as ``nproc`` workers in ``mode`` ("pp" | "tp" | "dp"); returns the exit status.

    Raises:
        DistributedError: a worker failed (naming its rank and exit code or signal).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the agent's info lines are not the user's business
    os.environ[MODE_ENV] = mode
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn", shutdown_timeout=SHUTDOWN_GRACE_S)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ember", *argv)
    except ChildFailedError as e:
        raise DistributedError(describe_failures(e.failures)) from None
    return 0


def describe_failures(failures: dict) -> str:
    """One line naming each failed rank and how it ended (exit code or signal), first failure first."""
    parts = []
    for rank, f in sorted(failures.items(), key=lambda kv: kv[1].timestamp):
        how = f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        parts.append(f"rank {rank} failed ({how})")
    return "; ".join(parts) + "; the other ranks were stopped"
