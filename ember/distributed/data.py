"""Data-parallel fine-tuning: every rank holds the whole model and a share of each micro-batch's rows.

``--batch`` stays the global batch: every rank builds the same batch plan (same seed, same order) and trains on
rows ``rank, rank + n, ...`` of each micro-batch. The loss of a step is normalised by the global target count,
so the summed (all-reduced) gradient equals the one-process gradient, and the optimizer step, identical on every
rank, keeps the replicas equal. Checkpoints hold no per-rank state, so a run resumes at any world size. Only
rank 0 writes (metrics, checkpoints, the adapter); every rank reads the checkpoint it resumes from.

LoRA dropout draws its masks per rank, so with dropout on, 1 and N processes agree in expectation, not token by
token; with ``--dropout 0`` their losses agree step by step (tests/test_distributed.py).
"""

from __future__ import annotations

import torch

from ember.distributed import group
from ember.distributed.group import Dist


class DataParallel:
    """The hooks :class:`ember.train.trainer.Trainer` calls in a data-parallel run."""

    def __init__(self, d: Dist) -> None:
        self.rank, self.world = d.rank, d.world

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (rank 0 only)."""
        return self.rank == 0

    def rows(self, batch):
        """This rank's rows of a micro-batch (a :class:`~ember.train.data.Batch`), or None when it has none."""
        idx = torch.arange(self.rank, batch.input_ids.shape[0], self.world)
        if not len(idx):
            return None
        seg = batch.segments[idx] if batch.segments is not None else None
        ids = batch.input_ids[idx]
        return type(batch)(ids, batch.labels[idx], batch.positions[idx], seg, int(batch.n_tokens))

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks (one flat all-reduce; missing gradients count as 0)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        group.all_reduce(flat, "gradients")
        at = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n

    def reduce_sum(self, value: float) -> float:
        """``value`` summed over the ranks (the step's loss sum)."""
        t = torch.tensor([value], dtype=torch.float64)
        return float(group.all_reduce(t, "loss")[0])
