"""Forgetting rejected proposals in caches that cannot simply overwrite them (one sequence, static cache).

Full and latent attention keep a key/value slot per token: moving ``cache.pos`` back makes the next pass
overwrite the rejected proposals' slots. Two kinds of layer keep less than that:

* a recurrent layer (Gated DeltaNet, Mamba-2) folds every token into a fixed state (``cache.states``);
* a sliding-window ring (gpt-oss, :class:`~ember.cache.SlidingWindowKV`) overwrites the oldest keys in place.

For those a verification pass first takes a :class:`Snapshot` (the states and rings, a few MB at most); when a
proposal is rejected the cache is put back as it was and the accepted tokens are run once more, so the cache
holds exactly what plain decoding of the emitted tokens would have written. A pass whose proposals are all kept
needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def needs_replay(cache) -> bool:
    """Whether ``cache`` (a :class:`~ember.cache.StaticKVCache`) has state that moving ``pos`` back does not undo."""
    return bool(getattr(cache, "states", None)) or bool(getattr(cache, "rings", None))


@dataclass
class Snapshot:
    """What a static cache holds besides its key/value slots, at one position."""

    pos: int
    states: dict[int, tuple[torch.Tensor, ...]]
    rings: dict[int, tuple[torch.Tensor, torch.Tensor, int]]

    @classmethod
    def take(cls, cache) -> "Snapshot":
        """Copies of ``cache``'s recurrent states and window rings as they are now."""
        return cls(cache.pos, {i: tuple(t.clone() for t in s) for i, s in cache.states.items()},
                   {i: (r.k.clone(), r.v.clone(), r.pos) for i, r in cache.rings.items()})

    def restore(self, cache) -> None:
        """Put ``cache`` back as it was when the snapshot was taken (in place: kernels hold its tensors)."""
        for i, saved in self.states.items():
            for t, s in zip(cache.states[i], saved):
                t.copy_(s)
        for i, (k, v, pos) in self.rings.items():
            ring = cache.rings[i]
            ring.k.copy_(k)
            ring.v.copy_(v)
            ring.pos = pos
        cache.pos = self.pos
