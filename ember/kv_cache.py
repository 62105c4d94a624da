"""KV caches. ``StaticKVCache`` preallocates every layer's keys/values once for a batch.

All rows of a batch share slot indices; shorter prompts are left-padded and the padding slots
are masked out (``k_valid`` in :meth:`ember.model.Transformer.forward`).
"""

from __future__ import annotations

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

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled (call once per forward, after all layers)."""
        self.pos += n

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
