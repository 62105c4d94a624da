"""``ember quantize MODEL_DIR --to int8|int4|nf4 [--group-size N] -o OUT_DIR``, or ``--to gguf-TYPE OUT.gguf``.

A ``gguf-*`` target writes one GGUF file (:mod:`ember.commands.quantize`).

Registered by :func:`add_parser` (``ember.cli`` calls it with its subparsers).
"""

from __future__ import annotations

import argparse
import sys


class _QuantizeParser(argparse.ArgumentParser):
    """Takes OUT after the options too (``quantize MODEL --to gguf-q8_0 OUT.gguf``): argparse gives an
    optional positional its empty match at MODEL already, and would reject a later OUT as unrecognized."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's signature
        ns, extras = super().parse_known_args(args, namespace)
        if extras and getattr(ns, "out", None) is None and not extras[0].startswith("-"):
            ns.out, extras = extras[0], extras[1:]
        return ns, extras


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` verb to an ``argparse`` subparsers object; returns its parser."""
    from ember.commands.quantize import GGUF_TARGETS
    from ember.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
    from ember.quant.quantize import DEFAULT_LM_HEAD, LM_HEAD_CHOICES

    p = subparsers.add_parser(
        "quantize", help="write a weight-only quantized copy of a checkpoint folder (int8, int4, nf4, mxfp4)",
        description="Quantize every Linear layer of MODEL_DIR (except MoE routers; an untied LM head goes to int8 "
                    "unless --lm-head says otherwise) layer by layer and write OUT_DIR: safetensors of the quantized "
                    "tensors plus a 'quantization' section in config.json, tokenizer files copied along. "
                    "`ember generate OUT_DIR ...` loads it directly.")
    p.__class__ = _QuantizeParser  # a subclass with no state of its own: see its docstring
    p.add_argument("model", metavar="MODEL_DIR", help="HF checkpoint folder (config.json, *.safetensors)")
    p.add_argument("out", nargs="?", default=None, metavar="OUT", help="where to write (the same as -o)")
    p.add_argument("--to", required=True, choices=["int8", "int4", "nf4", "mxfp4", "mxfp4+int8", *GGUF_TARGETS], dest="to",
                   help="int8: per-channel scales; int4: groups with scale+zero; nf4: bitsandbytes NF4 (block 64); "
                        "mxfp4: OCP MXFP4 (E2M1 + E8M0 per 32; gpt-oss: the experts only, as published; mxfp4+int8: gpt-oss MXFP4 experts, int8 elsewhere); "
                        "gguf-TYPE: one GGUF file for llama.cpp/Ollama (gguf-q4_k_m is llama.cpp's Q4_K_M mix)")
    p.add_argument("--group-size", type=int, default=None, choices=list(GROUP_SIZES),
                   help=f"int4 group size along the input dimension (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("-o", "--output", default=None, metavar="OUT_DIR",
                   help="folder to write (must not exist or be empty); for gguf-* the .gguf file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (only once the new one is complete)")
    p.add_argument("--no-double-quant", action="store_true", help="nf4: keep the block absmax in fp32")
    p.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=LM_HEAD_CHOICES,
                   help="format of an untied LM head: int8 (default, as llama.cpp keeps its output matrix at 6-8 bits), "
                        "same (as --to), or none (keep the checkpoint's float; bitsandbytes' choice)")
    p.add_argument("--quantize-lm-head", action="store_true", help="the same as --lm-head same")
    p.add_argument("--device", default="cpu", help="where to run the quantization math (cpu, cuda, cuda:N)")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args) -> int:
    """Handler of ``ember quantize``: one summary line on stderr."""
    from ember.commands.quantize import cmd_quantize_gguf
    from ember.errors import QuantizationError
    from ember.loading.quantized import quantize_checkpoint

    out = args.output or args.out
    if out is None or (args.output and args.out):
        raise QuantizationError("give the output once: `ember quantize MODEL --to TYPE OUT` or `-o OUT`")
    if args.to.startswith("gguf-"):
        return cmd_quantize_gguf(args, out)
    args.output = out

    dest, info = quantize_checkpoint(args.model, args.output, args.to, args.group_size,
                                     double_quant=not args.no_double_quant, quantize_lm_head=args.quantize_lm_head,
                                     device=args.device, overwrite=args.overwrite, lm_head=args.lm_head)
    if info["stale_removed"]:
        from ember.checkpoint_io import stale_note

        print(f"[ember] {stale_note(info['stale_removed'], 'quantize')}", file=sys.stderr)
    sec = info["section"]
    detail = f" group {sec['group_size']}" if sec.get("group_size") else ""
    if sec.get("lm_head", "none") not in ("none", args.to):
        detail += f", LM head {sec['lm_head']}"
    kept = info["kept"]
    kept_text = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "") if kept else "none"
    print(f"[ember] wrote {dest} ({args.to}{detail}): {info['quantized']} layers quantized, "
          f"kept {kept_text}; weights {info['bytes_before'] / 2**30:.2f} GiB -> "
          f"{info['bytes_after'] / 2**30:.2f} GiB", file=sys.stderr)
    return 0
