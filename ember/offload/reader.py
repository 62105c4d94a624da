"""Reading tensors from safetensors files as stored, at their byte offsets, without mapping the file.

Offloaded weights are read on demand with ``os.preadv`` into page-aligned anonymous buffers. Where the file
system allows it the file is opened with ``O_DIRECT``: the read goes from the disk to the buffer and the page
cache neither hides the disk (benchmarks measure what they claim) nor keeps a second copy of what the expert
cache already holds. ``O_DIRECT`` needs the offset, the length and the buffer aligned to the device's block
size; :data:`ALIGN` (4 KiB) covers the block sizes of today's disks, and an anonymous ``mmap`` is page aligned.
A tensor read this way is a view into its buffer (``torch.frombuffer`` keeps the buffer alive), so a read is
one copy from the disk and none after, unless the compute dtype differs from the stored one.

Tensors that lie close together in a file (an expert's gate, up and down matrices are usually adjacent) are
read as one span, in :data:`CHUNK` pieces by the reader's :class:`~ember.offload.aio.IOPool` threads, several in
flight at once; :meth:`DiskReader.submit` starts a read in the background (the expert cache's demand reads and
prefetches, the layer streamer's read-ahead) and :meth:`DiskReader.read` waits for one. A file that is truncated while the model runs, or that the disk fails to read, gives a
:class:`~ember.errors.CheckpointError` naming the file. A file removed while the model runs keeps being read
through the descriptor opened at load time (POSIX keeps an open file's data until its last descriptor closes).
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ember.errors import CheckpointError
from ember.loading.safetensors import TensorInfo
from ember.offload.aio import DEMAND, IO_THREADS, Chunk, IOPool, Request

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (a page; a multiple of every block size)
MERGE_GAP = 1 << 20  # tensors closer than this in one file are read as one span
CHUNK = 4 << 20  # bytes per pread: a large span is read as several reads in flight (a multiple of ALIGN)


def _down(x: int) -> int:
    return x - x % ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


class BufferPool:
    """Page-aligned read buffers by size, reused: a fresh anonymous mapping costs the kernel a fault and a zeroed
    page per 4 KiB when the read fills it (about 6x the CPU time of the read itself into a buffer already mapped).

    A buffer comes back (:meth:`give`) when the module whose tensors view it is collected; at most
    ``min(MAX_SPARE, SPARE_BYTES // size)`` (at least one) buffers of a size are kept spare, the rest freed.
    Lock-free: ``deque.append``/``pop`` are atomic, and :meth:`give` may run from a garbage collection anywhere.
    """

    MAX_SPARE = 8
    SPARE_BYTES = 256 << 20

    def __init__(self) -> None:
        self._free: dict[int, deque] = {}
        self.reused = 0

    def take(self, size: int) -> mmap.mmap:
        """A writable, page-aligned buffer of ``size`` bytes (its old contents are overwritten by the read)."""
        q = self._free.get(size)
        try:
            buf = q.pop()
        except (AttributeError, IndexError):
            return mmap.mmap(-1, size)
        self.reused += 1
        return buf

    def give(self, bufs) -> None:
        """Take back buffers no tensor uses any more."""
        for buf in bufs:
            q = self._free.setdefault(len(buf), deque())
            if len(q) < max(1, min(self.MAX_SPARE, self.SPARE_BYTES // len(buf))):
                q.append(buf)


@dataclass
class ReadCounters:
    """What a :class:`DiskReader` has read: calls, bytes asked for (the tensors) and bytes moved (aligned spans)."""

    reads: int = 0
    tensor_bytes: int = 0
    disk_bytes: int = 0


class DiskReader:
    """Reads :class:`TensorInfo` byte ranges with ``pread`` (``O_DIRECT`` when ``direct`` and supported).

    Thread-safe: ``pread`` takes its offset as an argument, so the I/O threads read the same descriptors at once.

    Args:
        files: the checkpoint files that will be read (opened now, so a later removal does not matter).
        direct: try ``O_DIRECT``; a file system that refuses it falls back to buffered reads
            (:attr:`direct` then says False for that file).
        threads: I/O threads, the reads in flight at most.
    """

    def __init__(self, files, direct: bool = True, threads: int = IO_THREADS) -> None:
        self._fds: dict[Path, int] = {}
        self.direct: dict[Path, bool] = {}
        self.counters = ReadCounters()
        self._lock = threading.Lock()
        self.pool = None
        for f in files:
            self._open(Path(f), direct)
        self.pool = IOPool(threads, name="ember-offload-io")
        self.buffers = BufferPool()

    def _open(self, path: Path, direct: bool) -> None:
        flag = getattr(os, "O_DIRECT", 0) if direct else 0
        try:
            if flag:
                try:
                    fd = os.open(path, os.O_RDONLY | flag)
                    probe = mmap.mmap(-1, ALIGN)
                    os.preadv(fd, [probe], 0)  # some file systems accept the flag and refuse the read
                    probe.close()
                except OSError:
                    if "fd" in locals():
                        os.close(fd)
                    flag = 0
            if not flag:
                fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open for offloaded reads ({e.strerror or e})") from None
        self._fds[path] = fd
        self.direct[path] = bool(flag)

    @property
    def all_direct(self) -> bool:
        """Every file is read with ``O_DIRECT`` (the page cache is bypassed)."""
        return bool(self.direct) and all(self.direct.values())

    def close(self) -> None:
        """Stop the I/O threads and close the descriptors (the reader cannot be used after)."""
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def _request(self, infos: list[TensorInfo]):
        """The chunks that read ``infos`` (spans split into :data:`CHUNK` pieces) and the function that turns
        them, once read, into the tensors."""
        if self.pool is None:
            raise CheckpointError(f"{infos[0].file if infos else 'checkpoint'}: the offload reader is closed")
        chunks: list[Chunk] = []
        spans = []
        bufs: list[mmap.mmap] = []
        for span in _spans(infos):
            path = span[0].file
            lo = min(t.begin for t in span)
            hi = max(t.end for t in span)
            fd = self._fds.get(path)
            if fd is None:
                raise CheckpointError(f"{path}: not one of the files opened for offloaded reads")
            a, b = (_down(lo), _up(hi)) if self.direct[path] else (lo, hi)
            buf = self.buffers.take(max(b - a, 1))
            bufs.append(buf)
            view = memoryview(buf)
            first = len(chunks)
            for off in range(0, b - a, CHUNK):  # CHUNK is a multiple of ALIGN: every piece stays aligned
                n = min(CHUNK, b - a - off)
                chunks.append(Chunk(fd, path, a + off, n, view[off:off + n], span[0].name))
            view.release()
            spans.append((span, buf, a, hi, first, len(chunks)))

        def finish(done: list[Chunk]) -> list[torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            moved = 0
            for span, buf, a, hi, i, j in spans:
                got = 0  # bytes read contiguously from a (a short chunk is the end of the file)
                for c in done[i:j]:
                    got += c.got
                    if c.got < c.length:
                        break
                for c in done[i:j]:
                    c.view.release()
                moved += got
                if got < hi - a:
                    raise CheckpointError(
                        f"{span[0].file}: truncated while the model is running: tensor {span[-1].name!r} ends at "
                        f"byte {hi} but only {a + got} could be read; the checkpoint changed on disk; restore the "
                        "file and restart")
                for t in span:
                    out[t.name] = _view(buf, t, t.begin - a)
            with self._lock:
                self.counters.reads += len(spans)
                self.counters.tensor_bytes += sum(t.end - t.begin for t in infos)
                self.counters.disk_bytes += moved
            return [out[t.name] for t in infos]
        return chunks, finish, bufs

    def submit(self, infos: list[TensorInfo], then: Callable[[list[torch.Tensor]], object] | None = None,
               priority: int = DEMAND, owner: Callable[[object], object] | None = None) -> Request:
        """Read ``infos`` in the background; the request's result is ``then(tensors)`` (or the tensors).

        ``then`` runs on the I/O thread that finishes the read. With ``owner``, the read buffers go back to
        :attr:`buffers` for reuse once ``owner(result)`` (the module built on them, the only holder of the
        tensors) is collected. Errors (see :meth:`read`) surface from ``Request.result()``.
        """
        chunks, finish, bufs = self._request(infos)

        def done(c: list[Chunk]):
            result = finish(c) if then is None else then(finish(c))
            if owner is not None:
                weakref.finalize(owner(result), self.buffers.give, bufs)
            return result
        return self.pool.submit(chunks, done, priority)

    def read(self, infos: list[TensorInfo]) -> list[torch.Tensor]:
        """The tensors ``infos`` as stored (dtype and shape of the file), each a view into a read buffer.

        The spans are read in :data:`CHUNK` pieces by the I/O threads, several at once.

        Raises:
            CheckpointError: a file not opened by this reader, shorter than its header says (truncated
                since it was loaded), or a read error; the message names the file and tensor.
        """
        chunks, finish, _ = self._request(infos)
        return self.pool.read_now(chunks, finish)


def _view(buf: mmap.mmap, t: TensorInfo, offset: int) -> torch.Tensor:
    count = t.end - t.begin
    if count == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    if offset % t.dtype.itemsize:  # misaligned in the file: copy this tensor out
        return torch.frombuffer(bytearray(buf[offset:offset + count]), dtype=t.dtype).reshape(t.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mmap is writable; frombuffer warns only about read-only buffers
        return torch.frombuffer(buf, dtype=t.dtype, count=count // t.dtype.itemsize, offset=offset).reshape(t.shape)


def _spans(infos: list[TensorInfo]) -> list[list[TensorInfo]]:
    """``infos`` grouped into runs of one file that lie within :data:`MERGE_GAP` of each other."""
    spans: list[list[TensorInfo]] = []
    for t in sorted(infos, key=lambda t: (str(t.file), t.begin)):
        last = spans[-1] if spans else None
        if last is not None and last[0].file == t.file and t.begin - max(x.end for x in last) <= MERGE_GAP:
            last.append(t)
        else:
            spans.append([t])
    return spans


def assemble_module(build, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A module made by ``build()`` on the meta device and given the tensors ``state`` (as read, by state-dict
    name); float tensors are cast to ``dtype`` on ``device``."""
    full = {}
    for n, t in state.items():
        if t.dtype.is_floating_point and t.dtype != dtype:
            t = t.to(dtype)
        full[n] = t.to(device) if device.type != "cpu" else t
    with torch.device("meta"):
        module = build()
    module.load_state_dict(full, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def read_module(reader: DiskReader, build, infos: dict[str, TensorInfo], dtype: torch.dtype,
                device: torch.device) -> torch.nn.Module:
    """A module made by ``build()`` on the meta device and filled from the file: ``infos`` maps each of its
    state-dict names to where the tensor is stored. Float tensors are cast to ``dtype`` on ``device``.

    Raises:
        CheckpointError: a read failed (see :meth:`DiskReader.read`).
    """
    names = list(infos)
    return assemble_module(build, dict(zip(names, reader.read([infos[n] for n in names]))), dtype, device)
