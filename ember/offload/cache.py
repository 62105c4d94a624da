"""The expert cache: modules read from disk, kept by use count (LFU) or recency (LRU) within a byte budget.

Keys are ``(layer, expert)``. A lookup (:meth:`ExpertCache.get`) is a *use*; it is a *hit* when the module is
resident or already being read by the prefetcher (the forward then waits for that read instead of issuing a
second one), else a *miss* that reads it now. Every read, on demand or prefetched, adds the expert's stored
bytes to ``bytes_read``, so ``hits + misses == uses`` and ``bytes_read == (misses + prefetch_reads) x expert
bytes`` hold exactly (tests/test_offload.py checks both).

Eviction takes the resident entry with the fewest uses (LFU; ties: the least recently used) or the least
recently used (LRU). Use counts outlive eviction, so the experts a workload favours win their place back.
A module evicted while the forward still holds it stays alive until that layer finishes: the budget can be
exceeded by at most the experts one layer runs at once (the planner reserves them).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Hashable

from torch import nn

POLICIES = ("lfu", "lru")
PREFETCH_THREADS = 2  # concurrent background reads: a disk answers two queued requests faster than one


@dataclass
class CacheStats:
    """Counters of an :class:`ExpertCache` since it was made (or :meth:`ExpertCache.reset_stats`)."""

    uses: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_reads: int = 0     # reads issued by the prefetcher
    prefetch_hits: int = 0      # hits served by a prefetched read (resident or still in flight)
    wait_hits: int = 0          # of those, hits that had to wait for the read to finish
    evictions: int = 0
    bytes_read: int = 0         # stored bytes of every expert read (demand + prefetch)
    read_seconds: float = 0.0   # summed wall time of the reads (overlapping reads counted each)
    tokens: int = 0             # token positions the offloaded layers ran (prefill and decode)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["gb_read_per_token"] = self.bytes_read / 1e9 / self.tokens if self.tokens else 0.0
        return d


class ExpertCache:
    """Modules by key within ``capacity_bytes``; thread-safe (the prefetcher inserts from its threads).

    Args:
        capacity_bytes: bytes the resident modules may take (each counted at its in-memory size).
        policy: ``"lfu"`` or ``"lru"``.
        prefetch_threads: background readers (0: no prefetching; :meth:`prefetch` does nothing).
    """

    def __init__(self, capacity_bytes: int, policy: str = "lfu", prefetch_threads: int = PREFETCH_THREADS) -> None:
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy
        self.stats = CacheStats()
        self.used_bytes = 0
        self._entries: dict[Hashable, tuple[nn.Module, int]] = {}
        self._counts: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}
        self._prefetched: set[Hashable] = set()  # resident or in flight by a prefetch, not used since
        self._pending: dict[Hashable, Future] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._tick = itertools.count()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="ember-offload") \
            if prefetch_threads > 0 else None

    # ------------------------------------------------------------------ lookups
    def get(self, key: Hashable, load: Callable[[], tuple[nn.Module, int, int, float]]) -> nn.Module:
        """The module for ``key``: resident, awaited from the prefetcher, or read now by ``load()``.

        ``load`` returns (module, its in-memory bytes, its stored bytes read, seconds the read took).
        """
        with self._lock:
            self.stats.uses += 1
            self._touch(key)
            hit = self._entries.get(key)
            if hit is not None:
                self.stats.hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_hits += 1
                return hit[0]
            fut = self._pending.get(key)
            if fut is not None:
                self.stats.hits += 1
                self.stats.prefetch_hits += 1
                self.stats.wait_hits += 1
                self._prefetched.discard(key)
            else:
                self.stats.misses += 1
        if fut is not None:
            return fut.result()  # a failed prefetch raises its CheckpointError here
        module, nbytes, read, secs = load()
        with self._lock:
            self.stats.bytes_read += read
            self.stats.read_seconds += secs
            self._insert(key, module, nbytes)
        return module

    def prefetch(self, keys, load: Callable[[Hashable], tuple[nn.Module, int, int, float]]) -> None:
        """Start background reads of the ``keys`` that are neither resident nor in flight."""
        if self._pool is None:
            return
        for key in keys:
            with self._lock:
                if key in self._entries or key in self._pending:
                    continue
                fut: Future = Future()
                self._pending[key] = fut
                self._prefetched.add(key)
                self.stats.prefetch_reads += 1
            self._pool.submit(self._run_prefetch, key, fut, load)

    def _run_prefetch(self, key: Hashable, fut: Future, load) -> None:
        try:
            module, nbytes, read, secs = load(key)
        except BaseException as e:  # noqa: BLE001  (handed to whoever waits on it)
            with self._lock:
                self._pending.pop(key, None)
                self._prefetched.discard(key)
            fut.set_exception(e)
            return
        with self._lock:
            self.stats.bytes_read += read
            self.stats.read_seconds += secs
            self._pending.pop(key, None)
            self._insert(key, module, nbytes)
        fut.set_result(module)

    def note_tokens(self, n: int) -> None:
        """Count ``n`` token positions run through the offloaded layers (for bytes per token)."""
        with self._lock:
            self.stats.tokens += n

    # ------------------------------------------------------------------ bookkeeping (under the lock)
    def _touch(self, key: Hashable) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        self._last[key] = next(self._tick)
        if key in self._entries:
            heapq.heappush(self._heap, (*self._rank(key), key))

    def _rank(self, key: Hashable) -> tuple[int, int]:
        last = self._last.get(key, -1)
        return (self._counts.get(key, 0), last) if self.policy == "lfu" else (0, last)

    def _insert(self, key: Hashable, module: nn.Module, nbytes: int) -> None:
        if key in self._entries:
            return
        self._entries[key] = (module, nbytes)
        self.used_bytes += nbytes
        if key not in self._last:
            self._last[key] = next(self._tick)
        heapq.heappush(self._heap, (*self._rank(key), key))
        while self.used_bytes > self.capacity_bytes and len(self._entries) > 1:
            if not self._evict_one(keep=key):
                break
        if len(self._heap) > 8 * len(self._entries) + 64:  # drop stale ranks now and then
            self._heap = [(*self._rank(k), k) for k in self._entries]
            heapq.heapify(self._heap)

    def _evict_one(self, keep: Hashable) -> bool:
        kept = []
        evicted = False
        while self._heap:
            count, last, key = heapq.heappop(self._heap)
            if key not in self._entries or (count, last) != self._rank(key):
                continue  # stale rank
            if key == keep:
                kept.append((count, last, key))
                continue
            _, nbytes = self._entries.pop(key)
            self.used_bytes -= nbytes
            self._prefetched.discard(key)
            self.stats.evictions += 1
            evicted = True
            break
        for item in kept:
            heapq.heappush(self._heap, item)
        return evicted

    # ------------------------------------------------------------------ introspection
    def resident(self) -> list[Hashable]:
        """The keys held now."""
        with self._lock:
            return list(self._entries)

    def reset_stats(self) -> None:
        """Zero the counters (use counts, which drive eviction, are kept)."""
        with self._lock:
            self.stats = CacheStats()

    def drain(self) -> None:
        """Wait for every prefetch in flight (tests, benchmarks between phases)."""
        with self._lock:
            futs = list(self._pending.values())
        for f in futs:
            try:
                f.result()
            except BaseException:  # noqa: BLE001  (its waiter, if any, reports it)
                pass

    def close(self) -> None:
        """Stop the prefetch threads (after the reads in flight)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
