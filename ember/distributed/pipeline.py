"""Pipeline parallel inference: each rank holds a contiguous run of layers and reads only their tensors.

Stage ``r`` of ``n`` keeps layers ``[start, stop)`` (split by :func:`ember.planner.parallel.split_layers` over
the planner's per-layer bytes, the embedding counted on the first stage and the LM head on the last), the
final norm (a few KiB, so every rank knows the compute dtype) and:

* the first stage: the embedding table;
* the last stage: the LM head (and the embedding table when the head is tied to it).

Nothing in the model definitions changes (docs/design.md, principle 3): the run is three module swaps made
after loading, so :meth:`ember.models.Transformer.forward`, the engine and the CPU runtime's fused decode of
the stage's leading layers work as they are:

* ``model.embed_tokens`` on stages after the first: :class:`ReceiveHidden` receives the (B, T, H) hidden
  state from the stage before;
* the stage's last layer on stages before the last: :class:`SendAfter` runs it and sends its output on;
* ``lm_head``: the last stage's :class:`BroadcastLogits` computes the logits and broadcasts them; every other
  stage's :class:`ReceiveLogits` receives them. Every rank then samples the same token from the same logits.

In ``serve``, stage 0's :class:`LogitsFence` lets the batch scheduler split a decode step into two micro-batches:
the logits broadcast of the first is started, not waited for, so stage 0 runs the second's layers while the later
stages run the first's; the scheduler samples once both broadcasts are done.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ember.config import ModelConfig
from ember.distributed import group
from ember.distributed.group import Dist
from ember.errors import DistributedError
from ember.loading.moe import ExpertLayoutView
from ember.planner.memory import weight_bytes
from ember.planner.parallel import layer_bytes, split_layers

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")


def stage_ranges(cfg: ModelConfig, stages: int, quant: str = "none") -> list[tuple[int, int]]:
    """Each stage's ``[start, stop)`` layers, balancing weight bytes (embedding on the first stage; the LM head,
    or the embedding it is tied to, on the last). Priced in bf16: the split depends on ratios only."""
    q = quant if quant in ("none", "int8", "int4", "nf4") else "none"  # mxfp4 and GGUF types: priced as float
    wb = weight_bytes(cfg, "bf16", q)
    return split_layers(layer_bytes(cfg, "bf16", q), stages, first_extra=wb.embedding,
                        last_extra=wb.lm_head or wb.embedding)


class ReceiveHidden(nn.Module):
    """Stands in for the embedding on a later stage: (B, T) ids -> the (B, T, H) hidden state from ``src``."""

    def __init__(self, hidden: int, src: int) -> None:
        super().__init__()
        self.hidden, self.src = hidden, src
        self.dtype, self.device = torch.float32, torch.device("cpu")

    @property
    def weight(self) -> torch.Tensor:
        """No table here: an empty tensor with the stage's dtype and device (what callers ask the table for)."""
        return torch.empty(0, dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = torch.empty(B, T, self.hidden, dtype=self.dtype, device=self.device)
        return group.recv(x, self.src, f"hidden state ({B}x{T}x{self.hidden})")


class SendAfter(nn.Module):
    """A stage's last layer: runs it, then sends its (B, T, H) output to the next stage."""

    def __init__(self, layer: nn.Module, dst: int) -> None:
        super().__init__()
        self.layer, self.dst = layer, dst
        self.window = getattr(layer, "window", None)
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        y = self.layer(x, *args)
        group.send(y, self.dst, "hidden state")
        return y


class LogitsFence:
    """Micro-batches in flight: between :meth:`open` and :meth:`close` this rank's logits broadcasts are started,
    not waited for, so stage 0 runs the next micro-batch's layers while the later stages run this one's.

    The batch scheduler opens it around the micro-batches of one decode step (``model.logits_fence``) and reads
    the logits only after :meth:`close`, which waits for every broadcast started.
    """

    def __init__(self) -> None:
        self.waits: list | None = None

    def open(self) -> None:
        self.waits = []

    def close(self) -> None:
        waits, self.waits = self.waits or [], None
        for wait in waits:
            wait()

    def micro_batches(self, rows: list, forward, scheduler) -> list[tuple[list, torch.Tensor | None]]:
        """A decode step's ``rows`` as two micro-batches in flight: ``[(part, forward(part)), ...]`` with every
        part's logits arrived (one batch for a single row). A lost rank sets ``scheduler.broken`` (no rows back)."""
        if len(rows) < 2:
            return [(rows, forward(rows))]
        out = []
        self.open()
        try:
            for part in (rows[:len(rows) // 2], rows[len(rows) // 2:]):
                out.append((part, forward(part) if scheduler.broken is None else None))
        finally:
            try:
                self.close()
            except DistributedError as e:  # the logits never came: the scheduler fails the rows
                scheduler.broken = e
        return out if scheduler.broken is None else []

    def broadcast(self, logits: torch.Tensor, src: int) -> torch.Tensor:
        if self.waits is None:
            return group.broadcast(logits, src, "logits")
        self.waits.append(group.broadcast_async(logits, src, "logits"))
        return logits  # filled by close()


class BroadcastLogits(nn.Module):
    """The last stage's LM head: computes the logits, then broadcasts them to every stage."""

    def __init__(self, head: nn.Module, src: int, fence: LogitsFence) -> None:
        super().__init__()
        self.head, self.src, self.fence = head, src, fence

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fence.broadcast(self.head(x).contiguous(), self.src)


class ReceiveLogits(nn.Module):
    """The LM head of a stage before the last: (B, T, H) -> the (B, T, V) logits the last stage broadcasts."""

    def __init__(self, vocab: int, src: int, fence: LogitsFence | None = None) -> None:
        super().__init__()
        self.vocab, self.src, self.fence = vocab, src, fence or LogitsFence()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.empty(*x.shape[:-1], self.vocab, dtype=x.dtype, device=x.device)
        return self.fence.broadcast(logits, self.src)


class PipelineShard:
    """This rank's stage: what :func:`ember.loading.load_model` keeps and reads (see the module docstring)."""

    def __init__(self, d: Dist, cfg: ModelConfig, quant: str = "none") -> None:
        if d.stages > cfg.num_hidden_layers:
            raise DistributedError(f"--pp {d.stages}: the model has only {cfg.num_hidden_layers} layers; "
                                   f"use at most {cfg.num_hidden_layers} stages")
        self.d, self.cfg = d, cfg
        self.ranges = stage_ranges(cfg, d.stages, quant)
        self.start, self.stop = self.ranges[d.stage]
        self.first, self.last = d.stage == 0, d.stage == d.stages - 1
        self.keep_embed = self.first or (self.last and cfg.tie_word_embeddings)
        # hidden states go to the same tensor-parallel rank of the next stage; the logits come from the last
        # stage's first rank (one source for every rank: a broadcast's source must agree)
        self.prev = d.stage_rank(d.stage - 1) if not self.first else None
        self.next = d.stage_rank(d.stage + 1) if not self.last else None
        self.logits_src = (d.stages - 1) * d.tp
        self.fence = LogitsFence()

    def describe(self) -> str:
        return f"pipeline stage {self.d.stage + 1}/{self.d.stages}, layers {self.start}-{self.stop - 1}"

    def prune(self, model: nn.Module) -> None:
        """Cut a meta-device model to this stage: its layers (renumbered from 0; each keeps its cache index),
        the embedding and head only where kept."""
        model.model.layers = nn.ModuleList(list(model.model.layers)[self.start:self.stop])
        if not self.keep_embed:
            model.model.embed_tokens = ReceiveHidden(self.cfg.hidden_size, self.prev)
        if not self.last:
            model.lm_head = ReceiveLogits(self.cfg.vocab_size, self.logits_src, self.fence)

    def local_name(self, name: str) -> str | None:
        """The pruned model's name for checkpoint tensor ``name``, or None when another stage holds it."""
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            return f"model.layers.{i - self.start}.{m.group(2)}" if self.start <= i < self.stop else None
        if name.startswith("model.embed_tokens."):
            return name if self.keep_embed else None
        if name.startswith("lm_head."):
            return name if self.last else None
        return name

    def select(self, model: nn.Module, ckpt) -> ExpertLayoutView:
        """:meth:`prune` the model and return the checkpoint seen as this stage's tensors only (nothing read)."""
        self.prune(model)
        sources = {}
        for name in ckpt.names():
            local = self.local_name(name)
            if local is not None:
                sources[local] = (name, None)
        return ExpertLayoutView(ckpt, sources)

    def finish(self, model: nn.Module) -> None:
        """Swap in the communicating modules once the weights are loaded."""
        self.receive(model)
        self.connect(model)

    def receive(self, model: nn.Module) -> None:
        """A later stage's embedding: the hidden state from the stage before, in the stage's dtype."""
        w = model.model.norm.weight
        if not self.first:
            recv = ReceiveHidden(self.cfg.hidden_size, self.prev)
            recv.dtype, recv.device = w.dtype, w.device
            model.model.embed_tokens = recv

    def connect(self, model: nn.Module) -> None:
        """The stage's last layer sends its output on; the last stage's head broadcasts the logits."""
        if not self.last:
            layers = model.model.layers
            layers[len(layers) - 1] = SendAfter(layers[len(layers) - 1], self.next)
        else:
            model.lm_head = BroadcastLogits(model.lm_head, self.logits_src, self.fence)
        if self.first and self.d.stages > 1 and self.cfg.final_logit_softcapping is None:
            model.logits_fence = self.fence  # stage 0 (rank 0 serves) pipelines a decode step's micro-batches
