"""``ember quantize MODEL --to gguf-TYPE OUT.gguf``: the GGUF targets of the ``quantize`` verb.

The verb itself (and its int8/int4/nf4/mxfp4 folder targets) is registered by :mod:`ember.quant.cli`,
which hands a ``gguf-*`` target here; the file is written by :func:`ember.commands.export.export_gguf`.
"""

from __future__ import annotations

import argparse
import sys

from ember.commands.export import export_gguf, summary
from ember.loading.gguf.writer import GGUF_TYPES

GGUF_TARGETS = tuple(f"gguf-{t}" for t in GGUF_TYPES)  # what --to takes besides the folder formats


def cmd_quantize_gguf(args: argparse.Namespace, out: str) -> int:
    """Write MODEL as one GGUF file of the type ``args.to`` names; one summary line on stderr."""
    info = export_gguf(args.model, out, args.to.removeprefix("gguf-"), overwrite=args.overwrite)
    print(f"[ember] {summary(info)}", file=sys.stderr)
    return 0
