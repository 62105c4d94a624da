"""The expert cache: modules read from disk, kept by use count (LFU) or recency (LRU) within a byte budget.

Keys are ``(layer, expert)``. Reads are started ahead of use by :meth:`ExpertCache.request` on the reader's
I/O threads, of two kinds: *demand* reads (a layer about to run has routed its tokens to these experts: they
are read together, in parallel, before the layer's expert compute asks for them one by one) and *speculative*
reads (prefetches of what the next layer will probably want, at a lower priority; :meth:`ExpertCache.cancel`
drops those that have not started once the real routing is known).

A lookup (:meth:`ExpertCache.get`) is a *use*. It is a *hit* when the module is resident or is being read by a
speculative read (the forward then waits for that read instead of issuing a second one), else a *miss*: the
module was read for this use by a demand read (arrived in time, or waited for) or is read now. Counters hold exactly (tests/test_offload.py):

    hits + misses == uses
    bytes_read == (demand_reads + prefetch_reads - prefetch_cancelled) x expert bytes   (after :meth:`drain`)
    prefetch precision == prefetch_hits / (prefetch_reads - prefetch_cancelled)

``wait_seconds`` is the time the forward spent blocked in :meth:`get` (on a read in flight, or reading).

Eviction takes the resident entry with the fewest uses (LFU; ties: the least recently used) or the least
recently used (LRU). Use counts outlive eviction, so the experts a workload favours win their place back.
A module read ahead of its use is not evicted until that use (or until :meth:`ExpertCache.cancel` says it
will not come), so a layer's demand reads and the next layer's guesses cannot push each other out; a module
evicted while the forward still holds it stays alive until that layer finishes. The budget can so be exceeded
by at most two layers' worth of experts in flight (k demand + k speculative reads).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass
from typing import Callable, Hashable

from torch import nn

from ember.offload.aio import DEMAND, SPECULATIVE, Request

POLICIES = ("lfu", "lru")
Loaded = tuple[nn.Module, int, int, float]  # module, in-memory bytes, stored bytes read, seconds the read took


@dataclass
class CacheStats:
    """Counters of an :class:`ExpertCache` since it was made (or :meth:`ExpertCache.reset_stats`)."""

    uses: int = 0
    hits: int = 0
    misses: int = 0
    demand_reads: int = 0       # reads for a use that was not a hit (in parallel ahead of the use, or at it)
    prefetch_reads: int = 0     # speculative reads started
    prefetch_cancelled: int = 0  # of those, dropped before any byte was read
    prefetch_hits: int = 0      # speculative reads whose expert was used (resident or still in flight)
    wait_hits: int = 0          # of those, uses that had to wait for the read to finish
    evictions: int = 0
    bytes_read: int = 0         # stored bytes of every expert read (demand + speculative)
    read_seconds: float = 0.0   # summed wall time of the reads (overlapping reads counted each)
    wait_seconds: float = 0.0   # time the forward waited for experts (reads in flight or read at the use)
    tokens: int = 0             # token positions the offloaded layers ran (prefill and decode)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Of the speculative reads that read something, the share whose expert was used."""
        done = self.prefetch_reads - self.prefetch_cancelled
        return self.prefetch_hits / done if done else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["prefetch_precision"] = self.prefetch_precision
        d["gb_read_per_token"] = self.bytes_read / 1e9 / self.tokens if self.tokens else 0.0
        d["wait_ms_per_token"] = 1e3 * self.wait_seconds / self.tokens if self.tokens else 0.0
        return d


