"""What ``ember.load`` does when a model is to run with offload: the budget, the notice, the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ember.errors import ConfigError, QuantizationError
from ember.hardware import GiB, detect
from ember.offload.load import MODES, load_offloaded


def check_request(path, mode: str, quant: str | None) -> None:
    """Refuse an offload request that cannot run, before anything is planned or read.

    Raises:
        ConfigError: an unknown mode, or a path that is not a safetensors folder (a GGUF file).
        QuantizationError: ``quant`` asked for (offloaded weights are read as stored: quantize the folder first).
    """
    if mode not in MODES:
        raise ConfigError(f"--offload {mode!r}: expected auto, off, {', '.join(m for m in MODES if m != 'auto')}")
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: offload reads weights from a safetensors folder; this is not one (a GGUF file is "
                          "loaded whole: convert it, or free memory)")
    if quant not in (None, "none"):
        raise QuantizationError(f"{p}: offload reads weights as stored; --quant {quant} would quantize them on every "
                                f"read: run `ember quantize {p} --to {quant} -o DIR` once and run DIR (its experts "
                                "are then read quantized), or drop --quant")


def load_with_offload(path, plan, mode: str, device, dtype, quant: str | None, max_memory: float | None,
                      notice=None) -> torch.nn.Module:
    """Load ``path`` with offload in ``mode`` (``auto``: the planner's choice) within ``max_memory`` GiB.

    Args:
        plan: the planner's :class:`~ember.planner.Plan` for this load, or None when the fit check was skipped
            (the budget is then ``max_memory`` or the memory free now, with nothing reserved for the KV cache).
        notice: where the one-line notice goes (default: stderr); None-returning callable(str).
    Raises:
        ConfigError: a GGUF file (offload reads safetensors folders) or an unknown mode.
        QuantizationError: ``quant`` asked for (offloaded weights are read as stored: quantize the folder first).
    """
    check_request(path, mode, quant)
    p = Path(path)
    off = plan.offload if plan is not None else None
    if off is not None:
        budget, reserve = int(off.budget), int(off.reserve)
        if mode == "auto":
            mode = off.mode
    else:
        dev = str(torch.device(device))
        free = detect(dev if dev != "cuda" else "cuda:0").usable_bytes
        budget, reserve = int(min(free, max_memory * GiB) if max_memory else free), 0
    model = load_offloaded(p, budget, device=device, dtype=dtype, reserve_bytes=reserve, mode=mode)
    say = notice or (lambda s: print(s, file=sys.stderr))
    o = model.offload
    need = f"needs {plan.memory.total / GiB:.1f} GiB, " if plan is not None else ""
    guess = (f"; expect ~{off.decode_tok_s:.2g} tok/s" + (f", hit rate ~{100 * off.hit_rate:.0f}%" if o.mode == "experts"
                                                           else "")) if off is not None else ""
    what = (f"{len(o.offloaded)} MoE layers' experts read from disk into a {o.cache_bytes / GiB:.2f} GiB cache"
            if o.mode == "experts" else f"{len(o.offloaded)} of {model.config.num_hidden_layers} layers streamed "
                                        "from disk")
    say(f"[ember] {p.name} {need}budget {budget / GiB:.1f} GiB: running with offload ({what}{guess})")
    return model
