"""``ember quantize MODEL_DIR --to int8|int4|nf4 [--group-size N] -o OUT_DIR``.

Registered by :func:`add_parser` (``ember.cli`` calls it with its subparsers).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` verb to an ``argparse`` subparsers object; returns its parser."""
    from ember.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
    from ember.quant.quantize import DEFAULT_LM_HEAD, LM_HEAD_CHOICES

    p = subparsers.add_parser(
        "quantize", help="write a weight-only quantized copy of a checkpoint folder (int8, int4, nf4, mxfp4)",
        description="Quantize every Linear layer of MODEL_DIR (except MoE routers; an untied LM head goes to int8 "
                    "unless --lm-head says otherwise) layer by layer and write OUT_DIR: safetensors of the quantized "
                    "tensors plus a 'quantization' section in config.json, tokenizer files copied along. "
                    "`ember generate OUT_DIR ...` loads it directly.")
    p.add_argument("model", metavar="MODEL_DIR", help="HF checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--to", required=True, choices=["int8", "int4", "nf4", "mxfp4"], dest="to",
                   help="int8: per-channel scales; int4: groups with scale+zero; nf4: bitsandbytes NF4 (block 64); "
                        "mxfp4: OCP MXFP4 (E2M1 + E8M0 per 32; gpt-oss: the experts only, as published)")
    p.add_argument("--group-size", type=int, default=None, choices=list(GROUP_SIZES),
                   help=f"int4 group size along the input dimension (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
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
    from ember.loading.quantized import quantize_checkpoint

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
