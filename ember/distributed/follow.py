"""Rank 0 leads, the other ranks follow: for verbs where only rank 0 knows the work (``chat`` reads stdin,
``serve`` answers HTTP requests).

Rank 0 announces each unit of work before running it; every other rank loads the same part of the model, then
waits for the announcement and runs the same computation, so the collectives inside the model's forward meet:

* a generation (``Engine.on_generate``): the prompt ids and sampling parameters; the follower runs the same
  generation (chat);
* a continuous-batching forward (``BatchScheduler.on_forward``): the KV pool's layout, each row's block table,
  cached and new token counts and the input ids; the follower keeps a paged cache of the same layout and runs the
  same forward (serve). The scheduling decisions are rank 0's; the followers only replay forwards.

Rank 0 announces None when the verb ends; a rank 0 that dies ends the followers' wait at once (its connections
reset).
"""

from __future__ import annotations

import torch

from ember.cache import PagedKVCache
from ember.distributed import group
from ember.errors import DistributedError


def lead(engine) -> None:
    """On rank 0: announce every generation and every batched forward of ``engine`` to the followers."""
    engine.on_generate = lambda ids, params: group.announce(("generate", ids, params))
    engine.on_batch_forward = lambda *work: group.announce(("forward", *work))


def follow(engine) -> int:
    """On the other ranks: run each piece of work rank 0 announces until it announces None; returns 0."""
    paged: PagedKVCache | None = None
    while True:
        work = group.announce(None)
        if work is None:
            return 0
        if work[0] == "generate":
            _, ids, params = work
            with group.phase(f"following rank 0's generation ({len(ids)} x {max(map(len, ids))} tokens)"):
                for _ in engine._generate(ids, params):
                    pass
            continue
        _, (num_blocks, block_size, max_seqs), tables, cached, new, slots, ids = work
        if paged is None:
            paged = PagedKVCache(engine.config, num_blocks, block_size, engine.dtype, engine.device, max_seqs=max_seqs)
            if paged.states is not None:
                raise DistributedError("serve under --pp/--tp: models with recurrent layers are not supported; "
                                       "serve them as one process")
        with group.phase(f"following rank 0's batched forward ({ids.shape[0]} x {ids.shape[1]} tokens)"), \
                torch.inference_mode():
            batch = paged.batch(tables, cached, new, slots)
            engine.model(ids.to(engine.device), batch.positions, batch, batch.start, batch.k_valid, last_only=True)


def finish() -> None:
    """On rank 0, when the verb ends: tell the followers to stop."""
    group.announce(None)
