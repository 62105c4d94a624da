"""The disk's read rate as offload sees it: ``ember hw --measure`` stores it, the planner and bench/offload.py use it."""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ember.offload.aio import IO_THREADS
from ember.offload.reader import CHUNK

DISK_BLOCK = CHUNK  # bytes per read when measuring the disk: the offload reader's largest read
DISK_QUEUE = IO_THREADS  # reads in flight, as the offload reader keeps at most


def disk_read_rate(folder: str | os.PathLike, size: int = 512 << 20, block: int = DISK_BLOCK,
                   queue: int = DISK_QUEUE) -> tuple[float, bool]:
    """Bytes/s reading a fresh ``size``-byte file in ``folder`` in ``block`` reads, ``queue`` at a time.

    The file is written (random bytes, fsync), then read with ``O_DIRECT`` into page-aligned buffers so the
    page cache cannot serve it; where the file system refuses ``O_DIRECT`` the file's cached pages are dropped
    with ``posix_fadvise(DONTNEED)`` first (no privileges needed for one's own file) and it is read buffered.
    The file is removed afterwards.

    Returns:
        (bytes/s, whether O_DIRECT was used).
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".disk-probe-", dir=folder)
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        direct = bool(getattr(os, "O_DIRECT", 0))
        try:
            rfd = os.open(name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            os.preadv(rfd, [mmap.mmap(-1, block)], 0)
        except OSError:
            direct = False
            rfd = os.open(name, os.O_RDONLY)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
        bufs = [mmap.mmap(-1, block) for _ in range(queue)]
        offsets = list(range(0, size, block))

        def read(i: int) -> int:
            return os.preadv(rfd, [bufs[i % queue]], offsets[i])

        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(queue) as pool:
                for lo in range(0, len(offsets), queue):  # queue reads in flight, each on its own buffer
                    got = sum(pool.map(read, range(lo, min(lo + queue, len(offsets)))))
                    if got <= 0:
                        break
            seconds = time.perf_counter() - t0
        finally:
            os.close(rfd)
        return size / seconds, direct
    finally:
        os.unlink(name)
