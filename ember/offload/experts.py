"""Expert offload: a mixture-of-experts layer whose experts are read from the checkpoint when routed to.

:func:`offload_experts` swaps each MoE layer's ``experts`` (an ``nn.ModuleList`` of :class:`MLP`) for an
:class:`OffloadedExperts` of the same length whose ``[e]`` returns expert ``e`` from the shared
:class:`~ember.offload.cache.ExpertCache`, read from disk on a miss. The MoE definitions run unchanged: they
route, then call ``self.experts[e](x)`` for the chosen experts only (docs/design.md, principle 3).

Prefetch: a forward pre-hook on each offloaded MoE layer routes its input with the layer's own router (the
missing experts of this layer are demand reads, started together on the I/O threads instead of one after the
other; reads ahead for this layer that its routing did not pick are cancelled) and with the router of the next
MoE layer (whose input, one attention block later, is close to this one: the experts it weighs at least
:data:`PREFETCH_MIN_WEIGHT` are speculative reads, done while this layer and the next attention compute). The
hook also makes the CPU runtime run these layers as their modules (it never fuses a hooked piece), while
attention keeps its fused kernel.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import nn

from ember.errors import CheckpointError, ConfigError
from ember.loading.safetensors import TensorInfo
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.offload.aio import DEMAND, Request
from ember.offload.cache import ExpertCache
from ember.offload.reader import DiskReader, assemble_module
from ember.quant.int4 import Int4Linear
from ember.quant.quantize import CLASSES, QuantSpec, _expected_state

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PREFETCH_MIN_WEIGHT = 0.2  # next-layer guesses below this predicted (renormalised top-k) weight are not read


def expert_prefix(layer: int, expert: int) -> str:
    """The checkpoint-name prefix of one expert under Ember's names (:mod:`ember.loading.moe`)."""
    return f"model.layers.{layer}.mlp.experts.{expert}."


def is_expert_tensor(name: str) -> bool:
    """Whether a checkpoint name belongs to a routed expert (these are what offload leaves on disk)."""
    return ".mlp.experts." in name


class ExpertRef:
    """What iterating an :class:`OffloadedExperts` yields: which expert, without reading it."""

    __slots__ = ("layer", "expert")

    def __init__(self, layer: int, expert: int) -> None:
        self.layer, self.expert = layer, expert

    def __repr__(self) -> str:
        return f"ExpertRef(layer={self.layer}, expert={self.expert})"


class OffloadedExperts(nn.Module):
    """The experts of one MoE layer, read on demand through ``store``.

    ``experts[e]`` is expert e's :class:`MLP` (resident or read now); ``len()`` is the expert count. Iterating
    yields :class:`ExpertRef` (reading every expert to iterate would defeat offloading).
    """

    def __init__(self, store: "ExpertStore", layer: int, n_experts: int) -> None:
        super().__init__()
        self.store, self.layer, self.n_experts = store, layer, n_experts

    def __len__(self) -> int:
        return self.n_experts

    def __getitem__(self, e: int) -> nn.Module:
        if not 0 <= e < self.n_experts:
            raise IndexError(f"expert {e} of {self.n_experts}")
        return self.store.get(self.layer, e)

    def __iter__(self) -> Iterator[ExpertRef]:
        return (ExpertRef(self.layer, e) for e in range(self.n_experts))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.n_experts}, offloaded"


