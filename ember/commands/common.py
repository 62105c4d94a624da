"""What the verbs share: the MODEL argument and its options, sampling options, and the one way a verb loads a model."""

from __future__ import annotations

import argparse
import os
import re

import ember
from ember import distributed
from ember.model_store import resolve
from ember.quant.quantize import DEFAULT_LM_HEAD, LM_HEAD_CHOICES
from ember.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

MODEL_HELP = ("a model folder (config.json, *.safetensors, tokenizer.json), a .gguf file, or a local model's name: "
              "org/name[@revision] (Hugging Face cache), ollama:NAME[:TAG] (Ollama's store), or a folder name in "
              "~/.ember/models; `ember list` shows them (nothing is downloaded)")

# The parsed-argument fields that name a model (``merge`` calls its model BASE).
MODEL_FIELDS = ("model", "base")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --device, --dtype, --quant, --adapter and memory limits: shared by every verb that loads a model."""
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype; auto = checkpoint dtype, bf16 only where the device runs it natively")
    p.add_argument("--quant", default=None, choices=["none", "int8", "int4", "nf4", "mxfp4", "mxfp4+int8"],
                   help="weight-only quantization on load, layer by layer (a folder from `ember quantize` needs none; "
                        "mxfp4+int8: gpt-oss MXFP4 experts, int8 elsewhere)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128], help="int4 group size (default 128)")
    p.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=LM_HEAD_CHOICES,
                   help="with --quant: format of an untied LM head (default int8, as llama.cpp keeps its output "
                        "matrix at 6-8 bits; none keeps it in --dtype, as bitsandbytes does)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter folder (from `ember tune` or HF PEFT), applied without merging")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory the model may use: 12GiB, 800MB, or a number of GiB (default: what is free); a "
                        "model that needs more runs with offload (see --offload)")
    p.add_argument("--offload", default="auto", choices=["auto", "experts", "layers", "off"],
                   help="weights read from disk when the model does not fit: auto (the planner's choice, with a "
                        "notice), experts (MoE: experts cached, the rest resident), layers (stream layers), off "
                        "(refuse instead)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence to plan memory for (default: prompt + new tokens, or min(model limit, 4096))")
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--pp N / --tp N: split the model over N processes on this host (docs/distributed.md)."""
    p.add_argument("--pp", type=int, default=None, metavar="N",
                   help="pipeline parallel: layers split over N processes (started here, or by torchrun)")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallel: heads and MLP channels split over N processes (with --pp P: each of "
                        "the P stages over N, P x N processes)")


_UNITS = {"": 2**30, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
          "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def memory_size(text: str) -> float:
    """A memory size for ``--max-memory`` in GiB: ``12GiB``, ``800MB``, ``1.5G``, or a bare number of GiB.

    Raises:
        argparse.ArgumentTypeError: not a positive size with a known unit.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (examples: 12GiB, 800MB, 0.5 = GiB)")
    return float(m.group(1)) * _UNITS[unit] / 2**30


def offload_summary(llm) -> str | None:
    """The offload statistics line of a loaded engine (hit rate, GB read per token), or None when nothing is
    offloaded."""
    off = getattr(llm.model, "offload", None)
    return off.summary() if off is not None else None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """-n, temperature, top-k/p, min-p, penalties, seed and stops (generate, chat)."""
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-new-tokens", type=int, default=None,
                   help=f"most tokens to generate (default: what the model's context leaves after the prompt, "
                        f"at most {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: 0 for generate, 0.7 for chat)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="extra stop token id (repeatable); EOS ids from the checkpoint always stop")


def sampling_params(args: argparse.Namespace, default_temperature: float) -> SamplingParams:
    """The :class:`~ember.sampling.SamplingParams` of :func:`add_sampling_args`' options."""
    temperature = default_temperature if args.temperature is None else args.temperature
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        stop_token_ids=list(args.stop_token_id),
    )
    params.validate()
    return params


def resolve_model_args(args: argparse.Namespace) -> None:
    """Replace a model *name* in ``args`` by the path it names (:func:`ember.model_store.resolve`), once.

    The text the user typed stays in ``args.model_spec`` (the server's default model id).

    Raises:
        ModelNotFoundError: a name that is not on this machine (the message lists close matches).
    """
    for field in MODEL_FIELDS:
        spec = getattr(args, field, None)
        if spec is None or getattr(args, f"{field}_spec", None) is not None:
            continue
        setattr(args, f"{field}_spec", str(spec))
        setattr(args, field, str(resolve(spec)))


def display_name(args: argparse.Namespace) -> str:
    """How to call the model in messages and the API: the name typed, or a path's last component."""
    spec = getattr(args, "model_spec", None) or str(args.model)
    p = os.path.normpath(spec)
    return spec if not os.path.exists(os.path.expanduser(spec)) else os.path.basename(p) or p


def load_from_args(args: argparse.Namespace, context: int | None = None, batch: int = 1) -> ember.engine.Engine:
    """``ember.load`` with the options of :func:`add_model_args`; the planner checks the fit first.

    Every verb that runs a model loads it here, so names, memory checks and options mean the same everywhere.
    """
    resolve_model_args(args)
    if distributed.current() is not None:
        return distributed.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                group_size=args.group_size, adapter=args.adapter, context=args.context or context,
                                batch=batch, max_memory=args.max_memory, lm_head=args.lm_head)
    return ember.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant, group_size=args.group_size,
                      adapter=args.adapter, context=args.context or context, batch=batch, max_memory=args.max_memory,
                      lm_head=args.lm_head, offload=getattr(args, "offload", "auto"))
