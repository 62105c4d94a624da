"""The planner's checks for the code that is about to allocate: the fit check every load runs
(:func:`preflight`), the fit message that says what would fit, and the size of a server's KV pool."""

from __future__ import annotations

import math
from pathlib import Path

from ember.config import ModelConfig
from ember.errors import EmberError, InsufficientMemoryError
from ember.hardware import GiB, Hardware, detect
from ember.planner.fit import Plan, options, plan, recommend
from ember.planner.memory import prefill_activation_bytes, weight_bytes
from ember.planner.source import resolve_model
from ember.planner.workload import DTYPE_BYTES, MIXED, QUANTS, Workload, dtype_name


def check_fits(cfg: ModelConfig, device, dtype, quant: str | None = None, context: int | None = None,
               batch: int = 1, max_memory: float | None = None, task: str = "infer", method: str = "lora",
               checkpoint_dtype: str | None = None, hardware: Hardware | None = None, lm_head: str | None = "auto",
               offload: bool = False, stored_quant: bool = False) -> Plan:
    """Stop before allocating if the model will not fit; say what would.

    Call it in the process that is about to load (its runtime memory is already in use, so only the
    model's own memory is compared with what is free now).

    Args:
        cfg: the model.
        device: ``cpu``, ``cuda``, ``cuda:N`` or a torch.device.
        dtype: compute dtype (``bf16``, ``torch.bfloat16``, ...).
        quant: ``none``/None, ``int8``, ``int4``, ``nf4``.
        context: tokens per sequence (default: the model's max_position_embeddings).
        batch: sequences at once.
        max_memory: cap in GiB (``--max-memory``).
        task / method: ``tune`` with ``lora``/``qlora``/``full`` for fine-tuning.
        hardware: override detection (tests).
        lm_head: the LM head's format under ``quant`` (:attr:`Workload.lm_head`; None = ``none``).
        offload: accept a plan that runs only with offload (:attr:`Plan.runnable`; its ``offload`` says how).
        stored_quant: the checkpoint is stored in ``quant`` (an ``ember quantize`` folder).
    Returns:
        the :class:`Plan` when it fits (or, with ``offload``, runs with offload).
    Raises:
        InsufficientMemoryError: "needs 41.2 GiB, 23.1 GiB available; int4 needs 11.0 GiB".
    """
    dev = str(device)
    hw = hardware or detect(dev if dev != "cuda" else "cuda:0")
    wl = Workload(task=task, context=context or cfg.max_position_embeddings, batch=batch, dtype=dtype_name(dtype),
                  quant=quant or "none", method=method, lm_head=lm_head or "none")
    cap = None if max_memory is None else max_memory * GiB
    p = plan(cfg, hw, wl, max_memory=cap, checkpoint_dtype=checkpoint_dtype, in_process=True,
             stored_quant=stored_quant)
    if p.fits or (offload and p.runnable):
        return p
    raise InsufficientMemoryError(_does_not_fit_message(cfg, hw, wl, p, cap, checkpoint_dtype))


def _does_not_fit_message(cfg: ModelConfig, hw: Hardware, wl: Workload, p: Plan, cap: float | None,
                          checkpoint_dtype: str | None) -> str:
    usable = p.available / hw.nodes
    what = "--max-memory" if cap is not None and cap < hw.usable_bytes else "available"
    msg = (f"{wl.label()} needs {p.memory.total / GiB:.1f} GiB (weights {p.memory.weights / GiB:.1f}, "
           f"KV cache {p.memory.kv_cache / GiB:.1f} for {wl.batch} x {wl.context} tokens, "
           f"activations {p.memory.activations / GiB:.1f}"
           + (f", training {p.memory.training / GiB:.1f}" if p.memory.training else "")
           + f"), {usable / GiB:.1f} GiB {what}")
    alts = [a for a in options(cfg, hw, wl, max_memory=cap, checkpoint_dtype=checkpoint_dtype, in_process=True)
            if a.workload != wl]
    fitting = [a for a in alts if a.fits]
    if fitting:
        best = recommend(fitting) or fitting[0]
        msg += f"; {best.label} needs {best.memory.total / GiB:.1f} GiB"
    elif p.max_context > 0:
        msg += f"; at most {p.max_context:,} tokens of context fit at batch {wl.batch} (--context)"
    else:
        smallest = min(alts + [p], key=lambda a: a.memory.weights)
        msg += (f"; nothing fits: even {smallest.label} weights take {smallest.memory.weights / GiB:.1f} GiB"
                if smallest.memory.weights > usable else
                f"; {smallest.label} fits with at most {smallest.max_context:,} tokens of context")
    if p.offload is not None and not p.offload.fits:
        o = p.offload
        msg += (f"; with offload ({o.mode}) {o.resident / GiB:.1f} GiB of weights stay resident and "
                f"{o.reserve / GiB:.1f} GiB go to the KV cache and activations, more than the budget allows")
    elif p.offload is not None and p.offload.fits:
        o = p.offload
        how = (f"run `ember quantize --to {wl.quant}` once and load its folder" if o.needs_quantize
               else "allow it with --offload auto")
        msg += f"; it runs with offload ({o.mode} read from disk, ~{o.decode_tok_s:.2g} tok/s): {how}"
    else:
        float_plan = next((a for a in alts if a.workload.quant == "none"), None)
        if float_plan is not None and float_plan.runnable:
            msg += (f"; {float_plan.label} runs with offload ({float_plan.offload.mode} read from disk, "
                    f"~{float_plan.offload.decode_tok_s:.2g} tok/s): load without --quant")
    return msg