class ExpertStore:
    """Where each expert's tensors are stored, the reader, the cache and how to build one expert.

    Args:
        cfg: the model config (expert width, bias).
        infos: checkpoint name -> :class:`TensorInfo` of every expert tensor (under Ember's names).
        reader: the :class:`DiskReader` over the checkpoint files.
        cache: the shared :class:`ExpertCache`.
        dtype / device: the compute dtype and device of the loaded experts.
    """

    def __init__(self, cfg, infos: dict[str, TensorInfo], reader: DiskReader, cache: ExpertCache,
                 dtype: torch.dtype, device: torch.device, quant: QuantSpec | None = None) -> None:
        self.cfg, self.reader, self.cache, self.dtype, self.device = cfg, reader, cache, dtype, device
        self.quant = quant
        self._where: dict[tuple[int, int], dict[str, TensorInfo]] = {}
        for name, info in infos.items():
            head, _, local = name.partition(".mlp.experts.")
            layer = int(head.rsplit(".", 1)[1])
            e, _, param = local.partition(".")
            self._where.setdefault((layer, int(e)), {})[param] = info
        self._check()

    def _expected(self) -> dict[str, tuple[int, ...]]:
        """State-dict name -> shape of one expert as stored (float, or the quantized parts of each projection)."""
        with torch.device("meta"):
            mlp = MLP(self.cfg, self.cfg.moe_intermediate_size)
        ref = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
        if self.quant is None:
            return ref
        cls = CLASSES[self.quant.mode]
        for proj in PROJECTIONS:
            out_f, in_f = ref.pop(f"{proj}.weight")
            for part, (shape, _) in _expected_state(cls, self.quant, out_f, in_f).items():
                ref[f"{proj}.{part}"] = tuple(shape)
        return ref

    def _check(self) -> None:
        ref = self._expected()
        for (layer, e), got in self._where.items():
            missing = sorted(set(ref) - set(got))
            if missing:
                raise CheckpointError(f"layer {layer} expert {e}: missing {', '.join(missing)} in the checkpoint")
            for param, info in got.items():
                if param not in ref:
                    raise CheckpointError(f"{info.file}: unexpected expert tensor {info.name!r}")
                if tuple(info.shape) != ref[param]:
                    raise CheckpointError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, "
                                          f"config.json implies {list(ref[param])}")

    def stored_bytes(self, layer: int, expert: int) -> int:
        """Bytes expert ``(layer, expert)`` takes in the file (what one read of it moves, unaligned)."""
        return sum(t.end - t.begin for t in self._where[(layer, expert)].values())

    def memory_bytes(self, layer: int, expert: int) -> int:
        """Bytes expert ``(layer, expert)`` takes once loaded in the compute dtype."""
        size = self.dtype.itemsize
        return sum(t.end - t.begin if not t.dtype.is_floating_point else (t.end - t.begin) // t.dtype.itemsize * size
                   for t in self._where[(layer, expert)].values())

    def start(self, key: tuple[int, int], priority: int = DEMAND) -> Request:
        """Start reading expert ``key`` on the I/O threads; the request's result is (module, in-memory bytes,
        stored bytes read, seconds from start to the module built)."""
        t0 = time.perf_counter()
        where = self._where[key]
        names = list(where)

        def build(tensors: list[torch.Tensor]) -> tuple[nn.Module, int, int, float]:
            got = dict(zip(names, tensors))
            mlp = self._assemble(got) if self.quant is not None else \
                assemble_module(self._new_expert, got, self.dtype, self.device)
            return mlp, self.memory_bytes(*key), self.stored_bytes(*key), time.perf_counter() - t0
        return self.reader.submit([where[n] for n in names], then=build, priority=priority, owner=lambda r: r[0])

    def read(self, key: tuple[int, int]) -> tuple[nn.Module, int, int, float]:
        """Read one expert now: (module, in-memory bytes, stored bytes read, seconds)."""
        return self.start(key).result()

    def _new_expert(self) -> nn.Module:
        return MLP(self.cfg, self.cfg.moe_intermediate_size)

    def _assemble(self, got: dict[str, torch.Tensor]) -> nn.Module:
        """One expert whose projections are stored quantized (an ``ember quantize`` folder): each projection's
        module made from its stored parts, as the loader makes them."""
        with torch.device("meta"):
            mlp = self._new_expert()
        cls = CLASSES[self.quant.mode]
        for proj in PROJECTIONS:
            lin = getattr(mlp, proj)
            out_f, in_f = lin.weight.shape
            state = {part: got[f"{proj}.{part}"].to(self.device)
                     for part in _expected_state(cls, self.quant, out_f, in_f)}
            bias = got.get(f"{proj}.bias")
            bias = None if bias is None else bias.to(device=self.device, dtype=self.dtype)
            kw = dict(self.quant.params(), layout="auto") if cls is Int4Linear else self.quant.params()
            setattr(mlp, proj, cls.from_canonical(state, in_f, out_f, bias, self.dtype, **kw))
        return mlp.eval().requires_grad_(False)

    def get(self, layer: int, expert: int) -> nn.Module:
        key = (layer, expert)
        return self.cache.get(key, lambda: self.read(key))

    def request(self, layer: int, experts, speculative: bool = False) -> None:
        """Start reading ``experts`` of ``layer`` (those not resident or in flight) in the background."""
        self.cache.request([(layer, int(e)) for e in experts], self.start, speculative=speculative)

    def cancel_except(self, layer: int, keep) -> int:
        """``layer``'s routing picked ``keep``: the reads ahead of its other experts will not be used
        (:meth:`ExpertCache.cancel`)."""
        keep = set(keep)
        return self.cache.cancel([(layer, e) for e in range(self.cfg.num_local_experts) if e not in keep])