class ExpertCache:
    """Modules by key within ``capacity_bytes``; thread-safe (reads arrive on the I/O threads).

    Args:
        capacity_bytes: bytes the resident modules may take (each counted at its in-memory size).
        policy: ``"lfu"`` or ``"lru"``.
    """

    def __init__(self, capacity_bytes: int, policy: str = "lfu") -> None:
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy
        self.stats = CacheStats()
        self.used_bytes = 0
        self._entries: dict[Hashable, tuple[nn.Module, int]] = {}
        self._counts: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}
        self._speculative: set[Hashable] = set()  # resident by a speculative read, not used since
        self._pending: dict[Hashable, tuple[Request, bool]] = {}  # in flight: (request, speculative)
        self._used_pending: set[Hashable] = set()  # reads in flight that a use already waits for
        self._pinned: set[Hashable] = set()  # read ahead of a use that has not come yet: not evicted until then
        self._expired: set[Hashable] = set()  # reads in flight whose use will not come (see cancel)
        self._demanded: set[Hashable] = set()  # resident by a demand read, not used since (its use is a miss)
        self._heap: list[tuple[int, int, Hashable]] = []
        self._tick = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookups
    def get(self, key: Hashable, load: Callable[[], Loaded]) -> nn.Module:
        """The module for ``key``: resident, awaited from a read in flight, or read now by ``load()``."""
        t0 = time.perf_counter()
        with self._lock:
            self.stats.uses += 1
            self._touch(key)
            hit = self._entries.get(key)
            if hit is not None:
                self._pinned.discard(key)
                if key in self._demanded:  # read for this use by the layer's demand read: arrived in time
                    self._demanded.discard(key)
                    self.stats.misses += 1
                    return hit[0]
                self.stats.hits += 1
                if key in self._speculative:
                    self._speculative.discard(key)
                    self.stats.prefetch_hits += 1
                return hit[0]
            pending = self._pending.get(key)
            if pending is not None and pending[1]:
                self.stats.hits += 1
                self.stats.prefetch_hits += 1
                self.stats.wait_hits += 1
            else:
                self.stats.misses += 1
            if pending is not None:
                self._used_pending.add(key)
                self._expired.discard(key)
        if pending is not None:
            try:
                module = pending[0].result()[0]  # a failed read raises its CheckpointError here
            except CancelledError:
                module = None  # cancelled as this use began: read it now
            if module is not None:
                self._waited(t0)
                return module
        module, nbytes, read, secs = load()
        with self._lock:
            self.stats.demand_reads += 1
            self.stats.bytes_read += read
            self.stats.read_seconds += secs
            self.stats.wait_seconds += time.perf_counter() - t0
            self._insert(key, module, nbytes)
        return module

    def _waited(self, t0: float) -> None:
        with self._lock:
            self.stats.wait_seconds += time.perf_counter() - t0

    def request(self, keys, start: Callable[[Hashable, int], Request], speculative: bool = False) -> None:
        """Start background reads of the ``keys`` that are neither resident nor in flight.

        ``start(key, priority)`` returns the read's :class:`~ember.offload.aio.Request`, whose result is
        (module, in-memory bytes, stored bytes read, seconds). A demand request for a key whose speculative read
        has not started yet replaces it (the demand read goes first in the queue).
        """
        for key in keys:
            with self._lock:
                if key in self._entries:
                    continue
                pending = self._pending.get(key)
                if pending is not None:
                    if speculative or not pending[1] or not pending[0].cancel():
                        continue
                    del self._pending[key]
                    self.stats.prefetch_cancelled += 1
                req = start(key, SPECULATIVE if speculative else DEMAND)
                self._pending[key] = (req, speculative)
                if speculative:
                    self.stats.prefetch_reads += 1
                else:
                    self.stats.demand_reads += 1
            # the callback names the future, not the request: no cycle keeps the request's module alive
            req.future.add_done_callback(lambda f, key=key: self._arrive(key, f))

    def cancel(self, keys) -> int:
        """The uses of ``keys`` that reads were started for will not come (the layer's routing chose others):
        drop their speculative reads that have not started, and let the rest be evicted like any entry once
        arrived (until then a read-ahead entry is kept for its use). Returns how many reads were dropped."""
        n = 0
        with self._lock:
            for key in keys:
                self._pinned.discard(key)
                self._demanded.discard(key)
                pending = self._pending.get(key)
                if pending is None or key in self._used_pending:
                    continue
                if pending[1] and pending[0].cancel():
                    del self._pending[key]
                    self.stats.prefetch_cancelled += 1
                    n += 1
                else:
                    self._expired.add(key)
        return n

    def _arrive(self, key: Hashable, fut: Future) -> None:
        """A background read finished (on its I/O thread): count it and insert its module."""
        if fut.cancelled():
            return
        with self._lock:
            pending = self._pending.get(key)
            speculative = pending is not None and pending[0].future is fut and pending[1]
            if pending is not None and pending[0].future is fut:
                del self._pending[key]
            used = key in self._used_pending
            expired = key in self._expired
            self._used_pending.discard(key)
            self._expired.discard(key)
            if fut.exception() is not None:
                return  # whoever waits on it raises the error; nothing was read
            module, nbytes, read, secs = fut.result()
            self.stats.bytes_read += read
            self.stats.read_seconds += secs
            if key in self._entries:
                return
            if not used and not expired:
                self._pinned.add(key)  # before the insert: the eviction it may trigger must not take it
            self._insert(key, module, nbytes)
            if not used:
                (self._speculative if speculative else self._demanded).add(key)

    def in_flight(self) -> int:
        """Reads started and not arrived."""
        with self._lock:
            return len(self._pending)

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
            if key == keep or key in self._pinned:
                kept.append((count, last, key))
                continue
            _, nbytes = self._entries.pop(key)
            self.used_bytes -= nbytes
            self._pinned.discard(key)
            self._speculative.discard(key)
            self._demanded.discard(key)
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
        """Wait for every read in flight (tests, benchmarks between phases)."""
        with self._lock:
            reqs = [r for r, _ in self._pending.values()]
        for r in reqs:
            try:
                r.result()
            except BaseException:  # noqa: BLE001  (its waiter, if any, reports it)
                pass
        deadline = time.monotonic() + 5.0
        while self.in_flight() and time.monotonic() < deadline:  # arrivals run just after the results are set
            time.sleep(0.001)
