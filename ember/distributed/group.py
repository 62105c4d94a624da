"""The process group of a multi-process run: who this process is, and talking to the others safely.

A run is launched by ``torchrun`` (or by ``--pp N`` / ``--tp N``, which start torch's elastic agent
themselves, :mod:`ember.distributed.launch`). Each worker reads the rendezvous from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins one process group:
gloo on the CPU, NCCL on CUDA. Rank 0 owns stdin/stdout (and the HTTP server); the other ranks write
nothing unless they fail.

Every point-to-point or collective call goes through :func:`guarded`, which names what this rank was doing
and with whom, so a peer that dies (connection reset) or hangs (the group's timeout) ends this rank with a
:class:`~ember.errors.DistributedError` that says so instead of a gloo traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ember.errors import DistributedError

# seconds any one send/recv/collective may wait for a peer after loading (a hung peer ends the run after this)
TIMEOUT_ENV = "EMBER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
# seconds the ranks may wait for each other while loading (a large model's ranks finish minutes apart)
LOAD_TIMEOUT_S = 1800.0
MODES = ("pp", "tp", "dp")
IDLE_TIMEOUT_S = 7 * 24 * 3600.0

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    mode: str            # "pp" | "tp" | "dp"
    device: torch.device
    step_group: object | None = None  # the group with the short timeout, used after loading
    control_group: object | None = None  # rank 0 -> followers: the next request (no practical timeout)
    doing: str = "starting"           # what this rank is doing now (named in errors)
    leads: bool = False               # rank 0 of a verb whose work the other ranks follow (chat)
    led: bool = False                 # ... and its engine announces each generation
    # tensor-parallel ranks per pipeline stage (``--pp P --tp T``: world = P T, rank = stage T + tp_rank); the
    # stage's group carries the tensor-parallel collectives (None: the step group, when there is one stage)
    tp: int = 1
    tp_group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> int:
        return self.world - 1

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def stages(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def stage_rank(self, stage: int) -> int:
        """The global rank of this rank's tensor-parallel peer in pipeline stage ``stage``."""
        return stage * self.tp + self.tp_rank


_current: Dist | None = None


def launched() -> bool:
    """Whether this process was started by torchrun / the elastic agent as one of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> Dist | None:
    """The run this process belongs to, or None when it runs alone."""
    return _current


def step_timeout_s() -> float:
    """The per-call timeout after loading (``EMBER_DIST_TIMEOUT`` seconds, default 60)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None


def init(mode: str, device: str | None = None, tp: int | None = None) -> Dist:
    """Join the process group torchrun's environment describes; silence stdout/stderr on ranks other than 0.

    Args:
        mode: "pp" (pipeline), "tp" (tensor) or "dp" (data parallel fine-tuning).
        device: "cpu", "cuda" or None (CUDA where available); CUDA ranks use NCCL on ``cuda:LOCAL_RANK``.
        tp: tensor-parallel ranks per pipeline stage (mode "pp" with ``--tp``); default: the whole world under
            "tp", 1 otherwise.
    Returns:
        The :class:`Dist` (also :func:`current`).
    """
    global _current
    if mode not in MODES:
        raise DistributedError(f"unknown parallel mode {mode!r}; expected one of {', '.join(MODES)}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=LOAD_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001  (rendezvous failures come as many types)
            raise DistributedError(f"rank {rank}: could not join the process group "
                                   f"({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {e}") from None
    step = dist.new_group(backend=backend, timeout=timedelta(seconds=step_timeout_s()))
    # the followers' wait for rank 0's next request (a chat user may think for a long time; a dead rank 0 still
    # ends the wait at once: its connections reset)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=IDLE_TIMEOUT_S))
    tp = tp or (world if mode == "tp" else 1)
    if world % tp:
        raise DistributedError(f"--tp {tp} does not divide the {world} processes; start --pp x --tp processes")
    stage_group = None
    if 1 < tp < world:  # one group per pipeline stage; every rank takes part in creating each
        for first in range(0, world, tp):
            g = dist.new_group(list(range(first, first + tp)), backend=backend,
                               timeout=timedelta(seconds=step_timeout_s()))
            if first <= rank < first + tp:
                stage_group = g
    _current = Dist(rank, world, local, mode, dev, step, control, tp=tp, tp_group=stage_group)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        sys.stderr = _QuietStderr()
        # an unexpected exception (a bug) still reaches the real stderr, with the rank
        sys.excepthook = lambda *exc: (print(f"[rank {rank}] unexpected error:", file=sys.__stderr__),
                                       traceback.print_exception(*exc, file=sys.__stderr__))
    return _current


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _current
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _current = None


class _QuietStderr(io.TextIOBase):
    """stderr of a rank other than 0: progress lines are dropped; :func:`report_failure` writes to the real one."""

    def write(self, s: str) -> int:
        return len(s)


def report_failure(message: str) -> None:
    """Write a failure line to the real stderr, whatever rank this is."""
    print(message, file=sys.__stderr__, flush=True)


def doing(what: str) -> None:
    """Record what this rank is doing now (named in an error if a peer fails during it)."""
    if _current is not None:
        _current.doing = what


def guarded(what: str, peer: int | None, fn: Callable[[], T]) -> T:
    """Run one communication call; a dead or hung peer becomes a :class:`DistributedError`.

    Args:
        what: the call in words ("receive activations", "broadcast logits").
        peer: the rank talked to (None for a collective over all ranks).
    """
    d = _current
    try:
        return fn()
    except DistributedError:
        raise
    except Exception as e:  # noqa: BLE001  (gloo/NCCL raise RuntimeError and DistBackendError alike)
        rank = d.rank if d else "?"
        if peer is None and d is not None and d.world == 2:
            peer = 1 - d.rank  # a collective of two: the peer is known
        with_whom = f"rank {peer}" if peer is not None else "the other ranks"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {rank} ({d.doing if d else '?'}): {what} with {with_whom} failed: {first}; "
                               f"{with_whom} died or hung for more than {step_timeout_s():.0f} s "
                               f"({TIMEOUT_ENV})") from None


