"""Mixture-of-experts weight layouts: every on-disk layout is read under Ember's per-expert names.

Ember names one layout for every MoE family (the Qwen3-MoE hub names)::

    model.layers.N.mlp.gate.weight                       (E, H)  router
    model.layers.N.mlp.experts.E.gate_proj.weight        (I, H)
    model.layers.N.mlp.experts.E.up_proj.weight          (I, H)
    model.layers.N.mlp.experts.E.down_proj.weight        (H, I)

Layouts read onto it (a view: tensors are renamed or sliced, never copied):

- Qwen3-MoE hub checkpoints, and what transformers 5 ``save_pretrained`` writes for them by
  default: already these names.
- Mixtral hub checkpoints, and transformers 5's default save for Mixtral:
  ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.E.w1/w3/w2`` (gate/up/down), renamed
  by :data:`RENAMES`.
- transformers 5's in-memory fused layout (``save_pretrained(save_original_format=False)``):
  ``mlp.experts.gate_up_proj`` (E, 2I, H), each expert's gate rows then its up rows, and
  ``mlp.experts.down_proj`` (E, H, I); each expert's matrix is a contiguous slice of those.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import torch

from ember.config import ModelConfig
from ember.errors import CheckpointError
from ember.loading.safetensors import Checkpoint, TensorInfo

# (pattern, replacement) applied in order to every checkpoint name of an MoE model.
RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),                       # Mixtral block name
    (re.compile(r"(\.mlp\.experts\.\d+)\.w1\."), r"\1.gate_proj."),       # Mixtral expert names
    (re.compile(r"(\.mlp\.experts\.\d+)\.w3\."), r"\1.up_proj."),
    (re.compile(r"(\.mlp\.experts\.\d+)\.w2\."), r"\1.down_proj."),
]
# transformers 5 fused expert tensors: (E, 2I, H) and (E, H, I); Gemma 4 keeps its experts beside the MLP
# (layers.N.experts.gate_up_proj), read as layers.N.experts.E.gate_proj.weight ...
FUSED = re.compile(r"^(?P<prefix>.*\.(mlp\.experts|layers\.\d+\.experts))\.(?P<kind>gate_up_proj|down_proj)$")

# Ember name -> (checkpoint name, None for the whole tensor or (expert, first row, end row)).
_Source = tuple[str, "tuple[int, int, int] | None"]


class ExpertLayoutView:
    """A :class:`Checkpoint` seen under Ember's expert names (same ``names/info/get/items/dtype``).

    Sliced tensors are zero-copy views over the memory map, and their :class:`TensorInfo` gives
    the slice's true byte range in the file, so streaming readers can use it unchanged.
    """

    def __init__(self, base: Checkpoint, sources: dict[str, _Source]) -> None:
        self.base = base
        self.folder = base.folder
        self.sources = sources

    def names(self) -> list[str]:
        return list(self.sources)

    def info(self, name: str) -> TensorInfo:
        src, part = self.sources[name]
        info = self.base.info(src)
        if part is None:
            return dataclasses.replace(info, name=name)
        e, a, b = part
        rows, cols = info.shape[1], info.shape[2]
        row_bytes = cols * info.dtype.itemsize
        begin = info.begin + (e * rows + a) * row_bytes
        return TensorInfo(name, info.file, info.dtype, (b - a, cols), begin, begin + (b - a) * row_bytes)

    def get(self, name: str) -> torch.Tensor:
        src, part = self.sources[name]
        t = self.base.get(src)
        if part is None:
            return t
        e, a, b = part
        return t[e, a:b]  # contiguous rows of one expert: a view, not a copy

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.sources:
            yield name, self.get(name)

    def dtype(self) -> torch.dtype:
        return self.base.dtype()

    def __getattr__(self, attr: str) -> Any:  # files, where, ...: the underlying checkpoint's
        return getattr(self.base, attr)


def expert_layout_view(ckpt: Checkpoint, cfg: ModelConfig) -> Checkpoint | ExpertLayoutView:
    """Present an MoE checkpoint under Ember's expert names; dense or already-matching ones unchanged.

    Raises:
        CheckpointError: a fused expert tensor that is not 3-D (E, rows, cols) with an even
            ``gate_up_proj`` row count, or two checkpoint tensors that map to one name.
    """
    if not cfg.num_local_experts or cfg.model_type == "gpt_oss":  # gpt-oss keeps HF's fused expert tensors
        return ckpt
    sources: dict[str, _Source] = {}

    def add(name: str, source: _Source) -> None:
        if name in sources:
            raise CheckpointError(f"{ckpt.folder}: tensors {sources[name][0]!r} and {source[0]!r} "
                                  f"both hold {name!r}; the checkpoint mixes expert layouts")
        sources[name] = source

    for name in ckpt.names():
        m = FUSED.match(name)
        if m is None:
            new = name
            for pattern, repl in RENAMES:
                new = pattern.sub(repl, new)
            add(new, (name, None))
            continue
        info = ckpt.info(name)
        if len(info.shape) != 3 or (m["kind"] == "gate_up_proj" and info.shape[1] % 2):
            raise CheckpointError(f"{info.file}: fused expert tensor {name!r} has shape {list(info.shape)}; "
                                  f"expected (experts, {'2*intermediate' if m['kind'] == 'gate_up_proj' else 'hidden'}, "
                                  f"{'hidden' if m['kind'] == 'gate_up_proj' else 'intermediate'})")
        n_exp, rows = info.shape[0], info.shape[1]
        for e in range(n_exp):
            if m["kind"] == "gate_up_proj":
                add(f"{m['prefix']}.{e}.gate_proj.weight", (name, (e, 0, rows // 2)))
                add(f"{m['prefix']}.{e}.up_proj.weight", (name, (e, rows // 2, rows)))
            else:
                add(f"{m['prefix']}.{e}.down_proj.weight", (name, (e, 0, rows)))
    if all(src == name and part is None for name, (src, part) in sources.items()):
        return ckpt
    return ExpertLayoutView(ckpt, sources)
