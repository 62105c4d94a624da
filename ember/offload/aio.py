"""Background disk reads: a small pool of I/O threads that keeps several ``pread`` calls in flight.

A :class:`Request` is a list of :class:`Chunk` reads (each a byte range of one file into a slice of a buffer)
and a completion function. The threads take chunks from one priority queue (lower first, FIFO within a
priority): demand reads (the layer computing now needs them) go ahead of speculative ones (the next layer's
predicted experts). ``os.preadv`` releases the GIL, so the reads overlap the forward pass and each other; the
disk sees up to ``threads`` requests at once, which a solid-state drive answers faster than one at a time.

When a request's last chunk is read, the thread that read it runs the completion (checks, tensor views,
building the module) and settles the request's :class:`~concurrent.futures.Future`: with the result, or with
the :class:`~ember.errors.CheckpointError` of a failed read, which the waiting forward pass raises. A request
none of whose chunks has started can be cancelled. :meth:`IOPool.close` (or the pool's collection) stops the
threads: queued requests fail with a ``CheckpointError``, nothing waits forever.

Counters (:class:`IOCounters`) are exact: chunks and bytes read, the summed wall time of the reads, the wall
time with at least one read in flight (so ``read_seconds / busy_seconds`` is the mean number in flight) and
the most in flight at once.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ember.errors import CheckpointError

IO_THREADS = 4  # reads in flight: enough to keep an NVMe queue busy, few enough for a small CPU
DEMAND, SPECULATIVE = 0, 1  # request priorities


@dataclass
class Chunk:
    """One read: ``length`` bytes of ``fd`` (file ``path``) at ``offset`` into ``view`` (a writable memoryview)."""

    fd: int
    path: Path
    offset: int
    length: int
    view: memoryview
    name: str  # the first tensor the range holds, for error messages
    got: int = 0


@dataclass
class IOCounters:
    """What an :class:`IOPool` has read since it was made (or :meth:`IOPool.reset_counters`)."""

    chunks: int = 0
    bytes: int = 0
    read_seconds: float = 0.0  # summed wall time of the chunk reads (overlapping reads each counted)
    busy_seconds: float = 0.0  # wall time with at least one read in flight
    max_in_flight: int = 0
    cancelled: int = 0         # requests cancelled before any of their chunks started

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean_in_flight"] = self.read_seconds / self.busy_seconds if self.busy_seconds else 0.0
        return d


class Request:
    """Chunks read in the background, then ``finish(chunks)`` on the I/O thread; its result in :attr:`future`."""

    __slots__ = ("chunks", "finish", "future", "left", "started", "cancelled", "error", "_pool")

    def __init__(self, pool: "IOPool", chunks: list[Chunk], finish: Callable[[list[Chunk]], object]) -> None:
        self.chunks, self.finish, self._pool = chunks, finish, pool
        self.future: Future = Future()
        self.left = len(chunks)
        self.started = self.cancelled = False
        self.error: BaseException | None = None

    def cancel(self) -> bool:
        """Drop the request if none of its chunks has started; True when dropped (its future is cancelled)."""
        return self._pool._cancel(self)

    def result(self, timeout: float | None = None):
        """Wait for the request; raises what its reads or completion raised."""
        return self.future.result(timeout)


def pread_into(chunk: Chunk) -> None:
    """Fill ``chunk.view`` from the file, stopping early only at the end of the file (``chunk.got`` says)."""
    done = 0
    try:
        while done < chunk.length:
            n = os.preadv(chunk.fd, [chunk.view[done:chunk.length]], chunk.offset + done)
            if n == 0:
                break
            done += n
    except OSError as e:
        raise CheckpointError(f"{chunk.path}: read failed at byte {chunk.offset + done} (tensor {chunk.name!r}): "
                              f"{e.strerror or e}") from None
    finally:
        chunk.got = done


class IOPool:
    """``threads`` daemon threads reading :class:`Request` chunks by priority. Thread-safe."""

    def __init__(self, threads: int = IO_THREADS, name: str = "ember-io") -> None:
        self.counters = IOCounters()
        self._heap: list[tuple[int, int, int, Request]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self._busy_since = 0.0
        self._threads = [threading.Thread(target=_worker, args=(weakref.ref(self), self._cond, self._heap),
                                          name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))]
        for t in self._threads:
            t.start()
        weakref.finalize(self, _stop, self._cond, self._heap, self._threads)

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def submit(self, chunks: list[Chunk], finish: Callable[[list[Chunk]], object],
               priority: int = DEMAND) -> Request:
        """Queue ``chunks``; when all are read, ``finish(chunks)`` gives the request's result."""
        req = Request(self, chunks, finish)
        with self._cond:
            if self._closed:
                raise CheckpointError(f"{chunks[0].path if chunks else 'checkpoint'}: the offload reader is closed")
            if not chunks:
                self._complete(req)
                return req
            seq = next(self._seq)
            for i in range(len(chunks)):
                heapq.heappush(self._heap, (priority, seq, i, req))
            self._cond.notify(len(chunks))
        return req

    def read_now(self, chunks: list[Chunk], finish: Callable[[list[Chunk]], object]):
        """The request's result: read by the pool, or here when called from one of the pool's threads."""
        if threading.current_thread() in self._threads:
            for c in chunks:
                self._run(c)
            return finish(chunks)
        return self.submit(chunks, finish).result()

    def _cancel(self, req: Request) -> bool:
        with self._cond:
            if req.started or req.cancelled or req.future.done():
                return False
            req.cancelled = True
            self.counters.cancelled += 1
        req.future.cancel()
        return True

    def _run(self, chunk: Chunk) -> BaseException | None:
        """Read one chunk, keeping the counters; returns the read's error, if any."""
        with self._cond:
            self._in_flight += 1
            if self._in_flight == 1:
                self._busy_since = time.perf_counter()
            self.counters.max_in_flight = max(self.counters.max_in_flight, self._in_flight)
        t0 = time.perf_counter()
        err = None
        try:
            pread_into(chunk)
        except BaseException as e:  # noqa: BLE001  (settles the request's future)
            err = e
        t1 = time.perf_counter()
        with self._cond:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.counters.busy_seconds += t1 - self._busy_since
            self.counters.chunks += 1
            self.counters.bytes += chunk.got
            self.counters.read_seconds += t1 - t0
        return err

    def _take(self, req: Request, i: int) -> None:
        """Read chunk ``i`` of ``req`` (a worker thread); the last chunk completes the request."""
        err = self._run(req.chunks[i])
        with self._cond:
            if err is not None and req.error is None:
                req.error = err
            req.left -= 1
            last = req.left == 0
        if last:
            self._complete(req)

    def _complete(self, req: Request) -> None:
        if req.error is not None:
            req.future.set_exception(req.error)
            return
        try:
            result = req.finish(req.chunks)
        except BaseException as e:  # noqa: BLE001  (the waiter raises it)
            req.future.set_exception(e)
            return
        req.future.set_result(result)

    def reset_counters(self) -> None:
        with self._cond:
            self.counters = IOCounters(max_in_flight=self._in_flight)

    def close(self) -> None:
        """Stop the threads after the chunk each is reading; queued requests fail with a CheckpointError."""
        with self._cond:
            self._closed = True
        _stop(self._cond, self._heap, self._threads)


def _stop(cond: threading.Condition, heap: list, threads: list[threading.Thread]) -> None:
    with cond:
        dropped = [e[-1] for e in heap if e is not None]
        heap.clear()
        heap.append(None)  # the stop mark: a worker that sees it leaves
        cond.notify_all()
    for req in {id(r): r for r in dropped}.values():
        if not req.future.done():
            req.future.set_exception(CheckpointError(
                f"{req.chunks[0].path}: the offload reader was closed before tensor {req.chunks[0].name!r} was read"))
    me = threading.current_thread()
    for t in threads:
        if t is not me:
            t.join()


def _worker(pool_ref: "weakref.ref[IOPool]", cond: threading.Condition, heap: list) -> None:
    while True:
        with cond:
            while not heap:
                cond.wait()
            if heap[0] is None:
                return
            _, _, i, req = heapq.heappop(heap)
            if req.cancelled:
                continue
            req.started = True
        pool = pool_ref()
        if pool is None:
            return
        pool._take(req, i)
        del pool, req
