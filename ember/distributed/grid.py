"""``--pp P --tp T``: P pipeline stages, each split over T tensor-parallel ranks (P T processes).

Rank ``stage T + t`` holds layers ``[start, stop)`` of its stage (:class:`~ember.distributed.pipeline.PipelineShard`)
and tensor shard ``t`` of each of them (:class:`~ember.distributed.tensor.TensorShard`). The stage's T ranks
all-reduce over their own group (made by :func:`ember.distributed.group.init`); the hidden state goes from rank
``(s, t)`` to rank ``(s + 1, t)`` (every rank of a stage holds the whole hidden state after its all-reduces); the
last stage's first rank broadcasts the logits to every rank. The embedding (first stage) and the LM head (last
stage) are kept whole within the stage: the pipeline swaps them for its receiving modules.

Order of the swaps: tensor-parallel ones when the weights are in (so ``--quant`` quantizes the stage's shards as
under TP alone), the pipeline's sending ones after quantizing (:meth:`GridShard.ready`).
"""

from __future__ import annotations

from torch import nn

from ember.config import ModelConfig
from ember.distributed.group import Dist
from ember.distributed.pipeline import PipelineShard
from ember.distributed.tensor import GGUFCut, ShardView, TensorShard


class GridShard:
    """This rank's stage and tensor shard: what :func:`ember.loading.load_model` builds and reads."""

    def __init__(self, d: Dist, cfg: ModelConfig) -> None:
        self.pipe = PipelineShard(d, cfg)
        self.tensor = TensorShard(d, cfg, split_vocab=False)

    def describe(self) -> str:
        return f"{self.pipe.describe()}, {self.tensor.describe()}"

    def select(self, model: nn.Module, ckpt) -> ShardView:
        """Cut the model to the stage, then each of its layers to the tensor shard; the checkpoint seen as this
        rank's slices of the stage's tensors (nothing read)."""
        return self.tensor.select(model, self.pipe.select(model, ckpt))

    def prune(self, model: nn.Module) -> None:
        """The stage's layers, each cut to the tensor shard (a GGUF file's loader reads by :meth:`local_name`)."""
        self.pipe.prune(model)
        self.tensor.prune(model)

    def local_name(self, name: str) -> str | None:
        return self.pipe.local_name(name)

    def gguf_cut(self, name: str, shape: tuple[int, ...]) -> GGUFCut | None:
        return self.tensor.gguf_cut(name, shape)

    def finish(self, model: nn.Module) -> None:
        self.tensor.finish(model)
        self.pipe.receive(model)

    def quantize(self, model: nn.Module, quant: str, group_size: int | None, lm_head: str | None) -> None:
        self.tensor.quantize(model, quant, group_size, lm_head)

    def ready(self, model: nn.Module) -> None:
        self.tensor.ready(model)
        self.pipe.connect(model)
