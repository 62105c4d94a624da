"""Perplexity of the trained demo model per weight format: what each format costs in quality, printed beside
bench/decode.py's speed rows (``--no-ppl`` skips it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELDOUT_TEXT = """\
The morning was quiet in the little town. The baker opened his shop before the sun came up, and the smell \
of warm bread filled the street. A cat sat on the wall by the door and watched the people walk past.

By the sea the wind was cold. The fishermen pulled their boats onto the sand and carried their nets up to \
the harbour. The waves were small and grey, and the gulls cried over the water. A child ran along the \
beach and picked up shells, and her father called her back when the tide began to turn.

In the kitchen the old woman made soup for dinner. She cut onions and carrots and put them in a large pot \
with water and salt. She let the soup cook slowly on the fire for an hour, and then she added a little \
butter and fresh herbs from the garden. The soup was hot and good, and everyone wanted a second bowl.

At night the sky over the hills was clear. The moon was bright and the stars were many. The town was \
dark and still, and only the lamp in the window of the inn was burning. Tomorrow the market would come, \
and the square would be full of voices again.

The river runs from the hills down to the sea. In spring it is wide and fast, because the snow melts in \
the mountains. In summer it is low and slow, and the children swim in it when the days are hot. The \
farmers use its water for their fields, and the mill by the bridge turns with its flow.
"""


def demo_perplexities(formats: list[str], folder: Path, window: int, stride: int) -> dict:
    """Perplexity of the trained demo model on its corpus (and on :data:`HELDOUT_TEXT`), per weight
    format: "fp32", "bf16" (float) or a quant mode (bf16 compute)."""
    import ember
    from ember.demo import DEFAULT_STEPS, build_demo_checkpoint, load_corpus
    from ember.evaluate import perplexity
    from ember.quant import GROUP_SIZES

    t = time.perf_counter()
    # The demo's default build stops at a time limit on a slow or busy machine; the bench wants the
    # full recipe every time (same steps, same weights), so an early-stopped cache is rebuilt.
    steps = demo_steps(folder)
    build_demo_checkpoint(folder, progress=True, time_limit=None,
                          rebuild=steps is not None and steps != DEFAULT_STEPS)
    print(f"[ppl] demo model at {folder}, {demo_steps(folder)} training steps ({time.perf_counter() - t:.1f}s)",
          file=sys.stderr)
    base = ember.load(folder, device="cpu", dtype="fp32")
    widths = {m.in_features for m in base.model.modules() if isinstance(m, torch.nn.Linear)}
    group = max(g for g in GROUP_SIZES if all(w % g == 0 for w in widths))
    heldout = base.tokenizer.encode(HELDOUT_TEXT)
    corpus = base.tokenizer.encode(load_corpus())
    del base
    out: dict = {"model": str(folder), "int4_group_size": group, "window": window, "stride": stride,
                 "heldout_tokens": len(heldout) - 1, "train_tokens": len(corpus) - 1, "formats": {}}
    for fmt in formats:
        quant = fmt if fmt in ("int8", "int4", "nf4") else None
        llm = ember.load(folder, device="cpu", dtype="fp32" if fmt == "fp32" else "bf16", quant=quant,
                         group_size=group if fmt == "int4" else None)
        out["formats"][fmt] = {"heldout_ppl": perplexity(llm.model, heldout, window, stride)["ppl"],
                               "train_ppl": perplexity(llm.model, corpus, window, stride)["ppl"]}
        del llm
    # The demo ties its head to the embedding, so no format above quantizes a head. What the loader's default
    # int8 head (untied models under --quant) costs, measured on the same trained model: the head untied into
    # its own copy of the embedding (the same function), then that copy in int8, everything else bf16.
    from ember.models import Linear
    from ember.quant import quantize_linear

    llm = ember.load(folder, device="cpu", dtype="bf16")
    emb = llm.model.model.embed_tokens.weight
    head = Linear(emb.shape[1], emb.shape[0], bias=False)
    head.weight = torch.nn.Parameter(emb.detach().clone(), requires_grad=False)
    llm.model.lm_head = quantize_linear(head, "int8", "lm_head")
    out["formats"]["bf16 + int8 head"] = {"heldout_ppl": perplexity(llm.model, heldout, window, stride)["ppl"],
                                         "train_ppl": perplexity(llm.model, corpus, window, stride)["ppl"]}
    del llm, head
    ref = out["formats"].get("bf16")
    for r in out["formats"].values():
        if ref:
            r["heldout_ratio"] = r["heldout_ppl"] / ref["heldout_ppl"]
            r["train_ratio"] = r["train_ppl"] / ref["train_ppl"]
    return out


def demo_steps(folder: Path) -> int | None:
    """Training steps of the demo model in ``folder`` (from its README), or None if there is none."""
    try:
        for line in (folder / "README.md").read_text().splitlines():
            if line.startswith("- steps:"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None
