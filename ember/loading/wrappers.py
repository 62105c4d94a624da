"""Checkpoints whose language model sits inside a bigger one: multimodal wrappers and multi-token prediction.

* A multimodal wrapper (``Qwen3_5ForConditionalGeneration``; ``ModelConfig.multimodal``) stores the language
  model under ``model.language_model.`` and its vision tower under ``model.visual.``: the view presents the
  language model under the plain names (``model.layers.0...``) and leaves the vision tower out.
* Multi-token-prediction heads (``mtp.*``, Qwen3-Next / Qwen3.5; DeepSeek-V3's ``num_nextn_predict_layers``
  trailing ``model.layers.{num_hidden_layers}.*``) are not part of the decoder's forward pass: they are held
  apart, as the mapped tensors, for a speculative decoder to use (``model.extra_weights``,
  :mod:`ember.speculative.mtp`).
"""

from __future__ import annotations

import re
import sys

import torch

from ember.config import ModelConfig
from ember.loading.moe import ExpertLayoutView
from ember.loading.safetensors import Checkpoint

LANGUAGE_MODEL = "model.language_model."
# towers a multimodal wrapper holds beside its language model (Qwen3.5's vision; Gemma 4's vision and audio towers
# and their embedders)
VISION = ("model.visual.", "visual.", "model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
          "model.embed_audio.")
MTP = "mtp."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp_name(name: str, cfg: ModelConfig) -> bool:
    """Whether ``name`` belongs to a multi-token-prediction head: ``mtp.*``, or a layer past
    ``num_hidden_layers`` in a checkpoint whose config declares ``num_nextn_predict_layers``."""
    if name.startswith(MTP):
        return True
    m = _LAYER.match(name)
    return bool(m and cfg.extra.get("num_nextn_predict_layers") and int(m.group(1)) >= cfg.num_hidden_layers)


def text_model_view(ckpt: Checkpoint, cfg: ModelConfig) -> tuple[Checkpoint | ExpertLayoutView, dict[str, torch.Tensor]]:
    """The checkpoint seen as its text model, and the ``mtp.*`` tensors kept apart (mapped, not copied).

    Checkpoints with neither come back unchanged. Prints one line on stderr when a vision tower is skipped.
    """
    names = ckpt.names()
    mtp = [n for n in names if is_mtp_name(n, cfg)]
    wrapped = cfg.multimodal or any(n.startswith(LANGUAGE_MODEL) for n in names)
    if not mtp and not wrapped:
        return ckpt, {}
    sources: dict[str, tuple[str, None]] = {}
    vision = 0
    for n in names:
        if is_mtp_name(n, cfg):
            continue
        if n.startswith(VISION):
            vision += 1
            continue
        sources[n.replace(LANGUAGE_MODEL, "model.", 1) if n.startswith(LANGUAGE_MODEL) else n] = (n, None)
    if wrapped:
        towers = "vision/audio towers are" if any(n.startswith("model.audio_tower.") for n in names) \
            else "vision tower is"
        print(f"[ember] {ckpt.folder}: multimodal checkpoint: running its text model; the {towers} skipped "
              f"({vision} tensors)", file=sys.stderr)
    return ExpertLayoutView(ckpt, sources), {n: ckpt.get(n) for n in mtp}
