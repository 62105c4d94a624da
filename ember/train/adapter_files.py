"""LoRA adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, exactly as PEFT writes them, so
``PeftModel.from_pretrained(hf_model, dir)`` loads an Ember adapter and :func:`apply_adapter` loads a PEFT
one. The modules themselves (:class:`~ember.train.lora.LoRALinear`, injection, merging) are
:mod:`ember.train.lora`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ember.checkpoint_io import atomic_write_json, save_safetensors
from ember.errors import AdapterError
from ember.train.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAConfig, LoRALinear, inject_lora,
                              is_linear_like, lora_modules)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors: ``base_model.model.<module>.lora_A.weight`` -> (r, in), ``lora_B`` -> (out, r)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return out


def short_target_names(names: Iterable[str]) -> list[str]:
    """The distinct last components (``q_proj``, ...) of module names."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def save_adapter(model: nn.Module, folder: str | os.PathLike, cfg: LoRAConfig,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``folder``.

    Each file is written atomically (temp + fsync + rename). Weights are saved in their own
    dtype (fp32 masters after training).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("the model has no LoRA adapters to save")
    state = {k: v.contiguous() for k, v in adapter_state(model).items()}
    targets = short_target_names(mods)
    # Suffixes are enough unless they would also select modules we did not adapt.
    all_linear = [n for n, m in model.named_modules() if n and (is_linear_like(m) or isinstance(m, LoRALinear))]
    if sorted(n for n in all_linear if n.rsplit(".", 1)[-1] in targets) != sorted(mods):
        targets = sorted(mods)
    ranks = {m.r for m in mods.values()}
    saved = LoRAConfig(**{**cfg.__dict__})
    if len(ranks) > 1 and not saved.rank_pattern:
        saved.rank_pattern = {re.escape(n): m.r for n, m in mods.items() if m.r != cfg.r}
    save_safetensors(folder / ADAPTER_WEIGHTS, state)
    atomic_write_json(folder / ADAPTER_CONFIG, saved.to_peft_dict(base_model_name_or_path, targets))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any]]:
    """Parse ``folder/adapter_config.json`` -> (LoRAConfig, the raw JSON object)."""
    from ember.loading.paths import file_inside

    if not Path(folder).is_dir():
        raise AdapterError(f"{folder}: not an adapter folder (expected a directory with {ADAPTER_CONFIG} "
                           f"and {ADAPTER_WEIGHTS})")
    path = file_inside(folder, ADAPTER_CONFIG, str(folder), AdapterError)  # a symlink out of the folder is refused
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, nested too deeply, an integer past the digit limit
        raise AdapterError(f"{path}: invalid JSON ({str(e).splitlines()[0] or 'nested too deeply'})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft_dict(raw, str(path)), raw


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` (never a pickle; ``adapter_model.bin`` is refused)."""
    from ember.loading.paths import file_inside
    from ember.loading.safetensors import SafetensorsFile

    path = Path(folder) / ADAPTER_WEIGHTS
    if path.is_file():
        file_inside(folder, ADAPTER_WEIGHTS, str(folder), AdapterError)
    else:
        hint = " (adapter_model.bin is a pickle and is not loaded; re-save the adapter with safetensors)" \
            if (Path(folder) / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path}: not found{hint}")
    f = SafetensorsFile(path)
    return {name: f.get(name) for name in f.tensors}


def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = ADAPTER_WEIGHTS) -> None:
    """Copy PEFT-named tensors into the model's LoRALinear modules; every key and shape is checked."""
    mods = lora_modules(model)
    expected: dict[str, tuple[LoRALinear, str]] = {}
    for name, m in mods.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (m, "lora_A")
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m, "lora_B")
    # PEFT sometimes keeps the adapter name in keys (".lora_A.default.weight"); accept it.
    norm = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in state.items()}
    unexpected = sorted(set(norm) - set(expected))
    if unexpected:
        raise AdapterError(f"{source}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) matches no "
                           "adapted module of this model; is the adapter for a different architecture?"
                           if len(unexpected) > 1 else
                           f"{source}: tensor {unexpected[0]!r} matches no adapted module of this model; "
                           "is the adapter for a different architecture?")
    missing = sorted(set(expected) - set(norm))
    if missing:
        raise AdapterError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    with torch.no_grad():
        for key, (m, attr) in expected.items():
            p: nn.Parameter = getattr(m, attr)
            t = norm[key]
            if tuple(t.shape) != tuple(p.shape):
                raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, the model needs "
                                   f"{tuple(p.shape)} (rank or base model mismatch)")
            p.copy_(t.to(p.dtype))


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                  trainable: bool = False) -> list[str]:
    """Load a PEFT LoRA adapter (written by Ember or by HF PEFT) onto a loaded model, unmerged.

    Args:
        model: a loaded :class:`~ember.models.Transformer` (plain or quantized projections).
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        dtype: dtype of the adapter weights; default the model's dtype (no per-call casts at inference).
        trainable: leave A and B trainable (for continued training); otherwise the model stays frozen.
    Returns:
        The adapted module names.
    Raises:
        AdapterError: malformed or unsupported adapter, or one that does not fit the model.
    """
    cfg, _ = read_adapter_config(adapter_dir)
    state = read_adapter_weights(adapter_dir)
    if dtype is None:
        dtype = _model_dtype(model)
    names = inject_lora(model, cfg, dtype=dtype)
    load_adapter_weights(model, state, str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    if not trainable:
        for m in lora_modules(model).values():
            m.lora_A.requires_grad_(False)
            m.lora_B.requires_grad_(False)
    return names


def _model_dtype(model: nn.Module) -> torch.dtype:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        return norm.weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