def kv_budget_bytes(cfg: ModelConfig, device, dtype, quant: str | None = None, max_batch: int = 16,
                    prefill_chunk: int = 256, max_memory: float | None = None, loaded: bool = True,
                    safety: float = 0.9, hardware: Hardware | None = None) -> int:
    """Bytes a server may give its paged KV pool on ``device``.

    ``safety x (free memory now) - prefill activations for one chunk - decode logits``, minus the
    weights when they are not loaded yet (``loaded=False``).

    Args:
        max_memory: cap in GiB on everything the process may use on the device.
    """
    dev = str(device)
    hw = hardware or detect(dev if dev != "cuda" else "cuda:0")
    d = dtype_name(dtype)
    free = hw.usable_bytes
    if max_memory is not None:
        free = min(free, max_memory * GiB)
    act = prefill_activation_bytes(cfg, prefill_chunk, d) + max_batch * cfg.vocab_size * (DTYPE_BYTES[d] + 4)
    weights = 0.0 if loaded else weight_bytes(cfg, d, quant or "none").total
    return max(0, int(safety * free - act - weights))


# ====================================================================== the server's KV pool

# The shortest sequence (prompt + completion, tokens) a KV pool must hold to be worth allocating; capped
# at the context. Below that, startup fails with what to change instead of serving 429s forever.
MIN_SEQ_TOKENS = 256


def kv_block_bytes(cfg: ModelConfig, dtype, block_size: int) -> int:
    """Bytes of one block of the main paged-KV pool: every attention layer's keys and values (or latent) for
    ``block_size`` tokens, less the sliding layers (ring_layers), whose blocks live in the window pool
    (:func:`window_pool_bytes`) and are never held at full context."""
    import torch  # noqa: PLC0415  (ember.cache needs it; `ember plan` alone does not import torch early)

    from ember.cache import bytes_per_token, layer_specs, ring_layers

    rings = ring_layers(cfg)
    # per token at 1 byte an element, times the dtype's bytes; recurrent layers keep no blocks (their state
    # is a per-sequence slot, priced by kv_cache_bytes)
    per_token = sum(bytes_per_token(s, torch.uint8) for i, s in enumerate(layer_specs(cfg)) if i not in rings)
    return per_token * block_size * DTYPE_BYTES[dtype_name(dtype)]


def window_pool_bytes(cfg: ModelConfig, dtype, block_size: int, max_batch: int, prefill_chunk: int = 256,
                      num_blocks: int | None = None) -> int:
    """Bytes of the paged cache's window pool (the ring layers' blocks, :class:`ember.cache.PagedKVCache`):
    ``min(num_blocks, 1 + max_batch x window_blocks_per_seq)`` blocks of the ring layers only; 0 without any."""
    import torch  # noqa: PLC0415

    from ember.cache import bytes_per_token, layer_specs, ring_layers, window_blocks_per_seq

    rings = ring_layers(cfg)
    if not rings:
        return 0
    specs = layer_specs(cfg)
    blocks = 1 + max_batch * window_blocks_per_seq(max(specs[i].window for i in rings), prefill_chunk, block_size)
    if num_blocks is not None:
        blocks = min(blocks, num_blocks)
    per_token = sum(bytes_per_token(specs[i], torch.uint8) for i in rings)
    return blocks * per_token * block_size * DTYPE_BYTES[dtype_name(dtype)]


