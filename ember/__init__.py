"""Ember: run, serve, fine-tune and plan large language models on one machine, locally.

Quick use::

    import ember
    llm = ember.load("path/to/hf-model", device="cpu", dtype="auto")
    print(llm.generate("The capital of France is", max_new_tokens=16, temperature=0).text)
    for chunk in llm.stream([{"role": "user", "content": "Hi!"}], max_new_tokens=32):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import os

import torch

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
         quant: str | None = None, group_size: int | None = None, adapter: str | os.PathLike | None = None,
         context: int | None = None, batch: int = 1, max_memory: float | None = None, check_memory: bool = True,
         lm_head: str | None = "auto", speculate: str | None = None, draft=None,
         num_speculative: int | None = None, offload: str = "auto", shard=None):
    """Load an HF checkpoint folder (or a GGUF file) for generation.

    Before allocating anything the planner checks that the model, a KV cache of ``batch`` x ``context``
    tokens and the activations fit the memory free on ``device`` (and ``max_memory``); if not,
    :class:`ember.errors.InsufficientMemoryError` says what would fit.

    Args:
        path: folder with config.json, *.safetensors and tokenizer.json, or a llama.cpp ``.gguf`` file; or a
            local model's name: ``org/name[@revision]`` (Hugging Face cache), ``ollama:NAME[:TAG]`` (Ollama's
            store) or a folder name in ``~/.ember/models`` (see :mod:`ember.model_store`; nothing is downloaded).
        device: "cpu", "cuda", "cuda:1"; default CUDA when available, else CPU.
        dtype: "auto" (checkpoint dtype; bf16 only where the device runs it natively), "bf16", "fp16", "fp32".
        quant: None/"none", "int8", "int4" or "nf4": weight-only quantization applied while loading
            (a checkpoint written by ``ember quantize`` is already quantized and needs none).
        group_size: int4 group size (32, 64, 128; default 128).
        lm_head: with ``quant``, the format of an untied LM head: "auto" (default:
            ``ember.quant.DEFAULT_LM_HEAD``, int8), "int8", "same" (as ``quant``),
            "int4", "nf4", or None/"none" to keep it in ``dtype``.
        adapter: a PEFT LoRA adapter folder (from ``ember tune`` or HF PEFT), applied without merging.
        context: tokens per sequence to plan memory for (default min(model limit, 4096)).
        batch: sequences at once to plan for.
        max_memory: GiB the model may use at most (``--max-memory``).
        check_memory: run the planner's fit check first (default True).
        speculate: "ngram", "draft" or "mtp": speculative decoding (docs/speculative.md; see ``Engine.speculate``).
        draft: the draft model for ``speculate="draft"`` (implied): a path or name, or a loaded Engine.
        num_speculative: the most proposed tokens per pass (default 4).
        offload: "auto" (default): a safetensors model that does not fit is loaded with offload (experts or
            layers read from disk, :mod:`ember.offload`) when the planner says it runs that way, with a one-line
            notice on stderr; "experts" / "layers": offload in that mode (within ``max_memory``, else what is
            free); "off": never. The loaded model's ``model.offload`` then has the statistics.
        shard: this rank's part of a multi-process run (made by :func:`ember.distributed.load`; see
            :func:`ember.loading.load_model`).
    Returns:
        :class:`ember.engine.Engine` with ``generate``/``stream`` and ``tokenizer``.
    """
    from ember.engine import Engine
    from ember.loading import load_model
    from ember.loading.gguf import is_gguf_file, load_gguf
    from ember.config import ModelConfig
    from ember.quant.quantize import DEFAULT_LM_HEAD
    from ember.model_store import resolve
    from ember.tokenizer import Tokenizer

    path = resolve(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if lm_head == "auto":
        lm_head = DEFAULT_LM_HEAD
    if shard is not None and (speculate is not None or draft is not None or offload not in ("auto", "off")):
        from ember.errors import DistributedError

        raise DistributedError("speculative decoding and offload run in one process; drop --speculate/--draft/"
                               "--offload, or run without --pp/--tp")
    if offload not in ("auto", "off"):
        from ember.offload.session import check_request

        check_request(path, offload, quant)
    plan = None
    if check_memory:
        from ember.planner import preflight

        plan = preflight(path, device, dtype, quant=quant, context=context, batch=batch, max_memory=max_memory,
                         lm_head=lm_head, offload=offload != "off")
    if offload not in ("auto", "off") or (plan is not None and not plan.fits and offload == "auto"):
        from ember.offload.session import load_with_offload

        model = load_with_offload(path, plan, offload, device=device, dtype=dtype, quant=quant, max_memory=max_memory)
        tokenizer = Tokenizer.from_dir(path)
        tokenizer.check_fits(model.config.vocab_size, str(path))
    elif is_gguf_file(path):  # one llama.cpp file holds weights, config and tokenizer
        model, tokenizer = load_gguf(path, device=device, dtype=dtype, shard=shard)
        if quant is not None and quant != "none":  # after the fact: GGUF tensors are decoded first
            from ember.quant import quantize_model

            quantize_model(model, quant, group_size, lm_head=lm_head)
    else:
        tokenizer = Tokenizer.from_dir(path)
        tokenizer.check_fits(ModelConfig.from_file(path).vocab_size, str(path))
        model = load_model(path, device=device, dtype=dtype, quant=quant, group_size=group_size, lm_head=lm_head,
                           shard=shard)
    if adapter is not None:
        from ember.train.adapter_files import apply_adapter

        apply_adapter(model, adapter)
    engine = Engine(model, tokenizer, path)
    if speculate is not None or draft is not None:
        if isinstance(draft, (str, os.PathLike)):
            draft = load(draft, device=device, dtype=dtype, check_memory=False)
        engine.speculate(speculate, draft, num_speculative)
    return engine
