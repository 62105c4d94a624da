"""The decode caches: :class:`StaticKVCache` for one batch of the engine, :class:`PagedKVCache` for the scheduler's
continuous batch. What each layer keeps and what it costs is :mod:`ember.cache_layout` (re-exported here).

``StaticKVCache`` preallocates every layer's keys/values once for a batch (``Engine.generate``):
all rows share slot indices; shorter prompts are left-padded and the padding slots are masked out
(``k_valid`` in :meth:`ember.models.Transformer.forward`). A sliding-window layer (:func:`ring_layers`) whose
window is shorter than the cache keeps only its window, in a :class:`SlidingWindowKV` ring (the token at
position p in slot p % window); its attention takes the window's keys only and cuts the model's mask to them
(:func:`ember.models.attention.fit_mask`), and its fused CPU decode block writes and reads the ring in place.

``PagedKVCache`` keeps keys/values in fixed-size blocks from one pool (block tables, vLLM style) for
the continuous-batching scheduler: sequences join and leave at any step, blocks are freed on finish
or cancel, and full blocks of a prompt prefix are shared between sequences (refcounted, found by
a chained key of their token ids). :meth:`PagedKVCache.blocks_for` is the scheduler's block accounting and
``PagedKVCache.states`` its recurrent-state slots (None while no layer is recurrent). The sliding-window layers
(:func:`ring_layers`) keep their blocks in a second pool, ``PagedKVCache.window_pool``, with a block table of
their own per sequence: a block wholly older than the window of the oldest query of a pass goes back to that
pool (:meth:`PagedKVCache.expired_window_blocks`), so a sequence holds at most
:meth:`PagedKVCache.window_blocks_per_seq` of them however long it runs.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ember.cache_layout import (LAYER_KINDS, NO_KV, RECURRENT_STATE_DTYPE, LayerSpec, bytes_per_sequence,
                                bytes_per_token, cache_bytes, kv_shapes, layer_specs, recurrent_state_shapes,
                                ring_layers, window_blocks_per_seq)
from ember.config import ModelConfig

__all__ = ["LAYER_KINDS", "NO_KV", "RECURRENT_STATE_DTYPE", "LayerSpec", "bytes_per_sequence", "bytes_per_token",
           "cache_bytes", "kv_shapes", "layer_specs", "recurrent_state_shapes", "ring_layers", "window_blocks_per_seq",
           "StaticKVCache", "BlockPool", "PagedKVCache", "PagedBatch", "SlidingWindowKV", "RecurrentStateSlots"]


class StaticKVCache:
    """Preallocated cache: ``k[layer]``/``v[layer]`` are (B, nkv, max_len, hd).

    Call :meth:`advance` after each forward pass to move the write position by T tokens;
    :meth:`update` writes at the current position and returns views over the filled slots.
    """

    caps_sliding_window = True  # a sliding layer keeps only its window (ring_layers), unless made with windows=False

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 windows: bool = True) -> None:
        """``windows=False``: every layer keeps all ``max_len`` slots (the sliding layers mask the older keys), for a
        cache whose position moves back (a draft model's, :class:`ember.speculative.DraftProposer`)."""
        self.specs = layer_specs(cfg)
        # layers that keep only their window (when it is shorter than max_len): a ring each, no full buffer
        self.rings = {i: SlidingWindowKV(batch, self.specs[i].kv_heads, self.specs[i].head_dim, self.specs[i].window,
                                         dtype, device)
                      for i in ring_layers(cfg) if windows and self.specs[i].window < max_len}
        # a ring, recurrent or shared layer keeps no full keys/values (an empty tensor keeps the lists indexed by
        # layer); a recurrent layer keeps its state instead; a latent layer keeps the latent and the rotated key
        full = [s.kind not in NO_KV and i not in self.rings for i, s in enumerate(self.specs)]
        shapes = [kv_shapes(s) for s in self.specs]
        self.k = [torch.zeros((batch, kh, max_len, kd) if a else (0,), dtype=dtype, device=device)
                  for a, ((kh, kd), _) in zip(full, shapes)]
        self.v = [torch.zeros((batch, vh, max_len, vd) if a else (0,), dtype=dtype, device=device)
                  for a, (_, (vh, vd)) in zip(full, shapes)]
        self.states: dict[int, tuple[torch.Tensor, ...]] = {
            i: tuple(torch.zeros(batch, *shape, dtype=RECURRENT_STATE_DTYPE, device=device) for shape in s.state_shapes)
            for i, s in enumerate(self.specs) if s.kind == "recurrent"}
        self.max_len = max_len
        self.pos = 0  # slots filled so far

    def recurrent_state(self, layer: int) -> tuple[torch.Tensor, ...]:
        """``layer``'s state for every row: (B, *shape) per :attr:`LayerSpec.state_shapes` (zeros before the first
        token). Read it, then hand the new state to :meth:`set_recurrent_state`."""
        return self.states[layer]

    def set_recurrent_state(self, layer: int, states: tuple[torch.Tensor, ...]) -> None:
        """Keep ``layer``'s new state (as :meth:`recurrent_state` returned it, after this pass's tokens)."""
        for t, s in zip(self.states[layer], states):
            if s is not t:  # a decode kernel may have updated the state in place
                t.copy_(s)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, nkv, T, hd) at slots pos..pos+T-1; return (B, nkv, pos+T, hd) views. A ring layer returns
        only the last ``min(pos, window - 1) + T`` slots' keys/values (the ones its queries can see)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise IndexError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        ring = self.rings.get(layer)
        if ring is not None:
            keys, values, _ = ring.update(k, v)
            return keys, values
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers of ``layer`` (for kernels that write in place): (B, nkv, max_len, hd), or
        a ring layer's (B, nkv, window, hd) ring, the token at position p in slot p % window."""
        ring = self.rings.get(layer)
        if ring is not None:
            return ring.k, ring.v
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled (call once per forward, after all layers); the rings follow (a fused
        decode kernel writes a ring in place without moving its position)."""
        self.pos += n
        for ring in self.rings.values():
            ring.pos = self.pos

    def nbytes(self) -> int:
        """Bytes held by the cache (keys/values, window rings and recurrent state)."""
        return (sum(t.numel() * t.element_size() for t in self.k + self.v + [x for s in self.states.values() for x in s])
                + sum(r.nbytes() for r in self.rings.values()))


class BlockPool:
    """Fixed-size KV blocks with reference counts and a prefix cache.

    Block 0 is a scratch block that is never handed out: padding writes land in its slot 1 and
    padding reads come from its slot 0 (they are masked). A block whose count drops to 0 is free; if it holds a
    registered prompt prefix it stays findable by its key until it is reused (least recently freed
    first), so a later request with the same prefix gets it back without recomputing it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self._plain: list[int] = list(range(num_blocks - 1, 0, -1))  # free, no cached content; pop() -> 1, 2, ...
        self._cached: OrderedDict[int, None] = OrderedDict()  # free, content registered; oldest first
        self._key_of: dict[int, tuple] = {}
        self._by_key: dict[tuple, int] = {}

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks with no owner (including cached ones that may be reclaimed)."""
        return len(self._plain) + len(self._cached)

    def allocate(self) -> int:
        """A free block with count 1; uncached blocks go first, then the least recently freed cached one."""
        if self._plain:
            block = self._plain.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler's reservation should prevent this)")
        self.refs[block] = 1
        return block

    def lookup(self, key: tuple) -> int | None:
        """The block holding the prefix ``key``, or None."""
        return self._by_key.get(key)

    def acquire(self, block: int) -> None:
        """Add an owner to ``block`` (taking it off the free list if it was free)."""
        if self.refs[block] == 0:
            self._cached.pop(block)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one owner; a block with none left becomes free (and stays findable if registered)."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._plain.append(block)

    def register(self, block: int, key: tuple) -> None:
        """Mark a full, owned block as holding the prefix ``key`` (first registration wins)."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key


