"""The README's quick start, run as a user would type it, so it cannot break unnoticed.

The commands are read from the fenced ``bash`` block under the README's "## Quick start" heading (the
test follows the README as it changes). They run in a scratch folder holding the demo model the test
session already built (``demo_checkpoint``) as ``./ember-demo`` plus a briefly trained
``./ember-demo/facts-lora`` adapter: ``ember demo`` then reuses the model and, given ``--no-tune``, skips
the minute-long fine-tune whose output the fixture stands in for. ``ember chat`` reads piped questions.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the sea like?", "What is the name of the town?"]


def quickstart_commands(readme: str) -> list[list[str]]:
    """The ``ember ...`` command lines of the first fenced block under "## Quick start", as argv lists.

    Comments and ``$`` prompts are dropped and backslash continuations joined; lines that are not
    ``ember`` commands (a setup step) are left out.
    """
    section = re.search(r"^## Quick start[^\n]*\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"^```(?:bash|sh|shell|console)?[ \t]*\n(.*?)^```", section[1], re.M | re.S)
    assert block, "the Quick start section has no fenced code block"
    text = re.sub(r"\\\n", " ", block[1])
    out = []
    for line in text.splitlines():
        argv = shlex.split(line.strip().removeprefix("$ "), comments=True)
        if argv and argv[0] == "ember":
            out.append(argv)
    return out


def test_commands_are_read_from_the_readme_block():
    readme = ("# x\n\n## Quick start\n\n```bash\n$ ember demo   # builds it\nember generate ember-demo \"The sea\" \\\n"
              "  -n 5\npip install x\n```\n\n```bash\nember serve other\n```\n## Next\n```bash\nember list\n```\n")
    assert quickstart_commands(readme) == [["ember", "demo"], ["ember", "generate", "ember-demo", "The sea", "-n", "5"]]


@pytest.fixture
def scratch(tmp_path, demo_checkpoint) -> Path:
    """A folder with ./ember-demo (the session's demo model) and ./ember-demo/facts-lora (a short LoRA run)."""
    from ember.train.demo import DEMO_TUNE, facts_path
    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder = tmp_path / "ember-demo"
    shutil.copytree(demo_checkpoint, folder)
    tune(folder, facts_path(), folder / "facts-lora", TrainConfig(**{**DEMO_TUNE, "steps": 3}), device="cpu",
         progress=False)
    return tmp_path


def test_readme_quick_start_runs_as_written(scratch):
    commands = quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert commands and commands[0][:2] == ["ember", "demo"], commands
    assert any(c[:3] == ["ember", "chat", "ember-demo"] for c in commands), commands
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBER_DEMO_DIR", None)
    for argv in commands:
        args = argv[1:] + (["--no-tune"] if argv[1] == "demo" else [])
        chat = argv[1] == "chat"
        r = subprocess.run([sys.executable, "-m", "ember.cli", *args], cwd=scratch, env=env, capture_output=True,
                           text=True, timeout=300, input="\n".join(QUESTIONS) + "\n" if chat else "")
        shown = " ".join(argv)
        assert r.returncode == 0, f"`{shown}` failed:\n{r.stderr[-2000:]}"
        assert "ember: error" not in r.stderr, f"`{shown}`:\n{r.stderr[-2000:]}"
        assert r.stdout.strip(), f"`{shown}` printed no text"
        if chat:
            # every question answered (a reply may span lines)
            assert len(r.stdout.splitlines()) >= len(QUESTIONS), r.stdout
