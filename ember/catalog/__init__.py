"""Catalog of known architectures, for planning without weights: ``ember plan llama-3.1-70b --on dgx-spark``.

The facts live in :mod:`ember.catalog.architectures` as config.json-style dicts; this module only
looks them up (by name or alias, case- and punctuation-insensitive) and builds a
:class:`~ember.config.ModelConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.catalog.architectures import MODELS
from ember.config import ModelConfig


@dataclass(frozen=True)
class CatalogEntry:
    """One known model: its name, Hub id, config and published parameter counts.

    ``published_params`` is what Ember loads of the published total: a multimodal checkpoint's published encoder
    sizes (``published.not_loaded``) are taken off. ``published_precision``: the unit the total was published to
    (``"8B"``: 1e9), so a count may differ from it by half of that.
    """

    name: str
    hf_id: str
    config: ModelConfig
    published_params: float
    published_active_params: float | None
    source: str
    published_precision: float = 0.0


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower().rsplit("/", 1)[-1])


def _index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for name, e in MODELS.items():
        for alias in [name, e["hf_id"], *e.get("aliases", [])]:
            idx.setdefault(_norm(alias), name)
    return idx


def names() -> list[str]:
    """Catalog names in catalog order."""
    return list(MODELS)


def find(name: str) -> CatalogEntry | None:
    """The entry for ``name`` (a catalog name, alias or Hub id such as ``Qwen/Qwen3-8B``), or None."""
    key = _index().get(_norm(name))
    if key is None:
        return None
    e = MODELS[key]
    pub = e["published"]
    cfg = ModelConfig.from_dict(dict(e["config"]), source=f"catalog:{key}")
    return CatalogEntry(key, e["hf_id"], cfg, float(pub["params"]) - float(pub.get("not_loaded", 0.0)),
                        pub.get("active_params"), pub["source"], float(pub.get("precision", 0.0)))


def get(name: str) -> CatalogEntry:
    """Like :func:`find` but raises KeyError naming the known models."""
    entry = find(name)
    if entry is None:
        raise KeyError(f"{name!r} is not in the catalog; known: {', '.join(MODELS)}")
    return entry
