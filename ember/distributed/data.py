"""Data-parallel fine-tuning: every rank holds the whole model and a share of each micro-batch's rows.

``--batch`` stays the global batch: every rank builds the same batch plan (same seed, same order) and trains on
rows ``rank, rank + n, ...`` of each micro-batch. The loss of a step is normalised by the global target count,
so the summed (all-reduced) gradient equals the one-process gradient, and the optimizer step, identical on every
rank, keeps the replicas equal. Checkpoints hold no per-rank state, so a run resumes at any world size. Only
rank 0 writes (metrics, checkpoints, the adapter); every rank reads the checkpoint it resumes from.

LoRA dropout draws its masks per rank, so with dropout on, 1 and N processes agree in expectation, not token by
token; with ``--dropout 0`` their losses agree step by step (tests/test_distributed.py).

Full fine-tuning (``--method full``) shards the decoder layers' weights, gradients and optimizer state with FSDP2
(:func:`torch.distributed.fsdp.fully_shard` on every layer): each rank keeps ``1/n`` of each, all-gathers a
layer's weights for its forward and backward, and reduce-scatters its gradients (averaged, then multiplied by
``n``: a sum, as the loss is already normalised by the global target count). The embedding, final norm and LM head stay replicated (the training forward
calls them outside any layer; their gradients are all-reduced as under LoRA). A rank with no row in a micro-batch still runs a
row whose labels carry no loss, so every rank meets every collective. Checkpoints and the final model hold the
full tensors (gathered on every rank, written by rank 0), so they resume at any world size.
"""

from __future__ import annotations

import torch

from ember.distributed import group
from ember.distributed.group import Dist


class DataParallel:
    """The hooks :class:`ember.train.trainer.Trainer` calls in a data-parallel run."""

    def __init__(self, d: Dist) -> None:
        self.rank, self.world = d.rank, d.world
        self.sharded = False  # FSDP2 (full fine-tuning)

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over each decoder layer (the training forward calls the layers as modules, whose hooks gather and
        reshard them); the embedding, final norm and LM head stay replicated, their gradients all-reduced."""
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)  # gradients averaged over the ranks (gloo has no pre-multiplied sum): see below
        self.sharded = True

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The sharded gradients made sums (FSDP2 averaged them; the loss is already normalised by the global
        target count), then the global gradient norm over sharded and replicated gradients; scales them to
        ``max_norm`` (as :func:`torch.nn.utils.clip_grad_norm_` does) when given and exceeded."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros(2, dtype=torch.float64)  # [sharded (summed over ranks), replicated (the same everywhere)]
        for g in grads:
            part = g.to_local().mul_(self.world) if isinstance(g, DTensor) else g
            sq[0 if isinstance(g, DTensor) else 1] += part.detach().double().pow(2).sum()
        sq[0] = group.all_reduce(sq[:1].clone(), "gradient norm")[0]
        norm = float(sq.sum().sqrt())
        if max_norm and max_norm > 0 and max_norm / (norm + 1e-6) < 1:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(max_norm / (norm + 1e-6))
        return norm

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """A sharded tensor gathered whole (on every rank: a collective); other tensors as they are."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    @staticmethod
    def local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` laid out as ``like`` (this rank's shard when ``like`` is sharded)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
        return full

    def full_model(self, model: torch.nn.Module) -> "FullModel":
        """The model's config and state with every sharded tensor gathered (a collective: every rank calls it),
        for :func:`ember.checkpoint_io.save_hf_checkpoint`."""
        return FullModel(model.config, {k: self.full(v.detach()) for k, v in model.state_dict().items()})

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (rank 0 only)."""
        return self.rank == 0

    def rows(self, batch):
        """This rank's rows of a micro-batch (a :class:`~ember.train.data.Batch`), or None when it has none."""
        idx = torch.arange(self.rank, batch.input_ids.shape[0], self.world)
        if not len(idx):
            if not self.sharded:
                return None
            from ember.train.data import IGNORE  # FSDP: this rank runs a row with no loss (its collectives meet)

            return type(batch)(batch.input_ids[:1], torch.full_like(batch.labels[:1], IGNORE), batch.positions[:1],
                               batch.segments[:1] if batch.segments is not None else None, 0)
        seg = batch.segments[idx] if batch.segments is not None else None
        ids = batch.input_ids[idx]
        return type(batch)(ids, batch.labels[idx], batch.positions[idx], seg, int(batch.n_tokens))

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks (one flat all-reduce; missing gradients count as 0); FSDP2's
        sharded ones are summed already (reduce-scattered)."""
        from torch.distributed.tensor import DTensor

        params = [p for p in params if not isinstance(p, DTensor)]
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


class FullModel:
    """What saving a checkpoint reads of a model (``config``, ``state_dict()``), here with whole tensors."""

    def __init__(self, config, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state
