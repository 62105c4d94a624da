"""Tensor parallel inference: every layer split across the ranks by heads and by MLP / expert channels.

Megatron-style, with the model definitions untouched (docs/design.md, principle 3):

* column-parallel (output channels split, no communication): ``q_proj``, ``k_proj``, ``v_proj`` (rank ``r``
  keeps query heads ``[r nh/n, (r+1) nh/n)`` and the key/value heads they read), ``gate_proj``, ``up_proj``
  of the MLP and of every expert;
* row-parallel (input channels split): ``o_proj`` and every ``down_proj``; their partial outputs are summed by
  one all-reduce after the attention and one after the MLP (or the whole MoE block: routing is replicated,
  so the weighted sum over experts is linear in the partials). A row-parallel bias is added by rank 0 only.

Each rank builds its layers with a *local* config (heads, KV heads, intermediate sizes divided by ``n``), so
the KV cache, the attention and the MLP have their local shapes with no code of their own, and reads only its
slice of each tensor with positioned reads into memory of its own (never mapped, so no page of another rank's
share becomes resident; the embedding table alone stays a view of the map, whose rows become resident as tokens
use them). An untied embedding and
LM head are split by vocabulary (:class:`VocabEmbedding`: each token's row from its rank, summed;
:class:`GatherLogits`: the logits all-gathered); norms, routers and a tied embedding are replicated.

A folder written by ``ember quantize`` (int8, int4) is split the same way, each stored tensor in its own units:
int8 codes and int4 packed codes, scales and zeros by rows (column-parallel) or by their columns (row-parallel,
which must fall on whole int4 groups); int8's per-row scales of a row-parallel layer are kept whole. NF4 is
refused (its blocks run across rows in one flat sequence). A GGUF file's block rows are split by whole rows or
whole blocks of each row (:class:`GGUFCut`; a cut inside a block is refused).

Quantization with ``--quant`` happens after sharding. ``int8`` keeps one scale per output row: column-parallel rows are whole,
and a row-parallel layer's scales come from the all-reduced max over the full row, so every rank holds exactly
the codes one process would. int4 groups and NF4 blocks lie inside a row slice when the slice is a multiple of
the group (checked), so they match one process too, except NF4's second-level (double) quantization of its
block maxima.

Under TP the CPU runtime's fused decode blocks do not apply (the attention and MLP are wrapped in
:class:`AllReduceOutput`); each layer runs as its modules, whose projections still use the per-piece kernels.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn

from ember.config import ModelConfig
from ember.distributed import group
from ember.distributed.group import Dist
from ember.errors import DistributedError
from ember.loading.safetensors import TensorInfo
from ember.models.attention import Attention
from ember.models.linear import Linear
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output channels split (dim 0)
ROW = ("o_proj", "down_proj")                                      # input channels split (dim 1)


class VocabEmbedding(nn.Module):
    """The embedding split by vocabulary: rank ``r`` holds rows ``[start, start + V/n)``; each token's row comes
    from the one rank that holds it (the others add zeros in the all-reduce, so the sum is exact)."""

    def __init__(self, local: nn.Embedding, start: int) -> None:
        super().__init__()
        self.local, self.start = local, start

    @property
    def weight(self) -> torch.Tensor:
        return self.local.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        idx = input_ids - self.start
        outside = (idx < 0) | (idx >= self.local.num_embeddings)
        x = self.local(idx.clamp(0, self.local.num_embeddings - 1))
        x = x.masked_fill(outside[..., None], 0).contiguous()
        return group.all_reduce(x, "embedding rows", stage=True)


class GatherLogits(nn.Module):
    """The LM head split by vocabulary: each rank's (B, T, V/n) logits, gathered into (B, T, V) on every rank."""

    def __init__(self, head: nn.Module, world: int) -> None:
        super().__init__()
        self.head, self.world = head, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.head(x).contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world)]
        group.guarded("all-gather logits", None,
                      lambda: torch.distributed.all_gather(parts, part, group=group.stage_group()))
        return torch.cat(parts, dim=-1)


