"""KV caches.

``StaticKVCache`` preallocates every layer's keys/values once for a batch (``Engine.generate``):
all rows share slot indices; shorter prompts are left-padded and the padding slots are masked out
(``k_valid`` in :meth:`ember.model.Transformer.forward`).

``PagedKVCache`` keeps keys/values in fixed-size blocks from one pool (block tables, vLLM style) for
the continuous-batching scheduler: sequences join and leave at any step, blocks are freed on finish
or cancel, and full blocks of a prompt prefix are shared between sequences (refcounted, found by
a chained key of their token ids).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ember.config import ModelConfig


class StaticKVCache:
    """Preallocated cache: ``k[layer]``/``v[layer]`` are (B, nkv, max_len, hd).

    Call :meth:`advance` after each forward pass to move the write position by T tokens;
    :meth:`update` writes at the current position and returns views over the filled slots.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0  # slots filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, nkv, T, hd) at slots pos..pos+T-1; return (B, nkv, pos+T, hd) views."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise IndexError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole (B, nkv, max_len, hd) key and value buffers of ``layer`` (for kernels that write in place)."""
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled (call once per forward, after all layers)."""
        self.pos += n

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


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
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the scratch block holds a zero slot and a trash slot), got {block_size}")
        self.block_size = block_size
        self.device = torch.device(device)
        self.pool = BlockPool(num_blocks, block_size)
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Uninitialised (on CPU the OS commits pages only when a block is first written); only the scratch
        # block is zeroed: masked padding reads come from its slot 0, and 0 * NaN would still be NaN.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        for t in self.k + self.v:
            t[:block_size].zero_()

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """KV bytes one token takes over all layers (keys and values)."""
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()

    def nbytes(self) -> int:
        """Bytes held by the pools."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def batch(self, tables: list[list[int]], cached: list[int], new: list[int]) -> PagedBatch:
        """Slot maps for one forward over B rows.

        Args:
            tables: each row's block table; it must already cover ``cached[i] + new[i]`` tokens.
            cached: tokens of each row already in the cache.
            new: tokens each row feeds in this pass (>= 1).
        Returns:
            a :class:`PagedBatch`: pass it as the model's cache, with its ``start``, ``positions`` and
            ``k_valid``; the input ids must be left-padded to ``T = max(new)``.
        """
        bs = self.block_size
        B = len(tables)
        total = [c + n for c, n in zip(cached, new)]
        S, T = max(total), max(new)
        width = max(len(t) for t in tables)
        tbl = torch.zeros((B, width), dtype=torch.long)
        for i, t in enumerate(tables):
            tbl[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        tot = torch.tensor(total, dtype=torch.long)[:, None]
        cac = torch.tensor(cached, dtype=torch.long)[:, None]
        nw = torch.tensor(new, dtype=torch.long)[:, None]
        # Rows are right-aligned at S: row i's token t sits at key slot S - total_i + t, so a query's own
        # slot equals its key slot and slot distance is token distance (causal and window masks hold).
        tok = torch.arange(S)[None, :] - (S - tot)                 # (B, S) token index; < 0 is padding
        k_valid = tok >= 0
        t0 = tok.clamp_min(0)
        read = torch.where(k_valid, tbl.gather(1, t0 // bs) * bs + t0 % bs, 0)
        wtok = torch.arange(T)[None, :] - (T - nw) + cac           # (B, T) token index of each input column
        w_valid = torch.arange(T)[None, :] >= (T - nw)
        w0 = wtok.clamp_min(0)
        # Padding columns write to slot 1 and padding reads come from slot 0 (both in the scratch block), so a
        # padding query's output (NaN where every key of it is masked) can never reach a masked read.
        write = torch.where(w_valid, tbl.gather(1, w0 // bs) * bs + w0 % bs, 1)
        positions = torch.where(w_valid, wtok, 0)
        padded = any(t != S for t in total)
        dev = self.device
        return PagedBatch(self, read.view(-1).to(dev), write.view(-1).to(dev), B, S, T,
                          positions.to(dev), k_valid.to(dev) if padded else None)


class PagedBatch:
    """The KVStore of one forward pass over a :class:`PagedKVCache` (see :meth:`PagedKVCache.batch`).

    ``update`` scatters the new keys/values (B, nkv, T, hd) into their slots (padding columns into the
    scratch block) and gathers every row's keys/values as a right-aligned (B, nkv, S, hd) view.
    """

    def __init__(self, cache: PagedKVCache, read: torch.Tensor, write: torch.Tensor, B: int, S: int, T: int,
                 positions: torch.Tensor, k_valid: torch.Tensor | None) -> None:
        self.cache, self.read, self.write = cache, read, write
        self.B, self.S, self.T = B, S, T
        self.start = S - T            # first key slot of the new tokens (the model's ``start``)
        self.positions = positions    # (B, T) RoPE positions, 0 at padding
        self.k_valid = k_valid        # (B, S) or None when no row is padded

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nkv, T, hd = k.shape
        kp, vp = self.cache.k[layer], self.cache.v[layer]
        kp.index_copy_(0, self.write, k.transpose(1, 2).reshape(B * T, nkv, hd).to(kp.dtype))
        vp.index_copy_(0, self.write, v.transpose(1, 2).reshape(B * T, nkv, hd).to(vp.dtype))
        keys = kp.index_select(0, self.read).view(B, self.S, nkv, hd).transpose(1, 2)    # (B, nkv, S, hd)
        values = vp.index_select(0, self.read).view(B, self.S, nkv, hd).transpose(1, 2)
        return keys, values