def kv_pool_blocks(cfg: ModelConfig, dtype, budget_bytes: int, max_batch: int, block_size: int,
                   context: int | None = None, min_tokens: int = MIN_SEQ_TOKENS, prefill_chunk: int = 256) -> int:
    """Blocks to allocate for the main paged-KV pool from a byte budget (scratch block included).

    ``min((budget - window pool) // block_bytes - 1, max_batch x ceil(context / block_size)) + 1``: as many
    blocks as the budget holds once the window pool (:func:`window_pool_bytes`, a fixed size for ``max_batch``
    sequences) is set aside, but no more than ``max_batch`` full-context sequences can use.

    Args:
        cfg: the model.
        dtype: the cache's dtype (``torch.bfloat16`` or ``bf16``; the pool uses the model's compute dtype).
        budget_bytes: bytes the pools may take (:func:`kv_budget_bytes`).
        max_batch: sequences decoded together.
        block_size: tokens per block.
        context: tokens per sequence (default the model's ``max_position_embeddings``).
        min_tokens: the pool must hold one sequence of ``min(context, min_tokens)`` tokens.
        prefill_chunk: tokens per prefill pass (sizes the window pool).
    Returns:
        ``num_blocks`` for :class:`ember.cache.PagedKVCache` (>= 2).
    Raises:
        InsufficientMemoryError: the budget does not hold even one minimal sequence.
    """
    ctx = context or cfg.max_position_embeddings
    per_block = kv_block_bytes(cfg, dtype, block_size)
    window = window_pool_bytes(cfg, dtype, block_size, max_batch, prefill_chunk)
    want = max_batch * math.ceil(ctx / block_size)
    if per_block:
        fit = (budget_bytes - window) // per_block - 1  # the scratch block is allocated too
    else:  # every attention layer slides (Mistral-style): the main pool is block accounting, no bytes
        fit = want if budget_bytes >= window else -1
    need_tokens = min(ctx, min_tokens)
    need = math.ceil(need_tokens / block_size)
    if fit < need:
        raise InsufficientMemoryError(
            f"the KV cache needs at least {((need + 1) * per_block + window) / 2**20:.1f} MiB ({need} blocks x "
            f"{block_size} tokens + 1 scratch block, for one {need_tokens}-token sequence"
            f"{f', and {window / 2**20:.1f} MiB of sliding-window blocks' if window else ''}) but the plan leaves "
            f"{max(0, budget_bytes) / 2**20:.1f} MiB after the weights and activations; free memory, raise "
            f"--max-memory, lower --max-batch or --prefill-chunk, use --quant, or set --kv-blocks")
    return min(fit, want) + 1


def default_kv_pool_blocks(cfg: ModelConfig, device, dtype, max_batch: int, block_size: int,
                           prefill_chunk: int = 256, memory_bytes: int | None = None) -> int:
    """Blocks for a paged KV pool on ``device`` when the caller names none (:class:`ember.scheduler.BatchScheduler`).

    The budget is ``memory_bytes`` when given, else :func:`kv_budget_bytes` with the model loaded; the
    blocks are :func:`kv_pool_blocks` of it.
    """
    if memory_bytes is None:
        memory_bytes = kv_budget_bytes(cfg, device, dtype, max_batch=max_batch, prefill_chunk=prefill_chunk)
    return kv_pool_blocks(cfg, dtype, memory_bytes, max_batch, block_size, prefill_chunk=prefill_chunk)


# ====================================================================== the load check

DEFAULT_CONTEXT = 4096  # what a load plans for when the caller does not say (capped at the model's own limit)


def preflight(path, device, dtype="auto", quant: str | None = None, context: int | None = None, batch: int = 1,
              max_memory: float | None = None, task: str = "infer", method: str = "lora",
              lm_head: str | None = "auto", offload: bool = False) -> Plan | None:
    """The check ``ember.load`` (and so generate/chat/serve/tune) runs before allocating anything.

    Reads only the model's config (HF folder or GGUF header), resolves ``dtype`` as the loader will,
    and calls :func:`check_fits`. A folder written by ``ember quantize`` is planned at its stored
    quantization.

    Args:
        path: HF checkpoint folder or ``.gguf`` file.
        context: tokens per sequence to plan for (default min(model limit, :data:`DEFAULT_CONTEXT`)).
        offload: accept a plan that runs with offload (see :func:`check_fits`).
    Returns:
        the plan, or None when ``path`` cannot be planned (missing, malformed): the loader then
        reports that problem with its own file- and field-located message.
    Raises:
        InsufficientMemoryError: with what would fit.
    """
    import torch

    from ember.loading import DTYPE_NAMES, resolve_dtype
    from ember.loading.dtypes import blocks_dtype
    from ember.loading.mxfp4 import is_mxfp4_checkpoint

    p = Path(path)
    if not ((p.is_dir() and (p / "config.json").is_file()) or p.is_file()):
        return None
    try:
        resolved = resolve_model(str(p))
    except (EmberError, OSError, ValueError):
        return None
    cfg = resolved.config
    section = cfg.extra.get("quantization") if isinstance(cfg.extra, dict) else None
    stored = isinstance(section, dict) and section.get("method") in ("int8", "int4", "nf4")
    if stored:
        quant = section["method"]
        from ember.quant.quantize import section_lm_head

        head = section_lm_head(section)
        lm_head = head if head in QUANTS else "none"
    ckpt = DTYPE_NAMES.get(resolved.checkpoint_dtype or "", torch.bfloat16)
    dev = torch.device(device)
    dt = resolve_dtype(dtype, ckpt, dev)
    if isinstance(cfg.extra, dict) and is_mxfp4_checkpoint(cfg.extra):  # as ember.loading.load_model resolves it
        dt = blocks_dtype(dtype, dt, dev)
        # the experts as stored; the Linears beside them int8 (--quant, or a stored section) or float (int4/nf4
        # beside them are priced float: an upper bound)
        quant = MIXED if quant in ("int8", MIXED) else "mxfp4"
    if context is None:
        context = min(cfg.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    return check_fits(cfg, dev, dt, quant=quant, context=context, batch=batch, max_memory=max_memory, task=task,
                      method=method, checkpoint_dtype=resolved.checkpoint_dtype, lm_head=lm_head,
                      offload=offload and not p.is_file(),  # offload reads safetensors folders
                      stored_quant=stored)