"""The llama.cpp rows of bench/offload.py: the same MoE model from an mmap'd GGUF under the same memory limit.

The GGUF is written once from the loaded model with Ember's writer (bf16, llama.cpp's ``qwen3moe``), with a
SentencePiece-style vocabulary of the model's size (the bench's word tokenizer has no GGUF form; decoding feeds
token ids, so the vocabulary's content does not matter). Each row runs llama-cpp-python in a child process
(this file run as a script: no torch in it) whose memory is capped at the row's budget:

1. ``systemd-run --scope -p MemoryMax=BYTES`` (a systemd with a reachable bus), else
2. a fresh cgroup v2 folder under ``/sys/fs/cgroup`` with ``memory.max`` (root, the memory controller enabled),
3. else no cap, and the row says why.

The GGUF's pages are dropped from the page cache (``posix_fadvise(DONTNEED)``) before each row, so every row
starts from the disk. The child reports decode tok/s and its storage reads during decode (``/proc/self/io``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_IDS = [1, 17, 401, 33, 2048, 77, 1200, 9, 300]  # bench/offload.py's PROMPT in its word vocabulary
CGROUP = Path("/sys/fs/cgroup")


def write_gguf_once(whole, folder: Path) -> Path | str:
    """The bf16 GGUF of the loaded model ``whole`` (an Engine) beside ``folder``; a reason string if impossible."""
    path = folder.parent / f"{folder.name}-bf16.gguf"
    if path.is_file():
        return path
    try:
        from transformers import PreTrainedTokenizerFast

        from ember.loading.gguf.writer import write_gguf
        from ember.tokenizer import Tokenizer
        from gguf_llamacpp import spm_tokenizer
    except ImportError as e:
        return f"cannot write the GGUF: {e}"
    with tempfile.TemporaryDirectory() as tmp:
        fast = PreTrainedTokenizerFast(tokenizer_object=spm_tokenizer(whole.model.config.vocab_size), bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>")
        fast.save_pretrained(tmp)
        print(f"[bench] writing {path}", file=sys.stderr)
        write_gguf(whole.model, Tokenizer.from_dir(tmp), path, to="bf16")
    return path


def _cgroup_v2(max_bytes: int) -> tuple[Path | None, str]:
    controllers = CGROUP / "cgroup.controllers"
    if not controllers.is_file():
        return None, f"{CGROUP} is not a cgroup v2 hierarchy"
    if "memory" not in controllers.read_text().split():
        return None, f"{CGROUP} (cgroup v2) has no memory controller"
    group = CGROUP / f"ember-bench-offload-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.max").write_text(str(max_bytes))
    except OSError as e:
        return None, f"cannot make a cgroup under {CGROUP}: {e.strerror or e}"
    return group, ""


def limited(cmd: list[str], max_bytes: int) -> tuple[list[str], Path | None, str]:
    """``cmd`` wrapped so that its memory is capped at ``max_bytes``: (command, cgroup folder to remove or None,
    how the cap is set, or why there is none)."""
    probe = subprocess.run(["systemd-run", "--scope", "-q", "-p", f"MemoryMax={max_bytes}", "true"],
                           capture_output=True, text=True) if _which("systemd-run") else None
    if probe is not None and probe.returncode == 0:
        return ["systemd-run", "--scope", "-q", "-p", f"MemoryMax={max_bytes}", *cmd], None, \
            f"systemd-run MemoryMax={max_bytes}"
    why_systemd = "no systemd-run" if probe is None else \
        f"systemd-run: {(probe.stderr.strip().splitlines() or ['failed'])[-1]}"
    group, why = _cgroup_v2(max_bytes)
    if group is not None:
        return cmd, group, f"cgroup v2 {group} memory.max={max_bytes}"
    return cmd, None, f"no memory limit ({why_systemd}; {why})"


def _which(name: str) -> bool:
    return any(os.access(Path(d) / name, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def llama_rows(gguf: Path | str | None, budgets: list[int], tokens: int, threads: int, disk_bw: float,
               compute_tok_s: float) -> list[dict]:
    """One llama.cpp row per budget (or one row saying why there is none)."""
    name = "llama.cpp (mmap'd GGUF)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return [{"engine": name, "skipped": "llama-cpp-python not installed"}]
    if not isinstance(gguf, Path):
        return [{"engine": name, "skipped": str(gguf)}]
    rows = []
    script = Path(__file__).resolve()
    for budget in budgets:
        cmd, group, how = limited([sys.executable, str(script), str(gguf), str(tokens), str(threads)], budget)
        drop_page_cache(gguf)
        pre = None
        if group is not None:
            procs = group / "cgroup.procs"
            pre = lambda procs=procs: procs.write_text(str(os.getpid()))  # noqa: E731  (the child joins the cgroup)
        print(f"[bench] llama.cpp, budget {budget / 1e9:.2f} GB: {how}", file=sys.stderr)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre, timeout=3600)
        finally:
            if group is not None:
                try:
                    group.rmdir()
                except OSError:
                    pass
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            rows.append({"engine": name, "skipped": f"budget {budget / 1e9:.2f} GB ({how}): failed: {tail}"})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        per_token = r["read_bytes"] / tokens
        disk = disk_bw / per_token if per_token else float("inf")
        bound = min(disk, compute_tok_s)
        capped = group is not None or cmd[0] == "systemd-run"
        rows.append({"engine": f"{name}, {'capped' if capped else 'NO memory cap: see limit'}",
                     "budget_bytes": budget if capped else None,
                     "decode_tok_s": r["decode_tok_s"],
                     "gb_read_per_token": per_token / 1e9, "hit_rate": None, "disk_bound_tok_s": disk,
                     "compute_bound_tok_s": compute_tok_s, "disk_bound": disk < compute_tok_s,
                     "roofline_frac": r["decode_tok_s"] / bound if capped else None, "same_tokens": None, "limit": how,
                     "rss_bytes": r["rss_bytes"]})
        if not capped:
            break  # without a cap every budget runs the same: one row says it
    return rows


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker(gguf: str, tokens: str, threads: str) -> None:
    """The child: load the GGUF (mmap), warm up, decode ``tokens`` sampled tokens; print one JSON line."""
    import llama_cpp

    n = int(tokens)
    llm = llama_cpp.Llama(gguf, n_ctx=512, n_threads=int(threads), n_threads_batch=int(threads), use_mmap=True,
                          seed=1234, verbose=False)

    def run(prompt: list[int], new: int) -> tuple[float, int]:
        t1 = r1 = None
        got = 0
        for _ in llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
            got += 1
            if got == 1:  # after the prompt's forward and the first token
                t1, r1 = time.perf_counter(), _io_read_bytes()
            if got == new + 1:
                break
        return new / (time.perf_counter() - t1), _io_read_bytes() - r1

    run([1, 5, 6, 7, 8], 16)
    tok_s, read = run(PROMPT_IDS, n)
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    print(json.dumps({"decode_tok_s": tok_s, "read_bytes": read, "rss_bytes": rss}))


if __name__ == "__main__":
    worker(*sys.argv[1:4])