def send(t: torch.Tensor, dst: int, what: str) -> None:
    """Send ``t`` to rank ``dst`` on the step group."""
    d = _current
    guarded(f"send {what}", dst, lambda: dist.send(t.contiguous(), dst, group=d.step_group))


def recv(t: torch.Tensor, src: int, what: str) -> torch.Tensor:
    """Receive into ``t`` from rank ``src`` on the step group; returns ``t``."""
    d = _current
    guarded(f"receive {what}", src, lambda: dist.recv(t, src, group=d.step_group))
    return t


def broadcast(t: torch.Tensor, src: int, what: str) -> torch.Tensor:
    """Broadcast ``t`` from rank ``src`` to every rank (in place); returns ``t``."""
    d = _current
    guarded(f"broadcast {what}", None if d.rank == src else src,
            lambda: dist.broadcast(t, src, group=d.step_group))
    return t


def broadcast_async(t: torch.Tensor, src: int, what: str) -> Callable[[], None]:
    """Start broadcasting ``t`` from rank ``src`` (in place); returns the wait, which raises as :func:`guarded`."""
    d = _current
    peer = None if d.rank == src else src
    work = guarded(f"broadcast {what}", peer, lambda: dist.broadcast(t, src, group=d.step_group, async_op=True))
    return lambda: guarded(f"broadcast {what}", peer, work.wait)


def all_reduce(t: torch.Tensor, what: str, op=dist.ReduceOp.SUM, stage: bool = False) -> torch.Tensor:
    """Sum ``t`` over every rank (``stage``: over this pipeline stage's tensor-parallel ranks) in place."""
    d = _current
    guarded(f"all-reduce {what}", None, lambda: dist.all_reduce(t, op=op, group=stage_group() if stage
                                                                 else d.step_group))
    return t


def stage_group() -> object:
    """The group of this rank's pipeline stage (its tensor-parallel ranks)."""
    d = _current
    return d.tp_group if d.tp_group is not None else d.step_group


def broadcast_object(obj: object, src: int, what: str) -> object:
    """A picklable Python object from rank ``src`` (only between our own processes: never from files)."""
    d = _current
    box = [obj]
    guarded(f"broadcast {what}", None if d.rank == src else src,
            lambda: dist.broadcast_object_list(box, src, group=d.step_group))
    return box[0]


def announce(obj: object) -> object:
    """Rank 0: send the followers their next piece of work (None: stop). Others: wait for it and return it."""
    d = _current
    box = [obj]
    guarded("wait for rank 0's next request" if d.rank else "announce the next request", 0 if d.rank else None,
            lambda: dist.broadcast_object_list(box, 0, group=d.control_group))
    return box[0]


def barrier(what: str, loading: bool = False) -> None:
    """Wait for every rank; ``loading``: on the default group, whose timeout covers loading a large model."""
    d = _current
    group = None if loading else d.step_group
    if d.device.type == "cpu":
        # gloo's monitored barrier names the rank that did not arrive
        guarded(what, None, lambda: dist.monitored_barrier(group=group, wait_all_ranks=True))
    else:
        guarded(what, None, lambda: dist.barrier(group=group))


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """``with phase("prefill"):`` records what this rank is doing for the length of the block."""
    d = _current
    before = d.doing if d else None
    doing(what)
    try:
        yield
    finally:
        if d is not None and before is not None:
            d.doing = before
