"""GGUF side by side: Ember and llama.cpp (llama-cpp-python) on the same files.

Files, made the way a llama.cpp user makes them: a random-weight HF checkpoint (TinyLlama's shape for
``--size 1.1b``, and a Mixtral-shape MoE) saved with ``transformers`` ``save_pretrained`` in bf16, converted
with llama.cpp's own ``convert_hf_to_gguf.py --outtype bf16``, then quantized with
``llama_cpp.llama_model_quantize`` to Q8_0, Q4_0, Q4_K_M, Q6_K and (MoE only: llama.cpp's MXFP4 type
quantizes experts and leaves the rest Q8_0, so a dense model has no MXFP4 tensors) MXFP4_MOE.

Each (file, engine) runs in its own worker process, so "resident MB" is that process's RSS growth from
just before the load (its runtime, torch or libllama, already imported) to after the last timed round:
weights, caches and buffers, with the mmap'd pages it touched counted for both engines. Both
workers of a file stay loaded and are timed in interleaved rounds (Ember, llama.cpp, Ember, ...; default
3), medians reported, so a slow spell of a shared machine hits both. Per round, batch 1, one greedy generation
of 1 + new tokens: prefill tok/s = prompt tokens / time to the first new token (the prompt's forward
pass); decode tok/s = new tokens / time of the one-token steps after it. Ember loads the file with its normal loader (``ember.load``), llama.cpp with
``llama_cpp.Llama`` (n_threads = the machine's cores, mmap on). Ratios are Ember / llama.cpp. Target
(issue 25): decode >= 1.0x and resident memory <= 1.1x llama.cpp's on every type.

Optional bench extras (never runtime or test dependencies): ``llama-cpp-python`` (built from source with
``CMAKE_ARGS="-DGGML_NATIVE=ON"``), ``sentencepiece`` (the converter imports it), and llama.cpp's
``convert_hf_to_gguf.py``: the copy vendored in llama-cpp-python's source distribution
(``vendor/llama.cpp/``), passed with ``--converter`` or ``EMBER_LLAMA_CPP_CONVERTER``.

    python bench/gguf_llamacpp.py --converter /tmp/lcp/vendor/llama.cpp/convert_hf_to_gguf.py               # 1.1B + MoE
    python bench/gguf_llamacpp.py --size small --types bf16,q8_0,q4_k_m --rounds 2 --converter ...         # a quick run
    python bench/gguf_llamacpp.py --no-dense --no-moe --gpt-oss --converter ...   # gpt-oss shape, MXFP4 experts
    python bench/gguf_llamacpp.py --threads 1 --cpu-time --rounds 1 ...   # a shared machine: tokens per CPU-second
    python bench/gguf_llamacpp.py --no-moe --types q4_0,int4_g32 --converter ...   # Ember's own int4 vs Q4_0

``int4_g32`` is not a file type: its row runs Ember on the HF checkpoint quantized on load (``--quant int4
--group-size 32``, bf16, the default int8 LM head) beside llama.cpp on the Q4_0 file of the same checkpoint
(both 4-bit codes in groups of 32), so that ratio is measured, not inferred from the Q4_0 row.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the ``gguf`` package: keep its folder off the import path so ``import gguf``
# (in Ember, in the converter) finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402

SIZES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
}
MOE_SIZES = {  # Mixtral shape: 8 experts, top-2 (bench/decode.py's MoE)
    "1.1b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, num_local_experts=4, num_experts_per_tok=2),
}
GPT_OSS_SIZES = {  # gpt-oss shape (alternating 128-token windows, sinks, biases, YaRN): ~1B total at "1.1b"
    "1.1b": dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, num_local_experts=24, num_experts_per_tok=4),
    "small": dict(hidden_size=512, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000, num_local_experts=16, num_experts_per_tok=4),
    "tiny": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=32000, num_local_experts=4, num_experts_per_tok=2),
}
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q6_k": 18, "mxfp4": 38}  # llama_ftype (38 = MXFP4_MOE)
LABELS = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q6_k": "Q6_K", "mxfp4": "MXFP4_MOE",
          "int4_g32": "Ember int4 g32 / Q4_0"}
OWN_QUANT = {"int4_g32": ("int4", 32, "q4_0")}  # row kind -> Ember's --quant, --group-size, llama.cpp's file type
CACHE = _HERE / ".cache" / "gguf"


# ------------------------------------------------------------------------------------------------ files


def spm_tokenizer(vocab_size: int):
    """A Llama-2-style (SentencePiece BPE, byte fallback) tokenizer of exactly ``vocab_size`` tokens, built
    without training: <unk> <s> </s>, 256 byte tokens, single characters, then pieces each made by one merge."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = ["\u2581", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *chars])}
    merges: list[tuple[str, str]] = []
    frontier = list(chars)
    while len(vocab) < vocab_size:
        grown = []
        for left in frontier:
            for c in chars:
                if len(vocab) >= vocab_size:
                    break
                if left + c not in vocab:
                    vocab[left + c] = len(vocab)
                    merges.append((left, c))
                    grown.append(left + c)
        frontier = grown
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def write_hf_checkpoint(folder: Path, dims: dict) -> None:
    """A random-weight Llama (Mixtral with experts in ``dims``) in bf16, saved as transformers saves it."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    moe = "num_local_experts" in dims
    cls = transformers.MixtralConfig if moe else transformers.LlamaConfig
    cfg = cls(**dims, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    fast = PreTrainedTokenizerFast(tokenizer_object=spm_tokenizer(dims["vocab_size"]), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def make_files(name: str, dims: dict, types: list[str], converter: Path, cache: Path) -> dict[str, Path]:
    """The bf16 GGUF (llama.cpp's converter) and its llama-quantize'd forms; reused from ``cache``."""
    import llama_cpp

    folder = cache / f"{name}-hf"
    if not (folder / "config.json").is_file():
        print(f"[{name}] writing the random HF checkpoint", file=sys.stderr)
        write_hf_checkpoint(folder, dims)
    files = {"bf16": cache / f"{name}-bf16.gguf"}
    if not files["bf16"].is_file():
        print(f"[{name}] converting with {converter}", file=sys.stderr)
        tmp = files["bf16"].with_suffix(".tmp")
        subprocess.run([sys.executable, str(converter), str(folder), "--outtype", "bf16", "--outfile", str(tmp)],
                       check=True, cwd=converter.parent, stdout=subprocess.DEVNULL)
        os.replace(tmp, files["bf16"])
    for t in types:
        if t == "bf16":
            continue
        path = files[t] = cache / f"{name}-{t}.gguf"
        if not path.is_file():
            print(f"[{name}] llama_model_quantize -> {LABELS[t]}", file=sys.stderr)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = FTYPES[t], os.cpu_count() or 1
            tmp = path.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(files["bf16"]).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize failed for {path}")
            os.replace(tmp, path)
    return {t: files[t] for t in types}


def make_gpt_oss_file(name: str, dims: dict, cache: Path) -> dict[str, Path]:
    """A random gpt-oss checkpoint in the hub's layout (bf16, experts MXFP4 by ``ember quantize --to mxfp4``),
    written as llama.cpp's ``gpt-oss`` GGUF by ``ember export --gguf --type bf16``: experts stay MXFP4 as the
    converter keeps them (its BPE pre-tokenizer check refuses this bench's synthetic vocabulary)."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    from ember.commands.export import export_gguf
    from ember.loading.quantized import quantize_checkpoint

    path = cache / f"{name}-mxfp4.gguf"
    if path.is_file():
        return {"mxfp4": path}
    folder, hub = cache / f"{name}-hf", cache / f"{name}-hf-mxfp4"
    if not (hub / "config.json").is_file():
        print(f"[{name}] writing the random HF checkpoint (MXFP4 experts)", file=sys.stderr)
        cfg = transformers.GptOssConfig(**dims, sliding_window=128, max_position_embeddings=4096, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        PreTrainedTokenizerFast(tokenizer_object=spm_tokenizer(dims["vocab_size"]), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(folder)
        quantize_checkpoint(folder, hub, "mxfp4", lm_head=None, overwrite=True)
    print(f"[{name}] ember export --gguf (experts MXFP4, the rest bf16)", file=sys.stderr)
    export_gguf(str(hub), str(path), "bf16", overwrite=True)
    return {"mxfp4": path}


# ------------------------------------------------------------------------------------------------ workers


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class EmberRunner:
    def __init__(self, path: str, threads: int, quant: str | None = None, group_size: int | None = None) -> None:
        import torch

        import ember
        from ember.sampling import SamplingParams

        torch.set_num_threads(threads)
        # an HF folder quantized on load (OWN_QUANT rows) computes in bf16, as the GGUF files do
        own = dict(quant=quant, group_size=group_size, dtype="bf16") if quant else {}
        self.llm = ember.load(path, device="cpu", **own)
        self.SamplingParams = SamplingParams

    def round(self, prompt: list[int], new: int) -> tuple[float, float]:
        params = self.SamplingParams(max_new_tokens=new + 1, temperature=0.0, ignore_eos=True)
        t, c = time.perf_counter(), time.process_time()
        t1, n = None, 0
        for _ in self.llm.stream(prompt, params):
            n += 1
            if t1 is None:  # the prompt's forward pass and the first new token
                t1, c1 = time.perf_counter(), time.process_time()
        end, c2 = time.perf_counter(), time.process_time()
        assert n == new + 1
        # decode: the `new` one-token steps after it
        return len(prompt) / (t1 - t), new / (end - t1), len(prompt) / (c1 - c), new / (c2 - c1)


class LlamaCppRunner:
    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp
        import numpy as np

        self.np, self.lib = np, llama_cpp
        self.llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False, logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def round(self, prompt: list[int], new: int) -> tuple[float, float]:
        self.llm.reset()
        t, c = time.perf_counter(), time.process_time()
        self.llm.eval(prompt)
        tok = self._argmax()  # the first new token comes with the prompt, as in Ember's 1-token run
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(new):
            self.llm.eval([tok])
            tok = self._argmax()
        end, c2 = time.perf_counter(), time.process_time()
        return len(prompt) / (t1 - t), new / (end - t1), len(prompt) / (c1 - c), new / (c2 - c1)


def worker(engine: str, path: str, threads: int, prompt_len: int, new: int, vocab: int, quant: str | None = None,
           group_size: int | None = None) -> None:
    """Load, report the RSS growth, then time one round per ``round`` line on stdin (JSON lines on stdout)."""
    refusals: tuple[type[Exception], ...] = ()
    if engine == "ember":  # the runtimes are imported before the baseline: the delta is the model's
        import torch  # noqa: F401

        from ember.errors import EmberError

        refusals = (EmberError,)
    else:
        import llama_cpp  # noqa: F401
        import numpy  # noqa: F401

    gc.collect()
    rss0 = rss_bytes()
    t = time.perf_counter()
    try:
        runner = EmberRunner(path, threads, quant, group_size) if engine == "ember" else LlamaCppRunner(path, threads)
    except refusals as e:  # a type this Ember does not read: the row says so
        print(json.dumps({"error": str(e)}), flush=True)
        return
    load_s = time.perf_counter() - t
    import random

    rng = random.Random(1)
    prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
    runner.round(prompt, 8)  # warm-up: thread pools, kernel caches, first-touch of the weights
    out = sys.stdout
    print(json.dumps({"load_s": load_s, "rss_bytes": rss_bytes() - rss0, "rss_runtime_bytes": rss0}), file=out,
          flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        prefill, decode, prefill_cpu, decode_cpu = runner.round(prompt, new)
        print(json.dumps({"prefill_tok_s": prefill, "decode_tok_s": decode, "prefill_tok_cpu_s": prefill_cpu,
                          "decode_tok_cpu_s": decode_cpu, "rss_bytes": rss_bytes() - rss0}), file=out, flush=True)


class Worker:
    def __init__(self, engine: str, path: Path, args: argparse.Namespace, vocab: int,
                 quant: tuple[str, int] | None = None) -> None:
        self.engine = engine
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, str(path), "--threads",
               str(args.threads), "--prompt-len", str(args.prompt_len), "--new", str(args.new), "--vocab", str(vocab)]
        if quant:
            cmd += ["--quant", quant[0], "--group-size", str(quant[1])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()
        self.error = self.hello.get("error")
        self.rounds: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def round(self) -> dict | None:
        if self.error:
            return None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        self.rounds.append(self._read())
        return self.rounds[-1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()

    def result(self) -> dict:
        if self.error:
            return {"error": self.error}
        med = {k: statistics.median(r[k] for r in self.rounds)
               for k in ("prefill_tok_s", "decode_tok_s", "prefill_tok_cpu_s", "decode_tok_cpu_s")}
        return {**med, "rss_bytes": max(r["rss_bytes"] for r in self.rounds), "load_s": self.hello["load_s"],
                "rounds": self.rounds}


def bench_file(model: str, kind: str, path: Path, args: argparse.Namespace, vocab: int,
               own: Path | None = None) -> dict:
    """Both engines on ``path``; for an OWN_QUANT ``kind`` Ember runs the HF folder ``own`` quantized on load."""
    ember = Worker("ember", own or path, args, vocab, OWN_QUANT[kind][:2] if own else None)
    lcpp = Worker("llama.cpp", path, args, vocab)
    try:
        for r in range(args.rounds):
            e, c = ember.round(), lcpp.round()
            show = (lambda x, k: "-" if x is None else f"{x[k]:.2f}")
            dk, pk = ("decode_tok_cpu_s", "prefill_tok_cpu_s") if args.cpu_time else ("decode_tok_s", "prefill_tok_s")
            print(f"[{model} {LABELS[kind]}] round {r + 1}: decode ember {show(e, dk)} / llama.cpp {show(c, dk)} "
                  f"tok/s{' per CPU-s' if args.cpu_time else ''}; prefill {show(e, pk)} / {show(c, pk)}", file=sys.stderr)
    finally:
        ember.close()
        lcpp.close()
    e, c = ember.result(), lcpp.result()
    row = {"model": model, "type": LABELS[kind], "file": str(path), "file_bytes": path.stat().st_size,
           "ember": e, "llama_cpp": c}
    if "error" not in e and "error" not in c:
        cpu = "_cpu" if args.cpu_time else ""
        row.update(decode_ratio=e[f"decode_tok{cpu}_s"] / c[f"decode_tok{cpu}_s"],
                   prefill_ratio=e[f"prefill_tok{cpu}_s"] / c[f"prefill_tok{cpu}_s"], rss_ratio=e["rss_bytes"] / c["rss_bytes"])
    return row


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", _HERE / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def table(d: dict) -> str:
    """The Markdown table of one run: bench/report.py's, so the printed and the recorded tables are one."""
    return _report_module().gguf_table(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--types", default="bf16,q8_0,q4_0,q4_k_m,q6_k,mxfp4",
                    help="file types (mxfp4: the MoE only, llama.cpp's MXFP4_MOE; int4_g32: the dense model only, "
                         "Ember's --quant int4 --group-size 32 of the HF folder beside llama.cpp's Q4_0 file)")
    ap.add_argument("--no-moe", action="store_true", help="skip the MoE files")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense Llama files")
    ap.add_argument("--gpt-oss", action="store_true", help="add a gpt-oss-shape MoE with MXFP4 experts")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per file (medians)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cpu-time", action="store_true",
                    help="rate tokens per CPU-second of each process (for a shared machine; use --threads 1)")
    ap.add_argument("--converter", default=os.environ.get("EMBER_LLAMA_CPP_CONVERTER"),
                    help="llama.cpp's convert_hf_to_gguf.py (default: $EMBER_LLAMA_CPP_CONVERTER)")
    ap.add_argument("--cache", default=str(CACHE), help="where checkpoints and GGUF files are made and reused")
    ap.add_argument("--out", default="bench/results/gguf.json")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no new file after S seconds (the rows measured by then are written and tabled)")
    ap.add_argument("--record", action="store_true",
                    help="then record the table (bench/report.py: bench/recorded/ and docs/benchmarks.md)")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads, args.prompt_len, args.new, args.vocab, args.quant,
               args.group_size)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("bench/gguf_llamacpp.py needs llama-cpp-python (an optional bench extra): "
                 "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python")
    if not args.converter or not Path(args.converter).is_file():
        sys.exit("pass --converter PATH/convert_hf_to_gguf.py (llama.cpp's converter; llama-cpp-python's sdist "
                 "vendors it under vendor/llama.cpp/)")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    types = [t for t in args.types.split(",") if t]
    unknown = set(types) - set(LABELS)
    if unknown:
        sys.exit(f"unknown --types {sorted(unknown)}; choose from {', '.join(LABELS)}")
    models = ([] if args.no_dense else [(f"llama-{args.size}", SIZES[args.size], [t for t in types if t != "mxfp4"])])
    moe_types = [t for t in types if t not in OWN_QUANT]
    models += [] if args.no_moe else [(f"mixtral-moe-{args.size}", MOE_SIZES[args.size], moe_types)]
    from ember.hardware import cpu_name

    import llama_cpp
    import torch

    machine = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores"
    d = {"bench": "gguf", "date": str(date.today()), "machine": machine, "torch": torch.__version__,
         "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "rounds": args.rounds,
         "prompt_len": args.prompt_len, "new_tokens": args.new, "size": args.size, "cpu_time": args.cpu_time,
         "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.gpt_oss:
        models.append((f"gpt-oss-{args.size}", GPT_OSS_SIZES[args.size], ["mxfp4"]))
    # the types in turn, each on the dense model then the MoE, so a time-limited run covers the most types
    jobs = [(name, dims, kind) for kind in types for name, dims, kinds in models if kind in kinds]
    for name, dims, kind in jobs:
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            print(f"time limit: {name} {LABELS[kind]} and later files not run", file=sys.stderr)
            d.setdefault("skipped", []).append(f"{name} {LABELS[kind]}")
            continue
        if name.startswith("gpt-oss"):
            path = make_gpt_oss_file(name, dims, cache)[kind]
        else:
            file_kind = OWN_QUANT[kind][2] if kind in OWN_QUANT else kind
            path = make_files(name, dims, [file_kind], Path(args.converter).resolve(), cache)[file_kind]
        own = cache / f"{name}-hf" if kind in OWN_QUANT else None
        d["rows"].append(bench_file(name, kind, path, args, dims["vocab_size"], own))
        d["wall_s"] = time.perf_counter() - t0
        tmp = out.with_suffix(".tmp")  # after every file, so a stopped run keeps what it measured
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, out)
    print()
    print(table(d))
    print(f"\nwrote {out}")
    if args.record:
        report = _report_module()
        if out.resolve() != (report.RESULTS / "gguf.json").resolve():
            sys.exit("--record takes the default --out (bench/report.py reads bench/results/gguf.json)")
        print(f"recorded {report.record('gguf')}")
        report._atomic_write(report.DOCS_PAGE, report.render_docs())


if __name__ == "__main__":
    main()
