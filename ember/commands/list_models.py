"""``ember list``: the models already on this machine, by the names every verb accepts, and whether each fits.

Models come from :func:`ember.model_store.list_models` (Ember's model folder, the Hugging Face cache,
Ollama's store); their facts from their own config.json or GGUF header; "fits" from the planner's
load-time check (:func:`ember.planner.preflight`) on this machine at the default context.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ember.config import ModelConfig
from ember.errors import EmberError, InsufficientMemoryError
from ember.model_store import LocalModel, list_models, stores
from ember.planner import preflight

COLUMNS = ("name", "family", "params", "format", "size", "fits")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``list``; returns its parser."""
    p = sub.add_parser("list", help="the models on this machine (HF cache, Ollama, ~/.ember/models) and what fits",
                       description="List every local model Ember can name: folders in $EMBER_MODELS (default "
                                   "~/.ember/models), the Hugging Face cache ($HF_HUB_CACHE / $HF_HOME) and Ollama's "
                                   "store ($OLLAMA_MODELS): name, family, parameters, format, size on disk, and "
                                   "whether it fits this machine (the planner's check at the default context).")
    p.add_argument("--device", default=None, help="device to check the fit on: cpu, cuda, cuda:N (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--json", action="store_true", help="one JSON array (sizes in bytes, parameters as numbers)")
    p.set_defaults(func=cmd_list)
    return p


def cmd_list(args: argparse.Namespace) -> int:
    """Print the table (or JSON) on stdout; where it looked goes to stderr when nothing is found."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [describe(m, device) for m in list_models()]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_table(rows))
    if not rows:
        where = ", ".join(f"{k}: {v}" for k, v in stores().items())
        print(f"ember list: no local models found ({where})", file=sys.stderr)
    return 0


def describe(m: LocalModel, device: str) -> dict[str, Any]:
    """One model's facts: name, source, path, family, parameters, format, size_bytes, fits, note."""
    row: dict[str, Any] = {"name": m.name, "source": m.source, "path": str(m.path), "family": None,
                           "parameters": None, "format": None, "size_bytes": m.size_bytes(), "fits": None,
                           "note": None}
    try:
        family, fmt, cfg = _gguf_facts(m.path) if m.path.is_file() else _folder_facts(m.path)
        row.update(family=family, format=fmt)
        if cfg is not None:
            row["parameters"] = cfg.num_parameters()
            row["fits"] = fits(m.path, device)
        else:
            row["fits"] = "unsupported"
    except (EmberError, OSError, ValueError) as e:
        row["note"] = str(e).splitlines()[0]
        row["fits"] = "unreadable"
    return row


def fits(path: Path, device: str) -> str:
    """``yes``, ``with --quant int8``/``int4`` (the smallest change that fits), ``no``, or ``?`` (cannot plan)."""
    try:
        return "yes" if preflight(path, device, "auto") is not None else "?"
    except InsufficientMemoryError:
        pass
    for quant in ("int8", "int4"):
        try:
            preflight(path, device, "auto", quant=quant)
            return f"with --quant {quant}"
        except InsufficientMemoryError:
            continue
    return "no"


def _folder_facts(folder: Path) -> tuple[str | None, str, ModelConfig | None]:
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / 'config.json'}: expected a JSON object")
    ember_quant = raw.get("quantization") if isinstance(raw.get("quantization"), dict) else None
    other_quant = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else None
    if ember_quant:
        fmt = f"ember {ember_quant.get('method', '?')}"
    elif other_quant:
        fmt = f"safetensors {other_quant.get('quant_method', '?')}"
    else:
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "?"
        fmt = "safetensors " + {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, str(dtype))
    try:
        cfg = ModelConfig.from_dict(raw, source=str(folder / "config.json"))
    except EmberError:
        cfg = None  # a family Ember does not run: still listed, by its model_type
    return raw.get("model_type"), fmt, cfg


def _gguf_facts(path: Path) -> tuple[str | None, str, ModelConfig | None]:
    from ember.loading.gguf import GGUFFile, config_from_gguf  # the gguf package loads only for GGUF files

    gf = GGUFFile.open(path)
    by_type: dict[str, int] = {}
    for t in gf.tensors.values():
        if len(t.shape) >= 2:  # matrices say what the file is; norms are F32 in every file
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    fmt = "gguf " + (max(by_type, key=by_type.get) if by_type else "?")
    try:
        cfg = config_from_gguf(gf)
    except EmberError:
        cfg = None
    return gf.get("general.architecture"), fmt, cfg


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned text columns."""
    cells = [[r["name"], r["family"] or "?", _count(r["parameters"]), r["format"] or "?", _bytes(r["size_bytes"]),
              r["fits"] or "?"] for r in rows]
    head = [c.upper() for c in COLUMNS]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *cells])


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
