"""Loading a model that is bigger than its memory budget: expert offload (MoE) or layer streaming (dense).

:func:`load_offloaded` builds the model as :func:`ember.loading.load_model` does, but leaves on disk what does
not fit in ``memory_bytes``:

* **experts** (a model with routed experts): attention, norms, routers, shared experts, embeddings and the LM
  head are loaded; every routed expert stays in the checkpoint and is read into an
  :class:`~ember.offload.cache.ExpertCache` of ``memory_bytes - resident weights - reserve_bytes`` when routed
  to (:mod:`ember.offload.experts`);
* **layers** (any other model): the embeddings, head and as many leading decoder layers as fit stay resident;
  the rest are streamed with read-ahead (:mod:`ember.offload.layers`), which needs room for ``ahead + 1`` of
  them at once.

The loaded model carries an :class:`Offload` as ``model.offload``: its statistics (hit rate, bytes read per
token) are what ``ember generate`` prints and what the API returns.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ConfigError, InsufficientMemoryError
from ember.loading import load_model, open_checkpoint
from ember.offload.cache import CacheStats, ExpertCache
from ember.offload.experts import ExpertStore, is_expert_tensor, offload_experts
from ember.offload.layers import DEFAULT_AHEAD, LayerStreamer, stream_layers
from ember.offload.reader import DiskReader, read_module
from ember.quant.quantize import SECTION, QuantSpec

MODES = ("auto", "experts", "layers")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
GiB = 1 << 30


class Offload:
    """What was left on disk and how reading it goes: ``model.offload`` of an offloaded model.

    Attributes:
        mode: ``experts`` or ``layers``.
        budget_bytes: the memory budget the load was given.
        resident_bytes: weights held in memory outside the cache.
        cache_bytes: the expert cache's capacity (experts) or the streamed layers' room (layers).
        reserve_bytes: of the budget, what was kept for the KV cache and activations.
        direct: every read bypasses the page cache (``O_DIRECT``).
    """

    def __init__(self, mode: str, reader: DiskReader, budget_bytes: int, resident_bytes: int, cache_bytes: int,
                 cache: ExpertCache | None = None, streamer: LayerStreamer | None = None,
                 offloaded: list[int] | None = None, reserve_bytes: int = 0) -> None:
        self.mode, self.reader, self.reserve_bytes = mode, reader, reserve_bytes
        self.budget_bytes, self.resident_bytes, self.cache_bytes = budget_bytes, resident_bytes, cache_bytes
        self.cache, self.streamer = cache, streamer
        self.offloaded = offloaded or []

    @property
    def direct(self) -> bool:
        return self.reader.all_direct

    def stats(self) -> dict:
        """Counters since load (or :meth:`reset_stats`): uses, hits, misses, hit_rate, bytes_read,
        gb_read_per_token, demand_reads, prefetch_reads / _cancelled / _hits / _precision, wait_seconds,
        wait_ms_per_token, evictions, tokens; the I/O threads' ``io`` counters (chunks, bytes, busy_seconds,
        mean_in_flight, max_in_flight); and the budget's split."""
        s = (self.cache or self.streamer).stats.to_json()
        if self.reader.pool is not None:
            s["io"] = self.reader.pool.counters.to_json()
        s.update(mode=self.mode, direct=self.direct, budget_bytes=self.budget_bytes,
                 resident_bytes=self.resident_bytes, cache_bytes=self.cache_bytes,
                 offloaded_layers=len(self.offloaded))
        if self.cache is not None:
            s["cached_experts"] = len(self.cache.resident())
        return s

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents and use counts stay)."""
        if self.cache is not None:
            self.cache.reset_stats()
        else:
            self.streamer.stats = CacheStats()
        if self.reader.pool is not None:
            self.reader.pool.reset_counters()

    def summary(self) -> str:
        """One line: what is offloaded, hit rate, GB read per token."""
        s = self.stats()
        what = (f"{s['offloaded_layers']} MoE layers' experts, cache {self.cache_bytes / GiB:.2f} GiB"
                if self.mode == "experts" else f"{s['offloaded_layers']} layers streamed")
        guess = f", prefetch precision {100 * s['prefetch_precision']:.0f}%" if s["prefetch_reads"] and self.cache else ""
        return (f"offload: {what}, hit rate {100 * s['hit_rate']:.1f}%{guess}, {s['gb_read_per_token']:.3f} GB "
                f"read/token, waited {s['wait_ms_per_token']:.1f} ms/token, {s['bytes_read'] / 1e9:.2f} GB read"
                f"{'' if self.direct else ' (page cache, no O_DIRECT)'}")

    def close(self) -> None:
        """Stop the background readers (the I/O threads end) and close the files."""
        if self.cache is not None:
            self.cache.drain()
        if self.streamer is not None:
            self.streamer.close()
        self.reader.close()


def module_bytes(model: nn.Module) -> int:
    """Bytes of the loaded (non-meta) parameters and buffers of ``model``, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def detach_from_files(model: nn.Module) -> None:
    """Give every loaded CPU tensor of ``model`` its own memory instead of a view over the mapped checkpoint.

    The loader maps the files and views them zero-copy; an offloaded model keeps those files open for reading,
    and a file truncated under a mapping turns the next access into SIGBUS. Copies make such a change an error
    of the reader (which names the file) instead, and make the resident bytes real memory, as the budget counts
    them. Tied tensors stay tied.
    """
    copies: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu":
                    continue
                c = copies.get(id(t))
                if c is None:
                    c = copies[id(t)] = nn.Parameter(t.detach().clone(), requires_grad=False) \
                        if isinstance(t, nn.Parameter) else t.clone()
                table[name] = c


