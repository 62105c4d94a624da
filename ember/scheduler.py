"""Continuous batching: many sequences share each forward pass, joining and leaving at any step.

:class:`BatchScheduler` owns a :class:`~ember.cache.PagedKVCache` and runs a loop (in its own
thread for the server) of *steps*. One step is

1. admit waiting sequences while there is a batch slot and KV blocks to reserve for their whole
   length (prompt + max tokens, :meth:`~ember.cache.PagedKVCache.blocks_for`; so a running sequence never
   has to be pre-empted) and, where the model has recurrent layers, a state slot; reusing cached
   blocks of an identical prompt prefix;
2. one decode pass over every running sequence that has its prompt in the cache (B rows x 1 token);
3. one prefill pass over newcomers, chunked to ``prefill_chunk`` tokens per step, so running
   streams keep getting a token every step while long prompts are read;
4. sampling per row (per-request seeds, penalties, logit bias, JSON constraints, logprobs), text
   detokenization with stop strings, and one batch of :class:`SeqEvent` handed to ``deliver``.

Rows are at different lengths: the paged cache right-aligns them and masks the padding, so the
same :class:`~ember.models.Transformer` forward serves a ragged batch. Finished or cancelled
sequences free their blocks at once. Full prompt blocks are registered by a chained key of their
token ids; a later sequence with the same prefix takes them (refcounted) instead of recomputing,
and sequences arriving together with a shared prefix (``n > 1``) wait for the first one's prefill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

import ember.runtime  # noqa: F401  (the CPU kernels behind the model's pieces)
from ember.engine import Engine, _RowState
from ember.errors import DistributedError, GenerationError, QueueFullError
from ember.cache import PagedKVCache
from ember.sampling import Sampler, SamplingParams, token_logprobs
from ember.speculative import check_target
from ember.speculative.batched import BatchSpeculator, SequenceSpeculation

log = logging.getLogger("ember.scheduler")


class TokenConstraint(Protocol):
    """What the scheduler needs from a decoding constraint (e.g. :class:`ember.json_constraint.JsonConstraint`)."""

    done: bool

    def mask(self, budget: int, vocab_size: int | None = None) -> torch.Tensor:
        """(V,) bool of allowed tokens, given ``budget`` tokens left (this one included)."""
        ...

    def advance(self, token_id: int) -> None:
        ...


@dataclass
class SeqRequest:
    """One sequence to generate. ``n`` choices of an API request are ``n`` of these."""

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None          # None: none; k >= 0: the chosen token's and the k best
    constraint: TokenConstraint | None = None
    logit_bias: dict[int, float] | None = None
    on_event: Callable[["SeqEvent"], None] | None = None
    tag: object = None                   # free for the caller (the server keeps its request here)
    id: int = -1                         # set by submit()


@dataclass
class SeqEvent:
    """One generated token of one sequence (or its error)."""

    seq_id: int
    token_id: int
    text: str                              # newly printable text (may be "")
    finish_reason: str | None = None       # "stop" | "length" | "error" on the last event
    logprob: float | None = None           # log p of the chosen token (before temperature/penalties)
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0             # tokens generated so far
    cached_tokens: int = 0                 # prompt tokens served from the prefix cache
    error: str | None = None


class _Text(_RowState):
    def finish_now(self, reason: str) -> str:
        self.finish = reason
        self.text += self.decoder.flush()
        return self._release(final=True)


@dataclass(eq=False)
class _Seq:
    req: SeqRequest
    ids: list[int]                     # prompt + generated
    n_prompt: int
    max_new: int
    text: _Text
    sampler: Sampler | None            # None: plain greedy (argmax)
    keys: list[tuple] = field(default_factory=list)  # prefix keys of the full prompt blocks
    table: list[int] = field(default_factory=list)
    window_table: list[int] = field(default_factory=list)  # sliding layers' blocks (-1: given back)
    window_freed: int = 0              # leading window_table entries already given back
    computed: int = 0                  # tokens whose keys/values are in the cache
    reserve: int = 0                   # blocks reserved but not yet allocated
    state_slot: int | None = None      # recurrent-state slot (models with recurrent layers)
    registered: int = 0                # prompt blocks registered in the prefix cache
    cached_tokens: int = 0
    finished: bool = False
    spec: SequenceSpeculation | None = None  # speculation state (plain greedy sequences, when the engine speculates)

    @property
    def generated(self) -> int:
        return len(self.ids) - self.n_prompt

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.n_prompt


class BatchScheduler:
    """Continuous-batching generation over a paged KV cache.

    Args:
        engine: a loaded :class:`~ember.engine.Engine` (its model and tokenizer are used).
        max_batch: sequences running at once.
        max_queue: sequences allowed to wait for a slot; more raise :class:`QueueFullError`.
        num_blocks: KV blocks in the pool (default: the planner's, :func:`ember.planner.default_kv_pool_blocks`).
        block_size: tokens per KV block.
        prefill_chunk: prompt tokens (padded) read per step.
        kv_memory_bytes: bytes the default pool may take (default: the planner's budget for this device).
    """

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64, num_blocks: int | None = None,
                 block_size: int = 16, prefill_chunk: int = 256, kv_memory_bytes: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or block_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, block_size and prefill_chunk must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.model, self.tokenizer, self.config = engine.model, engine.tokenizer, engine.config
        self.device, self.dtype = engine.device, engine.dtype
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block_size, self.prefill_chunk = block_size, prefill_chunk
        if num_blocks is None:  # the planner owns KV-pool sizing
            from ember.planner import default_kv_pool_blocks

            num_blocks = default_kv_pool_blocks(self.config, self.device, self.dtype, max_batch, block_size,
                                                prefill_chunk, kv_memory_bytes)
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.dtype, self.device, max_seqs=max_batch,
                                  prefill_chunk=prefill_chunk)
        self.pool = self.cache.pool
        # called with (pool layout, tables, cached, new, slots, ids) before each forward: a multi-process run's
        # rank 0 announces it so the other ranks run the same forward (ember.distributed.follow)
        self.on_forward = getattr(engine, "on_batch_forward", None)
        self.layout = (num_blocks, block_size, max_batch)
        self.vocab_size = self.config.vocab_size
        self.pad_id = self.tokenizer.pad_token_id or 0

        self.deliver: Callable[[list[tuple[SeqRequest, SeqEvent]]], None] = _deliver_direct
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._by_id: dict[int, _Seq] = {}
        self._reserved = 0
        self._inflight_keys: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._inbox: list[_Seq] = []
        self._cancels: list[int] = []
        self._queued = 0          # submitted and not yet admitted (inbox + waiting), for the queue bound
        self._next_id = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.broken: DistributedError | None = None  # a lost rank (multi-process run): the loop ends, requests fail
        self.counters = dict(steps=0, prompt_tokens=0, generated_tokens=0, prefix_hit_tokens=0,
                             finished=0, cancelled=0, errors=0)
        # the engine's speculation (Engine.speculate): every running sequence's proposals verified in one forward
        self.speculator: BatchSpeculator | None = None
        if engine.speculation is not None:
            check_target(self.model, engine.speculation)
            self.speculator = BatchSpeculator(engine.speculation)

    # ------------------------------------------------------------------ capacity
    @property
    def max_seq_tokens(self) -> int:
        """Longest sequence (prompt + max tokens) the pool can hold at all."""
        return min(self.config.max_position_embeddings, self.pool.capacity * self.block_size)

    def metrics(self) -> dict:
        """Gauges and counters: queue, batch, KV blocks (free = unowned, cached prefixes included)."""
        out = dict(running=len(self.running), waiting=self._queued, max_batch=self.max_batch,
                   max_queue=self.max_queue, kv_blocks_total=self.pool.capacity, kv_blocks_free=self.pool.num_free,
                   kv_blocks_reserved=self._reserved, kv_block_size=self.block_size, **self.counters)
        if self.cache.window_pool is not None:
            out.update(kv_window_blocks_total=self.cache.window_pool.capacity,
                       kv_window_blocks_free=self.cache.window_pool.num_free)
        if self.speculator is not None:
            c = self.speculator.counters
            out.update(speculative_proposed=c.proposed, speculative_accepted=c.accepted,
                       speculative_tokens_per_pass=round(c.tokens_per_pass, 3))
        return out

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, reqs: Sequence[SeqRequest]) -> list[int]:
        """Queue sequences (all or none); returns their ids.

        Raises:
            QueueFullError: more than ``max_queue`` would wait.
            GenerationError: a sequence can never fit (context or KV pool).
        """
        seqs = [self._make_seq(r) for r in reqs]
        if len(seqs) > self.max_batch + self.max_queue:  # could never be admitted, even with nothing else running
            raise GenerationError(f"{len(seqs)} sequences in one submission exceed the {self.max_batch} running + "
                                  f"{self.max_queue} queued the scheduler holds")
        with self._lock:
            # Sequences that will find a free batch slot at once do not count as waiting.
            if self._queued + len(seqs) + len(self.running) - self.max_batch > self.max_queue:
                raise QueueFullError(f"the server queue is full ({self._queued} waiting, limit {self.max_queue}); retry later")
            for s in seqs:
                s.req.id = self._next_id
                self._next_id += 1
                self._inbox.append(s)
            self._queued += len(seqs)
        self._wake.set()
        return [s.req.id for s in seqs]

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence and free its blocks (no further events are sent for it)."""
        with self._lock:
            self._cancels.append(seq_id)
        self._wake.set()

    def _make_seq(self, r: SeqRequest) -> _Seq:
        p = r.params
        p.validate()
        n = len(r.prompt_ids)
        if n == 0:
            raise GenerationError("empty prompt: give at least one token")
        max_new = p.new_token_limit(n, self.max_seq_tokens)
        if max_new < 1:
            raise GenerationError(f"max tokens must be at least 1, got {max_new}" if p.max_new_tokens is not None else
                                  f"prompt ({n} tokens) fills the {self.max_seq_tokens} tokens one sequence may use")
        total = n + max_new
        if total > self.max_seq_tokens:
            raise GenerationError(f"prompt ({n} tokens) + max tokens ({max_new}) = {total} exceeds the "
                                  f"{self.max_seq_tokens} tokens one sequence may use")
        stop_ids = p.stop_token_set(self.tokenizer.eos_token_ids)
        plain_greedy = p.temperature == 0 and p.repetition_penalty == 1 and not p.presence_penalty \
            and not p.frequency_penalty
        sampler = None if plain_greedy else Sampler(p, 1, self.device)
        spec = (self.speculator.start(p, n + max_new) if self.speculator is not None and plain_greedy
                and r.logprobs is None and r.constraint is None and not r.logit_bias else None)
        bs = self.block_size
        keys, parent = [], 0
        for k in range(n // bs):
            key = (parent, tuple(r.prompt_ids[k * bs:(k + 1) * bs]))
            keys.append(key)
            parent = hash(key)
        return _Seq(r, list(r.prompt_ids), n, max_new, _Text(self.tokenizer, p, stop_ids), sampler, keys, spec=spec)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Run the step loop (:meth:`run`) in a daemon thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self.run, name="ember-scheduler", daemon=True)
            self._thread.start()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The step loop, in the calling thread, until :meth:`stop` (or ``until()`` is true).

        On CPU, prefer the main thread: PyTorch's OpenMP parallel regions cost measurably more when
        launched from other threads (a 110M model decoded 30 ms/step in a thread, 19 ms in the main one).
        Sequences still queued or running when the loop ends are dropped (their blocks freed; with errors if broken).
        """
        with torch.inference_mode():
            while not self._stop and self.broken is None and not (until is not None and until()):
                if not self.step():
                    self._wake.wait(0.1)
                    self._wake.clear()
        if self.broken is not None:
            self._drain()
            self.deliver([(s.req, SeqEvent(s.req.id, -1, "", "error", prompt_tokens=s.n_prompt, error=str(self.broken),
                                           completion_tokens=s.generated)) for s in [*self.running, *self.waiting]])
        for s in list(self.running) + list(self.waiting):
            self._release(s)
        self.running.clear()
        self.waiting.clear()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask the loop to end; waits for it when it runs in :meth:`start`'s thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_until_idle(self) -> None:
        """Step in the calling thread until nothing is queued or running (tests, offline batches)."""
        with torch.inference_mode():
            while self.step() or self._inbox:
                pass

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """Admit, run one decode and one prefill pass, sample, deliver. False when there was nothing to do."""
        self._drain()
        self._admit()
        if not self.running:
            return False
        events: list[tuple[SeqRequest, SeqEvent]] = []
        ready: list[tuple[_Seq, torch.Tensor]] = []
        decode = [s for s in self.running if s.prefilled]
        if decode and self.speculator is not None:
            ready += self._speculative_decode(decode, events)
        elif decode:  # a pipeline's stage 0 runs two micro-batches at once (ember/distributed/pipeline.py)
            fence, fwd = getattr(self.model, "logits_fence", None), lambda b: self._forward_safe(b, [1] * len(b), events)
            for part, logits in fence.micro_batches(decode, fwd, self) if fence else [(decode, fwd(decode))]:
                ready += list(zip(part, logits)) if logits is not None else []
        rows, chunks = self._pick_prefill() if self.broken is None else ([], [])
        if rows:
            logits = self._forward_safe(rows, chunks, events)
            if logits is not None:
                for s, row in zip(rows, logits):
                    self._register_prefix(s)
                    if s.prefilled:
                        ready.append((s, row))
        if ready:
            self._sample(ready, events)
        self.counters["steps"] += 1
        self.running = [s for s in self.running if not s.finished]
        if events:
            self.deliver(events)
        return True

    def _drain(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        for s in inbox:
            self._by_id[s.req.id] = s
            self.waiting.append(s)
        for sid in cancels:
            s = self._by_id.get(sid)
            if s is None or s.finished:
                continue
            if s in self.waiting:
                self.waiting.remove(s)
                with self._lock:
                    self._queued -= 1
            self._release(s)
            self.counters["cancelled"] += 1
        if cancels:
            self.running = [s for s in self.running if not s.finished]

    def _admit(self) -> None:
        bs, pool = self.block_size, self.pool
        keep: deque[_Seq] = deque()
        blocked = False
        while self.waiting:
            s = self.waiting.popleft()
            if blocked or len(self.running) >= self.max_batch:
                keep.append(s)
                continue
            usable = (s.n_prompt - 1) // bs  # always compute at least the last prompt token (for its logits)
            if self.cache.states is not None or self.cache.window_pool is not None or (s.spec and s.spec.reads_states):
                # Prefix caching is off for recurrent layers (a cached block holds keys/values, not the state after
                # it: no snapshots at block boundaries), ring layers (older blocks went back to the window pool) and
                # an MTP head (it reads every position's hidden state, ember/speculative/batched.py).
                usable = 0
            matched: list[int] = []
            for key in s.keys[:usable]:
                b = pool.lookup(key)
                if b is None:
                    break
                matched.append(b)
            if len(matched) < usable and s.keys[len(matched)] in self._inflight_keys:
                keep.append(s)  # a running prefill is computing this prefix: take it from the cache next step
                continue
            revive = sum(1 for b in matched if pool.refs[b] == 0)
            need = self.cache.blocks_for(s.n_prompt + s.max_new) - len(matched)
            states = self.cache.states
            if pool.num_free - revive - self._reserved < need or (states is not None and not states.num_free):
                keep.append(s)
                blocked = True  # first come, first served: later arrivals do not overtake
                continue
            for b in matched:
                pool.acquire(b)
            if states is not None:
                s.state_slot = states.admit()
            s.table = matched
            s.registered = len(matched)
            s.computed = s.cached_tokens = len(matched) * bs
            s.reserve = need
            self._reserved += need
            for key in s.keys[len(matched):]:
                self._inflight_keys[key] = self._inflight_keys.get(key, 0) + 1
            self.counters["prefix_hit_tokens"] += s.cached_tokens
            self.counters["prompt_tokens"] += s.n_prompt
            self.running.append(s)
            with self._lock:
                self._queued -= 1
        self.waiting = keep

    def _pick_prefill(self) -> tuple[list[_Seq], list[int]]:
        """Newcomers' next prompt chunks: padded rows x width within ``prefill_chunk`` tokens (the first always runs)."""
        rows: list[_Seq] = []
        chunks: list[int] = []
        budget = self.prefill_chunk
        for s in self.running:
            if s.prefilled or s.finished:
                continue
            c = min(s.n_prompt - s.computed, budget)
            if rows and (len(rows) + 1) * max(max(chunks), c) > budget:
                break
            rows.append(s)
            chunks.append(c)
        return rows, chunks

    def _speculative_decode(self, seqs: list[_Seq], events: list) -> list[tuple[_Seq, torch.Tensor]]:
        """One decode forward over every running sequence's last token and its proposals; the speculating rows'
        tokens are emitted here, the others' last logits returned for :meth:`_sample`."""
        spec, states = self.speculator, self.cache.states
        proposals = spec.propose(seqs)
        news, saved = spec.prepare(seqs, proposals, states)
        t0 = time.perf_counter()
        with spec.verifying(news):  # verified rows round as one token's: greedy tokens are plain decoding's
            logits = self._forward_safe(seqs, news, events, proposals)
        if logits is None:
            return []
        T = logits.shape[1]
        spec.record(seqs, proposals, time.perf_counter() - t0)
        ready = []
        for i, (s, prop) in enumerate(zip(seqs, proposals)):
            if s.spec is None:
                ready.append((s, logits[i, -1]))
                continue
            out = spec.verify(s.spec, logits[i, T - 1 - len(prop):], prop)
            spec.rewind(s, news[i], len(prop), len(out) - 1, states, saved)
            for tok in out:
                if self._emit(s, tok, events) is not None:
                    break
        return ready

    def _forward_safe(self, seqs: list[_Seq], news: list[int], events: list,
                      proposals: list[list[int]] | None = None) -> torch.Tensor | None:
        try:
            return self._forward(seqs, news, proposals)
        except Exception as e:  # a failing pass (e.g. out of memory) ends its rows, not the server
            log.exception("forward pass failed for %d sequences", len(seqs))
            self.broken = e if isinstance(e, DistributedError) else self.broken
            for s in seqs:
                self._release(s)
                self.counters["errors"] += 1
                events.append((s.req, SeqEvent(s.req.id, -1, "", "error", prompt_tokens=s.n_prompt,
                                               completion_tokens=s.generated, error=f"{type(e).__name__}: {e}")))
            return None

    def _forward(self, seqs: list[_Seq], news: list[int], proposals: list[list[int]] | None = None) -> torch.Tensor:
        """Feed ``news[i]`` pending tokens of each sequence; returns (B, V) logits at each row's last token, or with
        ``proposals`` (decode rows: their last token then its proposals, ``news[i] = 1 + len(proposals[i])``) the
        (B, T, V) logits of every column."""
        bs = self.block_size
        wpool = self.cache.window_pool
        for s, n in zip(seqs, news):
            while len(s.table) * bs < s.computed + n:
                s.table.append(self.pool.allocate())
                s.reserve -= 1
                self._reserved -= 1
            if wpool is not None:  # sliding layers: give back what left the window, then cover the new tokens
                self._free_window(s, self.cache.expired_window_blocks(s.computed))
                while len(s.window_table) * bs < s.computed + n:
                    s.window_table.append(wpool.allocate())
        slots = [s.state_slot for s in seqs] if self.cache.states is not None else None
        wtables = [s.window_table for s in seqs] if wpool is not None else None
        batch = self.cache.batch([s.table for s in seqs], [s.computed for s in seqs], news, slots, wtables)
        T = batch.T
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, news)):
            row = s.ids[s.computed:s.computed + n] if proposals is None else s.ids[s.computed:] + proposals[i]
            ids[i, T - n:] = torch.tensor(row)
        if self.on_forward is not None:
            self.on_forward(self.layout, [list(s.table) for s in seqs], [s.computed for s in seqs], news, slots, ids)
        run = lambda: self.model(ids.to(self.device), batch.positions, batch, batch.start,  # noqa: E731
                                 batch.k_valid, last_only=proposals is None)
        logits = self.speculator.forward(self.model, seqs, news, run) if self.speculator is not None else run()
        for s, n in zip(seqs, news):
            s.computed += n
        return logits if proposals is not None else logits[:, -1]

    def _free_window(self, s: _Seq, upto: int) -> None:
        """Give the window-pool blocks ``s.window_table[:upto]`` back (those still held)."""
        for k in range(s.window_freed, min(upto, len(s.window_table))):
            self.cache.window_pool.release(s.window_table[k])
            s.window_table[k] = -1
        s.window_freed = max(s.window_freed, min(upto, len(s.window_table)))

    def _register_prefix(self, s: _Seq) -> None:
        full = min(s.computed, s.n_prompt) // self.block_size
        for k in range(s.registered, full):
            self.pool.register(s.table[k], s.keys[k])
            self._drop_inflight(s.keys[k])
        s.registered = max(s.registered, full)

    def _drop_inflight(self, key: tuple) -> None:
        c = self._inflight_keys.get(key, 0)
        if c <= 1:
            self._inflight_keys.pop(key, None)
        else:
            self._inflight_keys[key] = c - 1

    def _release(self, s: _Seq) -> None:
        """Free a sequence's blocks and reservation (finish, cancel, error)."""
        if s.finished:
            return
        s.finished = True
        for b in s.table:
            self.pool.release(b)
        s.table, s.spec = [], None  # spec: an MTP head's own cache goes with it
        if self.cache.window_pool is not None:
            self._free_window(s, len(s.window_table))
            s.window_table, s.window_freed = [], 0
        self._reserved -= s.reserve
        s.reserve = 0
        if s.state_slot is not None:
            self.cache.states.retire(s.state_slot)
            s.state_slot = None
        for key in s.keys[s.registered:]:
            self._drop_inflight(key)
        s.registered = len(s.keys)
        self._by_id.pop(s.req.id, None)

    # ------------------------------------------------------------------ sampling
    def _sample(self, ready: list[tuple[_Seq, torch.Tensor]], events: list) -> None:
        seqs = [s for s, _ in ready]
        logits = torch.stack([row for _, row in ready]).float()  # (R, V), our own copy
        dev = logits.device
        V = logits.shape[1]
        for i, s in enumerate(seqs):
            r = s.req
            if r.logit_bias:
                idx = torch.tensor(list(r.logit_bias.keys()), device=dev)
                logits[i].index_add_(0, idx, torch.tensor(list(r.logit_bias.values()), device=dev))
            if r.constraint is not None:
                allowed = r.constraint.mask(s.max_new - s.generated, V).to(dev)
                logits[i].masked_fill_(~allowed, float("-inf"))
        toks = torch.empty(len(seqs), dtype=torch.long, device=dev)
        plain = [i for i, s in enumerate(seqs) if s.sampler is None]
        if plain:
            idx = torch.tensor(plain, device=dev)
            toks[idx] = logits.index_select(0, idx).argmax(-1)
        for i, s in enumerate(seqs):
            if s.sampler is not None:
                past = torch.tensor([s.ids], device=dev) if s.req.params.repetition_penalty != 1 else None
                toks[i] = s.sampler.sample(logits[i:i + 1], past)[0]
        lp_rows = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        lps = None
        if lp_rows:
            idx = torch.tensor(lp_rows, device=dev)
            top_n = max(seqs[i].req.logprobs for i in lp_rows)
            lp = token_logprobs(logits.index_select(0, idx), toks.index_select(0, idx), top_n)
            chosen = lp.chosen.tolist()
            top_ids = lp.top_ids.tolist() if lp.top_ids is not None else None
            top_lp = lp.top_logprobs.tolist() if lp.top_logprobs is not None else None
            lps = {i: (chosen[j], top_ids[j] if top_ids else [], top_lp[j] if top_lp else [])
                   for j, i in enumerate(lp_rows)}
        for i, (s, tok) in enumerate(zip(seqs, toks.tolist())):
            self._emit(s, tok, events, lps.get(i) if lps is not None else None)

    def _emit(self, s: _Seq, tok: int, events: list, lp: tuple | None = None) -> str | None:
        """Append one generated token to ``s``: text, constraint, event; returns the finish reason (or None)."""
        s.ids.append(tok)
        self.counters["generated_tokens"] += 1
        c = s.req.constraint
        if c is not None:
            c.advance(tok)
        text = s.text.push(tok, s.max_new)
        finish = s.text.finish
        if c is not None and c.done and finish != "stop":
            # The document is complete (maybe on the very last token): nothing may follow it.
            text += s.text.finish_now("stop") if finish is None else ""
            finish = s.text.finish = "stop"
        ev = SeqEvent(s.req.id, tok, text, finish, prompt_tokens=s.n_prompt, completion_tokens=s.generated,
                      cached_tokens=s.cached_tokens)
        if lp is not None:
            ev.logprob, ids, vals = lp
            k = s.req.logprobs
            ev.top_logprobs = [(a, b) for a, b in zip(ids[:k], vals[:k]) if b != float("-inf")]
        if finish is not None:
            self._release(s)
            self.counters["finished"] += 1
        events.append((s.req, ev))
        return finish


def _deliver_direct(events: list[tuple[SeqRequest, SeqEvent]]) -> None:
    for req, ev in events:
        if req.on_event is not None:
            req.on_event(ev)