class AllReduceOutput(nn.Module):
    """Runs a row-parallel block (attention or MLP) and sums its partial output over the ranks."""

    def __init__(self, inner: nn.Module, what: str) -> None:
        super().__init__()
        self.inner, self.what = inner, what

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.inner(*args, **kwargs).contiguous()
        return group.all_reduce(y, self.what, stage=True)


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """``cfg`` as one of ``n`` tensor-parallel ranks sees it (heads and intermediate sizes divided by ``n``).

    Raises:
        DistributedError: a size ``n`` does not divide, naming the config field.
    """
    sizes = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "intermediate_size": cfg.intermediate_size}
    if cfg.num_local_experts:
        sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
    for field, v in sizes.items():
        if v and v % n:
            raise DistributedError(f"--tp {n}: config.json's {field} = {v} is not a multiple of {n}; "
                                   f"use a --tp that divides it, or --pp")
    return dataclasses.replace(cfg, head_dim=cfg.head_dim, **{k: v // n for k, v in sizes.items() if v})


class ShardView:
    """A checkpoint seen as this rank's slices (``names/info/get/items/dtype``, like :class:`Checkpoint`)."""

    def __init__(self, base, slices: dict[str, tuple[int, int, int] | None], zero: set[str]) -> None:
        self.base, self.folder, self.slices, self.zero = base, base.folder, slices, zero

    def names(self) -> list[str]:
        return list(self.slices)

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        cut = self.slices[name]
        if cut is None:
            return info
        dim, a, b = cut
        shape = list(info.shape)
        shape[dim] = b - a
        if dim == 0:  # whole rows: still one contiguous byte range
            row = math.prod(info.shape[1:]) * info.dtype.itemsize
            return dataclasses.replace(info, shape=tuple(shape), begin=info.begin + a * row,
                                       end=info.begin + b * row)
        return dataclasses.replace(info, shape=tuple(shape))

    def get(self, name: str) -> torch.Tensor:
        cut = self.slices[name]
        if name in self.zero:
            return torch.zeros(self.info(name).shape, dtype=self.base.info(name).dtype)
        if cut is None:
            return self.base.get(name)
        dim, a, b = cut
        if dim == 0 and name.startswith("model.embed_tokens."):
            return self.base.get(name)[a:b]  # a view over the map: only the rows of tokens seen become resident
        # read into memory of its own: a view's first and last pages would map whole page-cache folios of the
        # neighbouring rows (the other ranks' share; measured ~1 MiB per tensor)
        return _read_part(self.base.info(name), dim, a, b)

    def items(self):
        for name in self.slices:
            yield name, self.get(name)

    def read_part(self, name: str) -> torch.Tensor:
        """A stored (quantized) tensor's slice: what :meth:`get` gives (column slices by positioned reads)."""
        return self.get(name)

    def dtype(self) -> torch.dtype:
        return self.base.dtype()


@dataclasses.dataclass(frozen=True)
class GGUFCut:
    """This rank's part of one GGUF tensor: along ``dim`` (0: output rows, 1: input columns) ``[a, b)``, or a
    row-parallel bias that only rank 0 adds (``zero``). A stacked expert tensor is cut the same in each expert."""

    name: str
    dim: int
    a: int
    b: int
    zero: bool = False

    def shape(self, shape: tuple[int, ...], stacked: bool) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim + stacked] = self.b - self.a
        return tuple(out)

    def blocks(self, raw: torch.Tensor, qtype) -> torch.Tensor:
        """(E, rows, row_bytes) ggml block rows -> this rank's: whole rows, or whole blocks of each row.

        Raises:
            DistributedError: the columns do not start and end on the type's block boundary.
        """
        if self.dim == 0:
            return raw[:, self.a:self.b]
        import gguf

        elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        if self.a % elems or self.b % elems:
            raise DistributedError(f"--tp: GGUF tensor {self.name!r} is {qtype.name}, whose blocks hold {elems} "
                                   f"input columns; this rank's columns {self.a}-{self.b - 1} split a block. Use a "
                                   f"--tp that keeps each rank's share a multiple of {elems}, a type with smaller "
                                   "blocks (q8_0, q4_0), or --pp")
        return raw[:, :, self.a // elems * nbytes:self.b // elems * nbytes].contiguous()

    def tensor(self, w: torch.Tensor, stacked: bool) -> torch.Tensor:
        """A decoded (float) tensor -> this rank's part (its own memory: the full tensor can be freed)."""
        if self.zero:
            return torch.zeros_like(w)
        return w.narrow(self.dim + stacked, self.a, self.b - self.a).clone()


def _read_part(info: TensorInfo, dim: int, a: int, b: int) -> torch.Tensor:
    """Rows (``dim`` 0) or columns (``dim`` 1, 2-D) ``[a, b)`` of a tensor in a file, read with positioned reads
    straight into the result (nothing mapped)."""
    shape = list(info.shape)
    shape[dim] = b - a
    out = torch.empty(shape, dtype=info.dtype)
    flat = out.view(-1).view(torch.uint8).numpy()
    item = info.dtype.itemsize
    fd = os.open(info.file, os.O_RDONLY)
    try:
        if dim == 0:
            row = math.prod(info.shape[1:]) * item
            _pread_into(fd, memoryview(flat), info.begin + a * row)
        else:
            rows, cols = info.shape
            width = (b - a) * item
            for r in range(rows):
                _pread_into(fd, memoryview(flat[r * width:(r + 1) * width]), info.begin + (r * cols + a) * item)
    finally:
        os.close(fd)
    return out


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise DistributedError(f"unexpected end of file reading a tensor at byte {offset}")
        buf, offset = buf[n:], offset + n


class TensorShard:
    """This rank's tensor-parallel part: what :func:`ember.loading.load_model` builds and reads.

    ``d.tp`` ranks share each layer (all of them, or one pipeline stage's under ``--pp --tp``: then
    ``split_vocab=False`` keeps the stage's embedding or head whole, since the pipeline swaps them).
    """

    def __init__(self, d: Dist, cfg: ModelConfig, split_vocab: bool = True) -> None:
        self.d, self.cfg, self.n, self.rank = d, cfg, d.tp, d.tp_rank
        self.local = local_config(cfg, d.tp)
        # an untied embedding and head split by vocabulary rows (a tied pair, or a family's own embedding, is
        # replicated)
        self.split_vocab = split_vocab and not cfg.tie_word_embeddings and cfg.vocab_size % d.tp == 0

    def describe(self) -> str:
        return f"tensor shard {self.rank + 1}/{self.n}"

    def prune(self, model: nn.Module) -> None:
        """Rebuild each layer's attention and MLP (meta device) with the local config."""
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if type(attn) is not Attention or type(mlp) not in (MLP, SparseMoE):
                raise DistributedError(f"--tp: layer {i} is {type(attn).__name__} + {type(mlp).__name__}; tensor "
                                       "parallel splits Attention with MLP or SparseMoE layers; use --pp for this model")
            with torch.device("meta"):
                layer.self_attn = Attention(self.local, attn.layer, attn.sliding_window)
                layer.mlp = type(mlp)(self.local)
        self.split_vocab = self.split_vocab and type(model.model.embed_tokens) is nn.Embedding
        if self.split_vocab:
            with torch.device("meta"):
                model.model.embed_tokens = nn.Embedding(self.local_vocab, self.cfg.hidden_size)
                model.lm_head = Linear(self.cfg.hidden_size, self.local_vocab, bias=False)

    def _cut(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, int, int] | None, bool]:
        """(slice of checkpoint tensor ``name`` for this rank or None for all of it, whether it is a zeroed bias)."""
        r, n = self.rank, self.n
        if self.split_vocab and name.startswith(("model.embed_tokens.", "lm_head.")):
            size = shape[0] // n  # the table's rows (and an int8 head's per-row scales)
            return (0, r * size, (r + 1) * size), False
        if not name.startswith("model.layers."):
            return None, False
        owner, _, kind = name.rpartition(".")
        proj = owner.rpartition(".")[2]
        if proj in COLUMN:  # every stored tensor of the layer has one row per output channel
            size = shape[0] // n
            return (0, r * size, (r + 1) * size), False
        if proj in ROW:
            if len(shape) == 1:  # a bias (rank 0 adds it) or int8's per-row scales (whole rows: kept whole)
                return None, kind == "bias" and r != 0
            if shape[1] % n:
                raise DistributedError(f"--tp {n}: {name} has {shape[1]} stored columns (input channels, or "
                                       f"quantization groups of them), which do not split into {n} equal parts; "
                                       "use a --tp that divides them, or --pp")
            size = shape[1] // n  # codes, int4 scales and zeros: each in its own column units
            return (1, r * size, (r + 1) * size), False
        return None, False

    def local_name(self, name: str) -> str:
        """Every rank keeps every tensor name (a part of each)."""
        return name

    def gguf_cut(self, name: str, shape: tuple[int, ...]) -> GGUFCut | None:
        """This rank's part of GGUF tensor ``name`` (Ember's name; ``shape`` of one expert when stacked), or
        None for all of it."""
        cut, zero = self._cut(name, shape)
        if zero:
            return GGUFCut(name, 0, 0, shape[0], zero=True)
        return GGUFCut(name, *cut) if cut is not None else None

    def select(self, model: nn.Module, ckpt) -> ShardView:
        """:meth:`prune` the model; the checkpoint seen as this rank's slices (nothing read yet)."""
        self.prune(model)
        slices, zero = {}, set()
        for name in ckpt.names():
            cut, zeroed = self._cut(name, tuple(ckpt.info(name).shape))
            slices[name] = cut
            if zeroed:
                zero.add(name)
        return ShardView(ckpt, slices, zero)

    def finish(self, model: nn.Module) -> None:
        """The local config on the model (its KV cache is per-rank), and the all-reduces after row-parallel blocks."""
        model.config = self.local
        if self.split_vocab:
            model.model.embed_tokens = VocabEmbedding(model.model.embed_tokens, self.rank * self.local_vocab)
        for layer in model.model.layers:
            layer.self_attn = AllReduceOutput(layer.self_attn, f"attention output (layer {layer.self_attn.layer})")
            layer.mlp = AllReduceOutput(layer.mlp, f"MLP output (layer {layer.self_attn.inner.layer})")

    @property
    def local_vocab(self) -> int:
        return self.cfg.vocab_size // self.n

    def ready(self, model: nn.Module) -> None:
        """After quantizing: the vocabulary-split head's logits gathered on every rank."""
        if self.split_vocab:
            model.lm_head = GatherLogits(model.lm_head, self.n)

    def quantize(self, model: nn.Module, quant: str, group_size: int | None, lm_head: str | None) -> None:
        """Quantize this rank's float shard so that its codes equal those one process holds (module docstring)."""
        from ember.quant import quantize_model
        from ember.quant.quantize import ROUTER

        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if quant == "int8":
            for name, m in linears:
                if name.rpartition(".")[2] in ROW:
                    model.set_submodule(name, _int8_global_rows(m, name))
        # routers stay float as in one process (their names there have no ".inner.")
        routers = [name for name, _ in linears if ROUTER.search(name.replace(".inner.", "."))]
        quantize_model(model, quant, group_size, lm_head=lm_head, skip=routers)  # skips the Int8Linears above


def _int8_global_rows(lin: nn.Linear, name: str):
    """An :class:`~ember.quant.int8.Int8Linear` of a row-parallel shard with each row's scale taken over the full
    row (the max of the ranks' maxima), as :func:`~ember.quant.int8.quantize_int8` computes it in one process."""
    from ember.quant.int8 import Int8Linear

    w = lin.weight.detach().float()
    amax = group.all_reduce(w.abs().amax(dim=1).contiguous(), f"int8 row maxima of {name}",
                            op=torch.distributed.ReduceOp.MAX, stage=True)
    s = (amax / 127).to(lin.weight.dtype)
    sf = s.float()[:, None]
    q = torch.where(sf > 0, w / sf.clamp_min(torch.finfo(torch.float32).tiny), 0.0).round_().clamp_(-127, 127)
    bias = lin.bias.detach() if lin.bias is not None else None
    return Int8Linear(q.to(torch.int8), s, bias)