def load_offloaded(path, memory_bytes: int, device: str | torch.device = "cpu", dtype="auto",
                   reserve_bytes: int = 0, mode: str = "auto", policy: str = "lfu", prefetch: bool = True,
                   direct: bool = True, ahead: int = DEFAULT_AHEAD, prefetch_min_weight: float | None = None) -> nn.Module:
    """Load the model at ``path`` within ``memory_bytes`` of weights + cache, the rest read from disk as needed.

    Args:
        path: an HF checkpoint folder (safetensors).
        memory_bytes: the budget (``--max-memory``) for everything the model holds.
        device / dtype: as :func:`ember.loading.load_model`.
        reserve_bytes: of the budget, what the KV cache and activations will need (not for weights).
        mode: ``auto`` (experts for MoE models, else layers), ``experts`` or ``layers``.
        policy: expert cache eviction, ``lfu`` or ``lru``.
        prefetch: read predicted experts / the next layers on background threads.
        direct: read with ``O_DIRECT`` where the file system allows it.
        ahead: layers read ahead (layer streaming).
        prefetch_min_weight: the next MoE layer's experts are read ahead when their routing weight, predicted
            by that layer's router on this layer's input, is at least this (default
            :data:`~ember.offload.experts.PREFETCH_MIN_WEIGHT`; 0: its whole top-k).
    Returns:
        the model, with ``model.offload`` (:class:`Offload`).
    Raises:
        InsufficientMemoryError: even the resident part (or one layer's experts) does not fit the budget.
        ConfigError: a family whose experts cannot be offloaded, or an unknown ``mode``.
    """
    if mode not in MODES:
        raise ConfigError(f"offload mode {mode!r}: expected one of {', '.join(MODES)}")
    folder = Path(path)
    cfg = ModelConfig.from_file(folder)
    if mode == "auto":
        mode = "experts" if cfg.num_local_experts else "layers"
    if mode == "experts":
        return _load_experts(folder, cfg, memory_bytes, device, dtype, reserve_bytes, policy, prefetch, direct,
                             prefetch_min_weight)
    return _load_layers(folder, cfg, memory_bytes, device, dtype, reserve_bytes, prefetch, direct, ahead)


