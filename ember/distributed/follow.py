"""Rank 0 leads, the other ranks follow: for verbs where only rank 0 knows the work (``chat`` reads stdin).

Rank 0's engine announces each generation (the prompt ids and sampling parameters) before running it
(``Engine.on_generate``); every other rank loads the same part of the model, then waits for the announcement and
runs the same generation, so the collectives inside the model's forward meet. Rank 0 announces None when the verb
ends; a rank 0 that dies ends the followers' wait at once (its connections reset).
"""

from __future__ import annotations

from ember.distributed import group


def lead(engine) -> None:
    """On rank 0: announce every generation of ``engine`` to the followers."""
    engine.on_generate = lambda ids, params: group.announce((ids, params))


def follow(engine) -> int:
    """On the other ranks: run each generation rank 0 announces until it announces None; returns 0."""
    while True:
        work = group.announce(None)
        if work is None:
            return 0
        ids, params = work
        with group.phase(f"following rank 0's generation ({len(ids)} x {max(map(len, ids))} tokens)"):
            for _ in engine._generate(ids, params):
                pass


def finish() -> None:
    """On rank 0, when the verb ends: tell the followers to stop."""
    group.announce(None)

