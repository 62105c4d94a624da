"""Checkpoint-name maps of families whose weights are not stored under Ember's (HF's causal-LM) names.

A multimodal checkpoint keeps its language model under a prefix and adds a vision tower; Ember reads the
language model only. ``TEXT_PREFIXES[model_type]`` lists (prefix, replacement) pairs tried in order on every
name, ``SKIPPED[model_type]`` the prefixes of tensors that are not read (the vision tower and its projector).
"""

from __future__ import annotations

from ember.config import ModelConfig
from ember.loading.moe import ExpertLayoutView
from ember.loading.safetensors import Checkpoint

# Gemma 3: transformers 5 saves model.language_model.*, the Hub's files (transformers 4) language_model.model.*
TEXT_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "gemma3": [("model.language_model.", "model."), ("language_model.model.", "model."),
               ("language_model.lm_head.", "lm_head.")],
    # Nemotron-H: the published files (and transformers 5's save) keep the model under backbone.*
    "nemotron_h": [("backbone.embeddings.", "model.embed_tokens."), ("backbone.norm_f.", "model.norm."),
                   ("backbone.", "model."), ("model.embeddings.", "model.embed_tokens."),
                   ("model.norm_f.", "model.norm.")],
}
SKIPPED: dict[str, tuple[str, ...]] = {
    "gemma3": ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."),
}


def renamed_text_model(ckpt: Checkpoint, cfg: ModelConfig) -> Checkpoint | ExpertLayoutView:
    """``ckpt`` seen under the names of its language model (a renaming view, nothing copied); unchanged for
    families stored under Ember's names."""
    prefixes = TEXT_PREFIXES.get(cfg.model_type)
    if not prefixes:
        return ckpt
    skipped = SKIPPED.get(cfg.model_type, ())
    sources: dict[str, tuple[str, None]] = {}
    for name in ckpt.names():
        if name.startswith(skipped):
            continue
        new = next((repl + name[len(p):] for p, repl in prefixes if name.startswith(p)), name)
        sources[new] = (name, None)
    return ExpertLayoutView(ckpt, sources)