def _load_experts(folder: Path, cfg: ModelConfig, budget: int, device, dtype, reserve: int, policy: str,
                  prefetch: bool, direct: bool, min_weight: float | None) -> nn.Module:
    if not cfg.num_local_experts:
        raise ConfigError(f"{folder}: expert offload needs a mixture-of-experts model; this one is dense "
                          "(use layer streaming)")
    model = load_model(folder, device=device, dtype=dtype, defer=is_expert_tensor)
    detach_from_files(model)
    ckpt, _ = open_checkpoint(folder, cfg)
    infos = {n: ckpt.info(n) for n in ckpt.names() if is_expert_tensor(n)}
    dev = torch.device(device)
    dt = model.model.norm.weight.dtype
    resident = module_bytes(model)
    reader = DiskReader({i.file for i in infos.values()}, direct=direct)
    capacity = budget - resident - reserve
    cache = ExpertCache(max(0, capacity), policy)
    section = cfg.extra.get(SECTION)
    spec = QuantSpec.from_section(section, str(folder / "config.json")) if section is not None else None
    store = ExpertStore(cfg, infos, reader, cache, dt, dev, quant=spec)
    one = store.memory_bytes(*next(iter(store._where)))
    need = cfg.num_experts_per_tok * one
    if capacity < need:
        reader.close()
        raise InsufficientMemoryError(
            f"{folder}: with every expert offloaded, {resident / GiB:.2f} GiB of weights stay resident and "
            f"{reserve / GiB:.2f} GiB go to the KV cache and activations; the expert cache needs at least "
            f"{need / GiB:.3f} GiB ({cfg.num_experts_per_tok} experts of one layer) but the budget of "
            f"{budget / GiB:.2f} GiB leaves {max(0, capacity) / GiB:.3f}; raise --max-memory")
    layers = offload_experts(model, store, prefetch=prefetch, min_weight=min_weight)
    model.offload = Offload("experts", reader, budget, resident, capacity, cache=cache, offloaded=layers,
                            reserve_bytes=reserve)
    return model


def _load_layers(folder: Path, cfg: ModelConfig, budget: int, device, dtype, reserve: int, prefetch: bool,
                 direct: bool, ahead: int) -> nn.Module:
    if SECTION in cfg.extra:
        raise ConfigError(f"{folder}: layer streaming reads float layers; this folder is quantized "
                          f"({cfg.extra[SECTION].get('method')}): load it whole, or stream the float model")
    model = load_model(folder, device=device, dtype=dtype, defer=lambda n: _LAYER.match(n) is not None)
    detach_from_files(model)
    ckpt, _ = open_checkpoint(folder, cfg)
    dev = torch.device(device)
    dt = model.model.norm.weight.dtype
    by_layer: dict[int, dict[str, object]] = {}
    for n in ckpt.names():
        m = _LAYER.match(n)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[n[m.end():]] = ckpt.info(n)
    reader = DiskReader({i.file for d in by_layer.values() for i in d.values()}, direct=direct)

    def mem(i: int) -> int:
        return sum((t.end - t.begin) // t.dtype.itemsize * (dt.itemsize if t.dtype.is_floating_point
                                                             else t.dtype.itemsize) for t in by_layer[i].values())

    base = module_bytes(model)
    n_layers = cfg.num_hidden_layers
    ahead = max(0, ahead) if prefetch else 0
    room = (min(ahead, n_layers - 1) + 1) * max(mem(i) for i in range(n_layers))
    left = budget - reserve - base - room
    keep = 0
    while keep < n_layers and mem(keep) <= left:
        left -= mem(keep)
        keep += 1
    if left < 0:
        reader.close()
        raise InsufficientMemoryError(
            f"{folder}: layer streaming needs {base / GiB:.2f} GiB resident (embeddings, head, norms) + "
            f"{room / GiB:.2f} GiB for {min(ahead, n_layers - 1) + 1} streamed layer(s) + {reserve / GiB:.2f} GiB of "
            f"KV cache and activations; the budget is {budget / GiB:.2f} GiB; raise --max-memory")
    layers = model.model.layers
    streamed = {i: by_layer[i] for i in range(keep, n_layers)}
    streamer = LayerStreamer(cfg, streamed or {n_layers - 1: by_layer[n_layers - 1]}, reader, dt, dev, ahead=ahead)
    for i in range(keep):  # the layers built on meta by load_model, filled in place
        layers[i] = read_module(reader, lambda old=layers[i]: old, by_layer[i], dt, dev)
    if streamed:
        stream_layers(model, streamer)
    else:  # everything fits after all: nothing is streamed
        streamer.close()
        layers[n_layers - 1] = read_module(reader, lambda old=layers[-1]: old, by_layer[n_layers - 1], dt, dev)
        streamer.order = []
    model.offload = Offload("layers", reader, budget, module_bytes(model), room if streamed else 0,
                            streamer=streamer, offloaded=list(streamed), reserve_bytes=reserve)
    return model