class PagedKVCache:
    """KV cache in fixed-size blocks shared by all sequences of a continuous batch.

    Storage per layer is one pool ``k[layer]``/``v[layer]`` of shape (num_blocks * block_size, nkv, hd);
    a sequence owns a block table (list of block ids), token ``t`` living at slot
    ``table[t // block_size] * block_size + t % block_size``. :meth:`batch` builds the
    :class:`PagedBatch` (a KVStore) for one forward pass over rows at different lengths.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", max_seqs: int = 1,
                 prefill_chunk: int = 256) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the scratch block holds a zero slot and a trash slot), got {block_size}")
        self.block_size = block_size
        self.device = torch.device(device)
        self.specs = layer_specs(cfg)
        self.pool = BlockPool(num_blocks, block_size)
        # recurrent layers' per-sequence state, ``max_seqs`` slots (None while no layer is recurrent): the
        # scheduler admits a sequence only with a free slot and retires its slot with its blocks
        recurrent = any(s.kind == "recurrent" for s in self.specs)
        self.states: RecurrentStateSlots | None = (
            RecurrentStateSlots(self.specs, max_seqs, RECURRENT_STATE_DTYPE, device) if recurrent else None)
        # Sliding layers: their own pool, sized so that ``max_seqs`` sequences never run out of it (a sequence
        # holds at most window_blocks_per_seq() blocks at once, for passes of up to ``prefill_chunk`` tokens, and
        # never more than its blocks in the main pool, so ``num_blocks`` always suffices).
        # Every sliding layer with keys/values of its own (ring_layers) gives its blocks back there.
        rings = ring_layers(cfg)
        self.windowed = [i in rings for i in range(len(self.specs))]
        self.window: int | None = max((self.specs[i].window for i in rings), default=None)
        self.prefill_chunk = prefill_chunk
        self.window_pool: BlockPool | None = (
            BlockPool(min(num_blocks, 1 + max_seqs * self.window_blocks_per_seq()), block_size)
            if self.window is not None else None)
        shapes = [kv_shapes(s) for s in self.specs]
        # Uninitialised (on CPU the OS commits pages only when a block is first written); only the scratch
        # block is zeroed: masked padding reads come from its slot 0, and 0 * NaN would still be NaN.
        # A recurrent or shared layer has no pool (an empty tensor keeps the lists indexed by layer).
        kv = [s.kind not in NO_KV for s in self.specs]
        slots = [(self.window_pool.num_blocks if w else num_blocks) * block_size for w in self.windowed]
        self.k = [torch.empty((n, kh, kd) if a else (0, 1, 1), dtype=dtype, device=device)
                  for a, n, ((kh, kd), _) in zip(kv, slots, shapes)]
        self.v = [torch.empty((n, vh, vd) if a else (0, 1, 1), dtype=dtype, device=device)
                  for a, n, (_, (vh, vd)) in zip(kv, slots, shapes)]
        for t in self.k + self.v:
            t[:block_size].zero_()

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """KV bytes one token takes over all layers (keys and values), as this cache allocates them."""
        return sum(bytes_per_token(s, dtype) for s in layer_specs(cfg))

    def blocks_for(self, tokens: int) -> int:
        """Blocks of the pool one sequence of ``tokens`` tokens needs: the scheduler reserves this many at
        admission. Every attention layer indexes the one block table, so it covers every token."""
        return math.ceil(tokens / self.block_size)

    def window_blocks_per_seq(self) -> int:
        """Most window-pool blocks one sequence holds at once: a pass of up to ``prefill_chunk`` new tokens
        reads back ``window - 1`` tokens, a span that touches at most this many blocks (0: no sliding layer)."""
        return window_blocks_per_seq(self.window, self.prefill_chunk, self.block_size)

    def expired_window_blocks(self, computed: int) -> int:
        """How many leading blocks of a sequence's window table no pass from token ``computed`` on reads: the
        oldest query, ``computed``, sees keys from ``computed - window + 1`` (a key ``window`` or more tokens
        back is masked)."""
        if self.window is None:
            return 0
        return max(0, computed - self.window + 1) // self.block_size

    def nbytes(self) -> int:
        """Bytes held by the pools and the recurrent-state slots."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + (self.states.nbytes() if self.states else 0)

    def batch(self, tables: list[list[int]], cached: list[int], new: list[int],
              slots: list[int] | None = None, window_tables: list[list[int]] | None = None) -> PagedBatch:
        """Slot maps for one forward over B rows.

        Args:
            tables: each row's block table; it must already cover ``cached[i] + new[i]`` tokens.
            cached: tokens of each row already in the cache.
            new: tokens each row feeds in this pass (>= 1).
            slots: each row's recurrent-state slot (:attr:`states`), for models with recurrent layers.
            window_tables: each row's block table in :attr:`window_pool` (models with sliding layers), covering
                the same tokens; -1 for a block given back (:meth:`expired_window_blocks`).
        Returns:
            a :class:`PagedBatch`: pass it as the model's cache, with its ``start``, ``positions`` and
            ``k_valid``; the input ids must be left-padded to ``T = max(new)``.
        """
        B = len(tables)
        total = [c + n for c, n in zip(cached, new)]
        S, T = max(total), max(new)
        tot = torch.tensor(total, dtype=torch.long)[:, None]
        cac = torch.tensor(cached, dtype=torch.long)[:, None]
        nw = torch.tensor(new, dtype=torch.long)[:, None]
        # Rows are right-aligned at S: row i's token t sits at key slot S - total_i + t, so a query's own
        # slot equals its key slot and slot distance is token distance (causal and window masks hold).
        tok = torch.arange(S)[None, :] - (S - tot)                 # (B, S) token index; < 0 is padding
        k_valid = tok >= 0
        wtok = torch.arange(T)[None, :] - (T - nw) + cac           # (B, T) token index of each input column
        w_valid = torch.arange(T)[None, :] >= (T - nw)
        read, write = self._slot_maps(tables, tok, k_valid, wtok, w_valid)
        window_maps = None
        if self.window_pool is not None:
            if window_tables is None:
                raise ValueError("this model has sliding-window layers: PagedKVCache.batch needs window_tables")
            window_maps = self._slot_maps(window_tables, tok, k_valid, wtok, w_valid)
        positions, dev = torch.where(w_valid, wtok, 0), self.device
        batch = PagedBatch(self, read.view(-1).to(dev), write.view(-1).to(dev), B, S, T, positions.to(dev),
                           k_valid.to(dev) if any(t != S for t in total) else None, slots,
                           None if window_maps is None else tuple(m.view(-1).to(dev) for m in window_maps))
        batch.new_valid = w_valid.to(dev) if any(n != T for n in new) else None  # (B, T) False at padding columns
        return batch

    def _slot_maps(self, tables: list[list[int]], tok: torch.Tensor, k_valid: torch.Tensor, wtok: torch.Tensor,
                   w_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(read (B, S), write (B, T)) pool slots of each key and each new token through block tables."""
        bs = self.block_size
        width = max(len(t) for t in tables)
        tbl = torch.full((len(tables), width), -1, dtype=torch.long)
        for i, t in enumerate(tables):
            tbl[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        t0 = tok.clamp_min(0)
        blk = tbl.gather(1, t0 // bs)
        # Padding and given-back blocks read slot 0 of the scratch block (zeros; always masked).
        read = torch.where(k_valid & (blk >= 0), blk * bs + t0 % bs, 0)
        w0 = wtok.clamp_min(0)
        # Padding columns write to slot 1 and padding reads come from slot 0 (both in the scratch block), so a
        # padding query's output (NaN where every key of it is masked) can never reach a masked read.
        write = torch.where(w_valid, tbl.gather(1, w0 // bs) * bs + w0 % bs, 1)
        return read, write


class PagedBatch:
    """The KVStore of one forward pass over a :class:`PagedKVCache` (see :meth:`PagedKVCache.batch`).

    ``update`` scatters the new keys/values (B, nkv, T, hd) into their slots (padding columns into the
    scratch block) and gathers every row's keys/values as a right-aligned (B, nkv, S, hd) view.
    """

    def __init__(self, cache: PagedKVCache, read: torch.Tensor, write: torch.Tensor, B: int, S: int, T: int,
                 positions: torch.Tensor, k_valid: torch.Tensor | None, slots: list[int] | None = None,
                 window_maps: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.cache, self.read, self.write = cache, read, write
        self.window_maps = window_maps  # (read, write) in the window pool, for the sliding layers
        self.B, self.S, self.T = B, S, T
        self.start = S - T            # first key slot of the new tokens (the model's ``start``)
        self.positions = positions    # (B, T) RoPE positions, 0 at padding
        self.k_valid = k_valid        # (B, S) or None when no row is padded
        self.slots = slots            # each row's recurrent-state slot (models with recurrent layers)

    def recurrent_state(self, layer: int) -> list[torch.Tensor]:
        """The rows' states in recurrent ``layer``, gathered from their slots: (B, *shape) each."""
        if self.slots is None:
            raise ValueError("this model has recurrent layers: PagedKVCache.batch needs each row's state slot")
        return self.cache.states.gather(layer, self.slots)

    def set_recurrent_state(self, layer: int, states) -> None:
        """Write the rows' new states back to their slots."""
        self.cache.states.scatter(layer, self.slots, list(states))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nkv, T, hd = k.shape
        nv, dv = v.shape[1], v.shape[3]  # the keys' unless a latent layer (the rotated key's)
        kp, vp = self.cache.k[layer], self.cache.v[layer]
        read, write = self.window_maps if self.cache.windowed[layer] else (self.read, self.write)
        kp.index_copy_(0, write, k.transpose(1, 2).reshape(B * T, nkv, hd).to(kp.dtype))
        vp.index_copy_(0, write, v.transpose(1, 2).reshape(B * T, nv, dv).to(vp.dtype))
        keys = kp.index_select(0, read).view(B, self.S, nkv, hd).transpose(1, 2)    # (B, nkv, S, hd)
        values = vp.index_select(0, read).view(B, self.S, nv, dv).transpose(1, 2)
        return keys, values


class SlidingWindowKV:
    """Keys/values of one sliding-window layer for a batch, keeping only the window: a ring of ``window`` slots.

    A query at position p sees keys at positions p - window + 1 .. p. :meth:`update` takes the T new tokens'
    keys/values, returns the keys/values their queries need (the last ``window - 1`` tokens before them, then
    the new ones) with each key's position, and keeps the last ``window`` tokens in the ring: the memory never
    grows past ``window`` tokens whatever the sequence length. :meth:`mask` says which returned key each new
    query may see. All rows share positions (as :class:`StaticKVCache`'s slots).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.k = torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device)  # ring, slot = pos % w
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # tokens written so far

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add k/v (B, nkv, T, hd) of positions pos..pos+T-1; return keys/values (B, nkv, n + T, hd) of positions
        pos-n .. pos+T-1 (n = min(pos, window - 1): the older keys the new queries can still see), and those
        positions (n + T,)."""
        T, w, pos = k.shape[2], self.window, self.pos
        dev = self.k.device
        n = min(pos, w - 1)
        old = torch.arange(pos - n, pos, device=dev) % w  # ring slots of the kept keys, oldest first
        keys = torch.cat([self.k.index_select(2, old), k.to(self.k.dtype)], dim=2)
        values = torch.cat([self.v.index_select(2, old), v.to(self.v.dtype)], dim=2)
        keep = min(T, w)  # the new tokens that stay in the window
        slots = torch.arange(pos + T - keep, pos + T, device=dev) % w
        self.k.index_copy_(2, slots, k[:, :, T - keep:].to(self.k.dtype))
        self.v.index_copy_(2, slots, v[:, :, T - keep:].to(self.v.dtype))
        self.pos = pos + T
        return keys, values, torch.arange(pos - n, pos + T, device=dev)

    def mask(self, key_positions: torch.Tensor, T: int) -> torch.Tensor:
        """(T, S) bool for the last :meth:`update`: query t (position pos-T+t) may see key j when the key is not
        in its future and less than ``window`` tokens back."""
        q = torch.arange(self.pos - T, self.pos, device=key_positions.device)[:, None]
        kp = key_positions[None, :]
        return (kp <= q) & (q - kp < self.window)

    def nbytes(self) -> int:
        """Bytes held (the ring: ``window`` tokens, whatever the sequence length)."""
        return 2 * self.k.numel() * self.k.element_size()


class RecurrentStateSlots:
    """Fixed-size per-sequence state of the recurrent layers (convolution windows, SSM or delta-rule
    matrices), one slot per running sequence, for a continuous batch.

    ``tensors[layer][i]`` is (max_seqs, *spec.state_shapes[i]): a sequence is admitted to a free slot (zeroed:
    a new sequence starts from the zero state), its rows are read and written in place by the layer
    (:meth:`gather`, :meth:`scatter` for the rows of one batch), and it is retired when it finishes or is
    cancelled, freeing the slot for the next one. Memory is fixed at construction: ``max_seqs`` x
    :func:`bytes_per_sequence` of each recurrent layer.
    """

    def __init__(self, specs: list[LayerSpec], max_seqs: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        self.layers = [i for i, s in enumerate(specs) if s.kind == "recurrent"]
        self.tensors = {i: [torch.zeros(max_seqs, *shape, dtype=dtype, device=device) for shape in specs[i].state_shapes]
                        for i in self.layers}
        self.max_seqs = max_seqs
        self._free = list(range(max_seqs - 1, -1, -1))  # pop() -> 0, 1, ...
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        """Slots a new sequence can take."""
        return len(self._free)

    def admit(self) -> int:
        """A free slot, its state zeroed in every recurrent layer.

        Raises:
            RuntimeError: every slot is taken (the scheduler admits only while :attr:`num_free` > 0).
        """
        if not self._free:
            raise RuntimeError(f"all {self.max_seqs} recurrent-state slots are taken")
        slot = self._free.pop()
        self._used.add(slot)
        for ts in self.tensors.values():
            for t in ts:
                t[slot].zero_()
        return slot

    def retire(self, slot: int) -> None:
        """Give a finished or cancelled sequence's slot back."""
        if slot not in self._used:
            raise ValueError(f"recurrent-state slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)

    def save(self, slot: int) -> list[torch.Tensor]:
        """Copies of ``slot``'s state in every recurrent layer, to put back with :meth:`load` (a speculative
        pass whose proposals are rejected)."""
        return [t[slot].clone() for i in self.layers for t in self.tensors[i]]

    def load(self, slot: int, saved: list[torch.Tensor]) -> None:
        """Put ``slot``'s states back as :meth:`save` copied them (in place)."""
        it = iter(saved)
        for i in self.layers:
            for t in self.tensors[i]:
                t[slot].copy_(next(it))

    def gather(self, layer: int, slots: list[int]) -> list[torch.Tensor]:
        """The states of ``slots`` (the rows of a batch, in order) in ``layer``: one (B, *shape) tensor each."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.tensors[layer][0].device)
        return [t.index_select(0, idx) for t in self.tensors[layer]]

    def scatter(self, layer: int, slots: list[int], states: list[torch.Tensor]) -> None:
        """Write the batch's updated states (as :meth:`gather` returned them) back to their slots."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.tensors[layer][0].device)
        for t, s in zip(self.tensors[layer], states):
            t.index_copy_(0, idx, s.to(t.dtype))

    def nbytes(self) -> int:
        """Bytes held by every slot of every recurrent layer."""
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts)
