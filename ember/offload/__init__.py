"""Running models bigger than memory: routed experts read from the checkpoint on demand (expert offload), and
decoder layers streamed from disk with read-ahead (layer streaming). See docs/offload.md.

    aio.py      the I/O threads: several preads in flight, demand reads before speculative ones, cancellation
    reader.py   tensors read at their file offsets with pread / O_DIRECT into reused aligned buffers
    cache.py    the expert cache: LFU/LRU within a byte budget, demand and speculative reads, statistics
    experts.py  OffloadedExperts in place of an MoE layer's experts; the prefetch hook (router of layer l+1)
    layers.py   StreamedLayer stand-ins and the read-ahead LayerStreamer
    load.py     load_offloaded: what stays resident, what is read; ``model.offload`` (Offload) and its stats
"""

from ember.offload.cache import POLICIES, CacheStats, ExpertCache
from ember.offload.load import MODES, Offload, load_offloaded, module_bytes
from ember.offload.reader import ALIGN, DiskReader

__all__ = ["ALIGN", "MODES", "POLICIES", "CacheStats", "DiskReader", "ExpertCache", "Offload", "load_offloaded",
           "module_bytes"]
