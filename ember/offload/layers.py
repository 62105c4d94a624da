"""Layer streaming: decoder layers past the memory budget are read from the checkpoint as the forward reaches them.

:func:`stream_layers` replaces the chosen layers in ``model.model.layers`` by :class:`StreamedLayer` stand-ins.
Calling one takes its layer from the :class:`LayerStreamer` (already read ahead, or read now), runs it, and lets
it go; before running it, the streamer starts reading the next ``ahead`` streamed layers on the reader's I/O
threads (after the last streamed layer come the first ones again: the next token's), each layer in chunks with
several reads in flight. So while layer l computes, layers l+1 .. l+ahead are on their way from disk, and at most
``ahead + 1`` streamed layers are in memory at once.

Each read builds a fresh layer module (the CPU runtime's kernels are bound per module, so nothing stale survives
a layer's departure); the stand-in is not a :class:`~ember.models.decoder.DecoderLayer`, so the runtime runs
these layers as their modules and keeps its fused kernels for the resident ones.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch
from torch import nn

from ember.errors import ConfigError
from ember.loading.safetensors import TensorInfo
from ember.models.decoder import attention_types, family_class, layer_class, mlp_types
from ember.offload.cache import CacheStats
from ember.offload.aio import Request
from ember.offload.reader import DiskReader, assemble_module

DEFAULT_AHEAD = 2  # layers read ahead of the one computing


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class LayerStreamer:
    """Reads whole decoder layers on demand and ahead of use; keeps at most ``ahead + 1`` of them.

    Statistics are a :class:`~ember.offload.cache.CacheStats`: a use is a layer run, a hit a layer that was
    read ahead (resident or in flight), a miss one read on demand.
    """

    def __init__(self, cfg, infos: dict[int, dict[str, TensorInfo]], reader: DiskReader, dtype: torch.dtype,
                 device: torch.device, ahead: int = DEFAULT_AHEAD) -> None:
        self.cfg, self.infos, self.reader, self.dtype, self.device = cfg, infos, reader, dtype, device
        self.order = sorted(infos)
        self.ahead = max(0, min(ahead, len(self.order) - 1))
        self.stats = CacheStats()
        kinds = list(zip(attention_types(cfg), mlp_types(cfg)))
        cls = family_class(cfg, "layer", layer_class(cfg))
        self._build = {i: (lambda i=i: cls(cfg, i, *kinds[i])) for i in self.order}
        self._ready: OrderedDict[int, Request] = OrderedDict()
        self._lock = threading.Lock()
        self._check()

    def _check(self) -> None:
        i = self.order[0]
        with torch.device("meta"):
            layer = self._build[i]()
        want = set(layer.state_dict())
        have = set(self.infos[i])
        extra = [n for n, _ in layer.named_buffers() if n not in want]
        if want != have or extra:
            raise ConfigError(f"{self.cfg.model_type}: layer streaming needs every tensor of a layer in the checkpoint "
                              f"(layer {i}: missing {sorted(want - have)[:3]}, derived buffers {extra[:3]}); load it "
                              "without streaming")

    def layer_bytes(self, i: int) -> int:
        """Stored bytes of layer ``i`` (what one read of it moves)."""
        return sum(t.end - t.begin for t in self.infos[i].values())

    def _start(self, i: int) -> Request:
        """Start reading layer ``i`` on the reader's I/O threads (its spans in chunks, several in flight)."""
        t0 = time.perf_counter()
        names = list(self.infos[i])

        def build(tensors: list[torch.Tensor]) -> nn.Module:
            m = assemble_module(self._build[i], dict(zip(names, tensors)), self.dtype, self.device)
            with self._lock:
                self.stats.bytes_read += self.layer_bytes(i)
                self.stats.read_seconds += time.perf_counter() - t0
            return m
        return self.reader.submit([self.infos[i][n] for n in names], then=build, owner=lambda m: m)

    def acquire(self, i: int, tokens: int = 1) -> nn.Module:
        """Layer ``i``, ready to run on ``tokens`` positions; starts reading the next ``ahead`` streamed layers."""
        t0 = time.perf_counter()
        pos = self.order.index(i)
        with self._lock:
            self.stats.uses += 1
            if i == self.order[0]:
                self.stats.tokens += tokens
            req = self._ready.pop(i, None)
            if req is not None:
                self.stats.hits += 1
                self.stats.prefetch_hits += 1
                if not req.future.done():
                    self.stats.wait_hits += 1
            else:
                self.stats.misses += 1
                self.stats.demand_reads += 1
            for k in range(1, self.ahead + 1):
                j = self.order[(pos + k) % len(self.order)]
                if j not in self._ready:
                    self._ready[j] = self._start(j)
                    self.stats.prefetch_reads += 1
        layer = (req or self._start(i)).result()
        with self._lock:
            self.stats.wait_seconds += time.perf_counter() - t0
        return layer

    def close(self) -> None:
        """Wait for the layers being read ahead and drop them."""
        with self._lock:
            ready, self._ready = list(self._ready.values()), OrderedDict()
        for req in ready:
            if not req.cancel():
                try:
                    req.result()
                except BaseException:  # noqa: BLE001  (nobody waits for it any more)
                    pass


class StreamedLayer(nn.Module):
    """Stands in for decoder layer ``index``: same call, its weights read by the streamer for each call."""

    def __init__(self, streamer: LayerStreamer, index: int, attention_type: str, window: int | None) -> None:
        super().__init__()
        self.streamer, self.index = streamer, index
        self.attention_type, self.window = attention_type, window

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The layer's forward on x (B, T, H) and the rest of a decoder layer's arguments."""
        layer = self.streamer.acquire(self.index, x.shape[0] * x.shape[1])
        return layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}, streamed"


def stream_layers(model: nn.Module, streamer: LayerStreamer) -> None:
    """Put :class:`StreamedLayer` stand-ins in place of ``streamer``'s layers (left unloaded on meta)."""
    layers = model.model.layers
    for i in streamer.order:
        old = layers[i]
        layers[i] = StreamedLayer(streamer, i, old.attention_type, old.window)
