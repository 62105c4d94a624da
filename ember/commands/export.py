"""``ember export MODEL --gguf OUT.gguf [--type q4_k_m] [--adapter DIR]``: one GGUF file for llama.cpp / Ollama.

MODEL is anything Ember loads (an HF folder, a folder from ``ember merge`` or ``ember quantize``, a
``.gguf`` file, a local model name). With ``--adapter`` a LoRA adapter from ``ember tune`` is merged
first (W + scaling * B @ A, in fp32, as ``ember merge`` does), so a fine-tuned model goes to Ollama in
one step. ``ember quantize MODEL --to gguf-TYPE OUT.gguf`` runs the same writer
(:func:`ember.loading.gguf.writer.write_gguf`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ember.errors import AdapterError
from ember.loading import load_model
from ember.loading.gguf import is_gguf_file, load_gguf
from ember.loading.gguf.writer import GGUF_TYPES, GGUFWriteInfo, write_gguf
from ember.tokenizer import Tokenizer
from ember.train.adapter_files import apply_adapter
from ember.train.lora import merge_lora

TYPE_CHOICES = ("auto", *GGUF_TYPES)


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, to: str = "auto",
                adapter: str | os.PathLike | None = None, name: str | None = None,
                overwrite: bool = False) -> GGUFWriteInfo:
    """Load ``model_path`` (merging ``adapter`` if given) and write it as one GGUF file.

    Args:
        model_path: HF folder or ``.gguf`` file.
        out: the ``.gguf`` file to write (atomically).
        to: a key of :data:`~ember.loading.gguf.writer.GGUF_TYPES`, or "auto": bf16 for a bf16 model, else f16
            (what llama.cpp's converter picks).
        adapter: a PEFT LoRA adapter folder to merge first.
        name: ``general.name`` (default: the model folder's or file's name).
        overwrite: replace an existing ``out``.
    Returns:
        :class:`~ember.loading.gguf.writer.GGUFWriteInfo`.
    """
    src = Path(model_path)
    if is_gguf_file(src):
        model, tokenizer = load_gguf(src, device="cpu", dtype="auto")
    else:
        model, tokenizer = load_model(src, device="cpu", dtype=_stored_dtype(src)), Tokenizer.from_dir(src)
    if adapter is not None:
        try:
            apply_adapter(model, adapter, dtype=torch.float32)
            merge_lora(model, unwrap=True)
        except AdapterError as e:
            raise AdapterError(f"{e} (exporting {src} with --adapter {adapter})") from None
    if to == "auto":
        dtype = model.model.embed_tokens.weight.dtype
        to = "bf16" if dtype == torch.bfloat16 else "f16"
    return write_gguf(model, tokenizer, out, to=to, name=name or src.name, overwrite=overwrite)


def summary(info: GGUFWriteInfo) -> str:
    """One line: the file, its type mix and size."""
    mix = ", ".join(f"{n} {t}" for t, n in sorted(info.types.items(), key=lambda kv: -kv[1]))
    return (f"wrote {info.path} ({info.architecture}, {info.file_type}: {info.tensors} tensors: {mix}; "
            f"{info.bytes / 2**20:.1f} MiB of weights)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export``; returns its parser."""
    p = subparsers.add_parser(
        "export", help="write a model as one GGUF file for llama.cpp / Ollama",
        description="Write MODEL (an HF folder, a merged or quantized Ember folder, or a .gguf file) as one GGUF "
                    "file that llama.cpp, Ollama and Ember load: architecture and hyper-parameters, the tokenizer "
                    "and chat template, ggml tensors of --type. With --adapter, a LoRA adapter from `ember tune` "
                    "is merged first.")
    p.add_argument("model", help="model folder, .gguf file or local model name")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument("--type", default="auto", choices=TYPE_CHOICES, dest="gguf_type",
                   help="tensor types: f32, f16, bf16, q8_0, q4_0, q4_k_m / q5_k_m (llama.cpp's mixes), q6_k "
                        "(default auto: bf16 for a bf16 model, else f16)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapter folder to merge before writing")
    p.add_argument("--name", default=None, help="general.name in the file (default: the model's folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """Handler of ``ember export``: one summary line on stderr."""
    info = export_gguf(args.model, args.gguf, args.gguf_type, adapter=args.adapter, name=args.name,
                       overwrite=args.overwrite)
    print(f"[ember] {summary(info)}", file=sys.stderr)
    return 0


def _stored_dtype(folder: Path) -> str:
    """The folder's own dtype (config.json's ``dtype`` or ``torch_dtype``), so the export writes what is stored:
    ``auto`` computes block-quantized weights (MXFP4 experts) in bf16 on CPUs without native bf16 GEMMs."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"  # the loader names what is wrong with the folder
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, "auto")
