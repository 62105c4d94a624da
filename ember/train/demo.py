"""The fine-tuning step of ``ember demo``: teach the demo model a few facts with LoRA, show before/after.

The bundled ``ember/data/demo_facts.jsonl`` holds chat turns about the demo corpus' little town
that the corpus never states (the town's name, the baker's, ...), each asked two ways. We ask
the demo model one phrasing of each question, fine-tune a LoRA adapter on the file with
``ember tune``'s own code path (chat template, assistant-only loss, checkpoints off), and ask
again with the adapter applied, unmerged, exactly as ``ember chat MODEL --adapter DIR`` would.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ember.train.trainer import TRAIN_CONFIG, TrainConfig

FACTS = "data/demo_facts.jsonl"
# Sized for a couple of minutes at most on 2 CPU cores with the 4-layer demo model.
DEMO_TUNE = dict(rank=16, alpha=32, dropout=0.0, steps=60, lr=3e-3, batch=10, seq_len=128, warmup=5,
                 schedule="cosine", dtype="fp32")


def facts_path() -> Path:
    """The bundled facts JSONL."""
    return Path(str(resources.files("ember").joinpath(FACTS)))


def demo_questions() -> list[tuple[str, str]]:
    """(question, taught answer) for the first phrasing of each fact in the bundled file."""
    seen: set[str] = set()
    out = []
    for line in facts_path().read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        msgs = json.loads(line)["messages"]
        answer = msgs[-1]["content"]
        if answer not in seen:
            seen.add(answer)
            out.append((msgs[0]["content"], answer))
    return out


def tune_demo(folder: str | Path, out_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
              max_new_tokens: int = 32, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune the demo model at ``folder`` on the bundled facts and print answers before and after.

    Args:
        folder: a demo checkpoint (``ember.demo.build_demo_checkpoint``).
        out_dir: where the adapter run goes (default ``<folder>/facts-lora``; a previous demo run
            there is replaced).
        device: where to train and generate.
        progress: show ``ember tune``'s progress bar.
        max_new_tokens: answer length limit.
        echo: where lines go (default stdout for answers).
    Returns:
        {"adapter": path, "questions": [...], "before": [...], "after": [...], "taught": [...],
         "correct_after": count of answers that now contain the taught fact}.
    """
    import ember
    from ember.train.adapter_files import apply_adapter
    from ember.train.tune import tune

    echo = echo or (lambda s: print(s, flush=True))
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / "facts-lora"
    if out.exists() and (out / TRAIN_CONFIG).is_file():
        shutil.rmtree(out)  # our own earlier demo run
    qa = demo_questions()
    llm = ember.load(folder, device=device, dtype="fp32")

    def ask(q: str) -> str:
        return llm.generate([{"role": "user", "content": q}], max_new_tokens=max_new_tokens, temperature=0.0).text.strip()

    before = [ask(q) for q, _ in qa]
    print(f"[ember demo] fine-tuning a LoRA adapter on {len(qa)} new facts ({facts_path().name}) -> {out}",
          file=sys.stderr, flush=True)
    tune(folder, facts_path(), out, TrainConfig(**DEMO_TUNE), device=device, progress=progress)
    apply_adapter(llm.model, out)
    after = [ask(q) for q, _ in qa]
    correct = 0
    for (q, taught), b, a in zip(qa, before, after):
        echo(f"\nQ: {q}\n  before: {b}\n  after:  {a}")
        correct += _key(taught) in a
    echo(f"\n[ember demo] {correct}/{len(qa)} answers now state the new fact. "
         f"Try: ember chat {folder} --adapter {out}")
    return {"adapter": out, "questions": [q for q, _ in qa], "before": before, "after": after,
            "taught": [t for _, t in qa], "correct_after": correct}


def _key(answer: str) -> str:
    """The distinctive part of a taught answer (its first sentence)."""
    return answer.split(".")[0]