def _predict(moe: nn.Module, x2: torch.Tensor, limit: int, min_weight: float = 0.0) -> list[int]:
    """The experts ``moe``'s router picks for tokens x2 (N, H), most picked first, at most ``limit``; for one
    token, only those whose routing weight is at least ``min_weight``."""
    weights, ids = moe.route(x2)
    if x2.shape[0] == 1:
        return [e for e, w in zip(ids[0].tolist(), weights[0].tolist()) if w >= min_weight][:limit]
    counts = torch.bincount(ids.flatten(), minlength=len(moe.experts))
    order = torch.argsort(counts, descending=True, stable=True)
    return [e for e in order.tolist() if counts[e] > 0][:limit]


def offload_experts(model: nn.Module, store: ExpertStore, prefetch: bool = True,
                    min_weight: float | None = None) -> list[int]:
    """Swap the experts of every MoE layer of ``model`` for :class:`OffloadedExperts` over ``store``.

    The model's expert parameters must not be loaded (left on the meta device). With ``prefetch``, each MoE
    layer gets the pre-hook that starts its own experts' reads and the next MoE layer's predicted ones (those
    whose predicted routing weight is at least ``min_weight``).

    Returns:
        the indices of the offloaded layers.
    Raises:
        ConfigError: an MoE layer whose experts are not per-expert SwiGLU modules (gpt-oss's fused experts).
    """
    min_weight = PREFETCH_MIN_WEIGHT if min_weight is None else min_weight
    layers = model.model.layers
    moes: list[tuple[int, nn.Module]] = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None:
            continue
        if not isinstance(mlp, SparseMoE) or not isinstance(experts, nn.ModuleList):
            raise ConfigError(f"{model.config.model_type}: expert offload reads per-expert SwiGLU experts; this "
                              f"family's layer {i} keeps its experts as {type(mlp).__name__}, which it cannot offload")
        mlp.experts = OffloadedExperts(store, i, len(experts))
        moes.append((i, mlp))
    # per-layer prefetch budget: what one layer may bring in at once without pushing out the next layer's
    slots = max(1, store.cache.capacity_bytes // max(1, store.memory_bytes(*next(iter(store._where)))))
    limit = max(model.config.num_experts_per_tok, slots // 4)
    for j, (i, mlp) in enumerate(moes):
        nxt = moes[j + 1] if j + 1 < len(moes) else None
        mlp.register_forward_pre_hook(_make_hook(store, i, mlp, nxt, limit, first=j == 0, prefetch=prefetch,
                                                          min_weight=min_weight))
    return [i for i, _ in moes]


def _make_hook(store: ExpertStore, layer: int, mlp: nn.Module, nxt, limit: int, first: bool, prefetch: bool,
               min_weight: float):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])
        if first:
            store.cache.note_tokens(x2.shape[0])
        if not prefetch:
            return
        with torch.no_grad():
            need = _predict(mlp, x2, limit)
            store.cancel_except(layer, need)  # reads ahead for this layer that its routing did not pick
            store.request(layer, need)  # this layer's experts, read together while attention's output is mixed
            if nxt is not None:
                store.request(nxt[0], _predict(nxt[1], x2, store.cfg.num_experts_per_tok, min_weight), speculative=True)
    return hook
