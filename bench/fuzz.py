"""Hostile-input fuzzing of Ember's readers: every case must load or fail with a one-line EmberError.

Four kinds of case, each built from a tiny valid input and then mutated by a seeded generator:

- ``safetensors``: a checkpoint folder whose ``model.safetensors`` header is edited (offsets, shapes,
  dtypes, types of every field, header length) or whose bytes are flipped or cut;
- ``gguf``: a llama.cpp file whose metadata values are replaced (types and ranges, NaN, 2^31 layers)
  or whose header bytes are flipped, overwritten with huge counts, or cut;
- ``config``: a checkpoint folder whose config.json fields get values of every JSON type and range;
- ``jsonl``: a training-data line in one of the three record shapes, mutated (bytes that are not
  UTF-8, U+2028, deep nesting, huge integers, lone surrogates, wrong types), read and tokenized.

Outcomes: ``loaded`` (success), ``clean`` (an EmberError whose message is one line), and the
failures: ``multiline`` (an EmberError over several lines), ``other`` (any other exception),
``hang`` (a case over ``--case-timeout`` seconds) and ``memory`` (peak RSS grew past ``--max-rss-gb``).

    python bench/fuzz.py --cases 10000 --seed 1 --json fuzz.json

prints the counts per kind and writes them (with the first failures, to reproduce) as JSON.
``tests/test_fuzz.py`` runs the same generator for a bounded time in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = ("safetensors", "gguf", "config", "jsonl")
OUTCOMES = ("loaded", "clean", "multiline", "other", "hang", "memory")

TINY_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}
# Fields config mutation targets: every one ModelConfig reads, plus a few it must ignore.
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "quantization",
]
HUGE_INT = "1" + "0" * 5000  # past Python's int-from-string digit limit


def weird_value(rng: random.Random) -> Any:
    """A JSON value from the edges of every type (NaN/Infinity written as JSON's extensions)."""
    pool: list[Any] = [
        None, True, False, "false", "true", "1", "", "x" * 300, 0, -1, 1, 2, 3, 8, 16, 31, 32, 64, 2**31, 2**63,
        -2**63, 10**30, 0.0, -0.0, 1.5, -1.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"), [], [1, 2],
        [None], {}, {"rope_type": "llama3"}, {"rope_type": "linear", "factor": 0}, {"type": "yarn"}, ["a"] * 3,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ]
    return rng.choice(pool)


def dumps(obj: Any) -> str:
    """JSON with NaN/Infinity allowed (as Python and many writers emit them)."""
    return json.dumps(obj, allow_nan=True)


# ---------------------------------------------------------------------------------------- tiny inputs
def tiny_shapes(cfg: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the tiny Llama (as Ember's Transformer would expect)."""
    c = {**TINY_CONFIG, **(cfg or {})}
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                          "lm_head.weight": (v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def safetensors_bytes(tensors: dict[str, np.ndarray], header_edit: Callable[[dict], Any] | None = None) -> bytes:
    """A safetensors file, written by hand so that ``header_edit`` can corrupt the header object."""
    header: dict[str, Any] = {}
    data = bytearray()
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_edit is not None:
        header = header_edit(header)
    text = dumps(header) if not isinstance(header, (bytes, str)) else header
    blob = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + bytes(data)


def write_checkpoint(folder: Path, config: dict[str, Any] | str | None = None, weights: bytes | None = None,
                     seed: int = 0) -> Path:
    """A tiny Llama checkpoint folder (config.json + model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TINY_CONFIG if config is None else config
    (folder / "config.json").write_text(cfg if isinstance(cfg, str) else dumps(cfg), encoding="utf-8",
                                        errors="surrogatepass")
    if weights is None:
        g = np.random.default_rng(seed)
        weights = safetensors_bytes({n: g.standard_normal(s).astype(np.float32) * 0.1 for n, s in tiny_shapes().items()})
    (folder / "model.safetensors").write_bytes(weights)
    return folder


GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    _, _, layer, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER[mod]}.{kind}"


def write_gguf(path: Path, meta: dict[str, tuple[Any, Any]] | None = None, seed: int = 0) -> Path:
    """A tiny llama-architecture GGUF file; ``meta`` overrides keys with (value, GGUFValueType or None=drop)."""
    import gguf
    from gguf import GGUFValueType as VT

    c = TINY_CONFIG
    base: dict[str, tuple[Any, Any]] = {
        "llama.context_length": (c["max_position_embeddings"], VT.UINT32),
        "llama.embedding_length": (c["hidden_size"], VT.UINT32),
        "llama.block_count": (c["num_hidden_layers"], VT.UINT32),
        "llama.feed_forward_length": (c["intermediate_size"], VT.UINT32),
        "llama.attention.head_count": (c["num_attention_heads"], VT.UINT32),
        "llama.attention.head_count_kv": (c["num_key_value_heads"], VT.UINT32),
        "llama.rope.freq_base": (c["rope_theta"], VT.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (c["rms_norm_eps"], VT.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING),
        "tokenizer.ggml.tokens": ([f"t{i}" for i in range(c["vocab_size"])], VT.ARRAY),
        "tokenizer.ggml.token_type": ([1] * c["vocab_size"], VT.ARRAY),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
    }
    base.update(meta or {})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (val, vtype) in base.items():
        if vtype is None:
            continue
        if vtype == VT.ARRAY:
            sub = VT.STRING if val and isinstance(val[0], str) else VT.INT32
            w.add_key_value(key, val, vtype, sub_type=sub)
        else:
            w.add_key_value(key, val, vtype)
    g = np.random.default_rng(seed)
    for name, shape in tiny_shapes().items():
        w.add_tensor(gguf_name(name), (g.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------- mutations
def _mutate_bytes(data: bytearray, rng: random.Random, lo: int, hi: int) -> None:
    """Flip, overwrite with huge integers, or delete bytes in ``data[lo:hi]``."""
    hi = max(lo + 1, min(hi, len(data)))
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(lo, hi)
        op = rng.random()
        if op < 0.5:
            data[at] ^= 1 << rng.randrange(8)
        elif op < 0.8 and at + 8 <= len(data):
            data[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 - 1, 2**62, 2**64 - 1]))
        else:
            data[at:at + 1] = bytes([rng.randrange(256)])


def safetensors_case(rng: random.Random, folder: Path) -> Callable[[], Any]:
    shapes = tiny_shapes()
    names = list(shapes)

    def edit(header: dict) -> Any:
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(names)
            entry = header[name]
            if not isinstance(entry, dict):
                continue
            op = rng.randrange(9)
            offsets = entry.get("data_offsets")
            if op in (0, 7) and not (isinstance(offsets, list) and len(offsets) == 2
                                     and all(type(o) is int for o in offsets)):
                op = 3  # an earlier edit broke them: replace a field instead
            if op == 0:  # shift, overlap or stretch offsets
                b, e = offsets
                d = rng.choice([-8, -4, 4, 8, 2**40, -b - 4])
                entry["data_offsets"] = rng.choice([[b + d, e + d], [b, e + d], [b + d, e], [e, b]])
            elif op == 1:
                entry["shape"] = [weird_value(rng) for _ in range(rng.randint(0, 3))]
            elif op == 2:
                entry["dtype"] = rng.choice(["I32", "I8", "U8", "BOOL", "F16", "F64", "X", 7, None, "F8_E4M3"])
            elif op == 3:
                entry[rng.choice(["dtype", "shape", "data_offsets"])] = weird_value(rng)
            elif op == 4:
                entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
            elif op == 5:
                header[name] = weird_value(rng)
            elif op == 6:
                header["__metadata__"] = weird_value(rng)
            elif op == 7:
                return dumps(header).replace(str(offsets[1]), rng.choice([HUGE_INT, "Infinity", "NaN", "1e999"]), 1)
            else:
                return rng.choice(["[" * 100000, "{}", "[]", "null", '"x"', "{" + '"a":' * 50000])
        return header

    g = np.random.default_rng(rng.randrange(2**32))
    tensors = {n: g.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    if rng.random() < 0.75:
        blob = bytearray(safetensors_bytes(tensors, edit))
    else:  # raw bytes: flipped header bytes, a wrong length field, or a cut
        blob = bytearray(safetensors_bytes(tensors))
        n = struct.unpack("<Q", blob[:8])[0]
        op = rng.random()
        if op < 0.5:
            _mutate_bytes(blob, rng, 0, 8 + n)
        elif op < 0.8:
            del blob[rng.randrange(len(blob)):]
        else:
            blob[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40, 2**64 - 1]))
    write_checkpoint(folder, weights=bytes(blob))

    def run() -> Any:
        from ember.loading import load_model

        return load_model(folder, dtype="fp32")
    return run


def config_case(rng: random.Random, folder: Path) -> Callable[[], Any]:
    cfg: Any = dict(TINY_CONFIG)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(CONFIG_FIELDS)
        if rng.random() < 0.15:
            cfg.pop(key, None)
        else:
            cfg[key] = weird_value(rng)
    text = dumps(cfg)
    r = rng.random()
    if r < 0.03:
        text = "[" * 100000
    elif r < 0.06:
        text = text.replace("16", HUGE_INT, 1)
    elif r < 0.08:
        text = text[: rng.randrange(len(text))]
    write_checkpoint(folder, config=text)

    def run() -> Any:
        from ember.loading import load_model

        return load_model(folder, dtype="fp32")
    return run


def gguf_case(rng: random.Random, folder: Path) -> Callable[[], Any]:
    from gguf import GGUFValueType as VT

    keys = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length", "llama.expert_count",
            "llama.expert_used_count", "llama.rope.scaling.type", "llama.rope.scaling.factor",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.merges",
            "general.architecture", "split.count", "tokenizer.ggml.pre", "tokenizer.chat_template"]
    values: list[tuple[Any, Any]] = [
        (0, VT.UINT32), (1, VT.UINT32), (3, VT.UINT32), (2**31, VT.UINT32), (2**32 - 1, VT.UINT32),
        (2**63 - 1, VT.INT64), (-1, VT.INT32), (float("nan"), VT.FLOAT32), (float("inf"), VT.FLOAT32),
        (0.0, VT.FLOAT32), (-1.0, VT.FLOAT32), (1e30, VT.FLOAT64), ("x", VT.STRING), ("", VT.STRING),
        (True, VT.BOOL), ([1, 2, 3], VT.ARRAY), (["a", "b c", "d"], VT.ARRAY), ([], VT.ARRAY), (None, None),
        ("llama", VT.STRING), ("qwen3moe", VT.STRING), ("llama", VT.STRING), (["t"] * 40, VT.ARRAY),
        (list(range(40)), VT.ARRAY), ("{{ raise_exception('x') }}", VT.STRING),
    ]
    meta = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(1, 3))}
    path = folder / "m.gguf"
    try:
        write_gguf(path, meta, seed=rng.randrange(2**32))
    except Exception:  # the writer itself refused the value: write a clean file, mutate its bytes instead
        write_gguf(path, {}, seed=0)
        meta = {}
    if not meta or rng.random() < 0.4:
        blob = bytearray(path.read_bytes())
        op = rng.random()
        if op < 0.7:
            _mutate_bytes(blob, rng, 4, min(len(blob), 1200))  # the header region: counts, lengths, types
        else:
            del blob[rng.randrange(len(blob)):]
        path.write_bytes(bytes(blob))

    def run() -> Any:
        from ember.loading.gguf import load_gguf

        return load_gguf(path, dtype="fp32")
    return run


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TOKENIZER: Any = None


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer with a ChatML template (no merges: one token per byte)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers

        from ember.tokenizer import Tokenizer

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
        _TOKENIZER = Tokenizer(backend, special_tokens={"eos_token": "<|endoftext|>"},
                               chat_templates={"default": CHATML}, eos_token_ids=[backend.token_to_id("<|endoftext|>")])
    return _TOKENIZER


def jsonl_case(rng: random.Random, folder: Path) -> Callable[[], Any]:
    records: list[Any] = [
        {"text": "hello world"},
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    rec: Any = json.loads(json.dumps(rng.choice(records)))
    op = rng.randrange(12)
    if op == 0:
        rec = weird_value(rng)
    elif op == 1:
        key = rng.choice(list(rec))
        rec[key] = weird_value(rng)
    elif op == 2 and "messages" in rec:
        rec["messages"][rng.randrange(2)][rng.choice(["role", "content", "weight", "tool_calls"])] = weird_value(rng)
    text = dumps(rec)
    if op == 3:
        text = text.replace("hello", "he\u2028l\u0085lo\u2029")
    elif op == 4:
        text = text.replace("hello", "\\ud800", 1)
    elif op == 5:
        text = "[" * rng.choice([100, 1000, 100000]) + "]" * rng.choice([0, 100])
    elif op == 6:
        text = text.replace('"hello world"', HUGE_INT).replace('"4"', HUGE_INT)
    elif op == 7:
        text = text.replace("hello", "x " * rng.choice([1000, 100000]), 1)
    elif op == 8:
        text = '{"text": ' + '{"a":' * rng.choice([70, 5000]) + "1" + "}" * rng.choice([70, 5000]) + "}"
    raw = bytearray(text.encode("utf-8", "surrogatepass"))
    if op == 9:
        _mutate_bytes(raw, rng, 0, len(raw))
    elif op == 10:
        raw[rng.randrange(len(raw)):rng.randrange(len(raw)) + 1] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n"])
    elif op == 11:
        del raw[rng.randrange(len(raw)):]
    path = folder / "data.jsonl"
    path.write_bytes(b'{"text": "first line"}\n' + bytes(raw) + b"\n")

    def run() -> Any:
        from ember.train.data import load_jsonl

        return load_jsonl(path, tiny_tokenizer(), seq_len=32)
    return run


MAKERS = {"safetensors": safetensors_case, "gguf": gguf_case, "config": config_case, "jsonl": jsonl_case}


# ---------------------------------------------------------------------------------------- running
class _CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran too long (BaseException: a case cannot swallow it)."""


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_case(kind: str, seed: int, work: Path, case_timeout: float = 10.0) -> tuple[str, str]:
    """Build and run one case; (outcome, detail). Deterministic in (kind, seed)."""
    from ember.errors import EmberError

    rng = random.Random(f"{kind}:{seed}")
    folder = work / f"{kind}-{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    case = MAKERS[kind](rng, folder)  # building the input is not under test: a failure here is a harness bug
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_CaseTimeout()))
    signal.setitimer(signal.ITIMER_REAL, case_timeout)
    try:
        case()
        outcome, detail = "loaded", ""
    except _CaseTimeout:
        outcome, detail = "hang", f"over {case_timeout} s"
    except EmberError as e:
        msg = str(e)
        outcome, detail = ("multiline", msg[:300]) if "\n" in msg and kind != "jsonl" else ("clean", msg[:200])
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        outcome, detail = "other", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(folder, ignore_errors=True)
    return outcome, detail


def fuzz(cases: int, seed: int = 0, kinds: tuple[str, ...] = KINDS, time_limit: float | None = None,
         case_timeout: float = 10.0, max_rss_gb: float = 2.0) -> dict[str, Any]:
    """Run ``cases`` cases (round-robin over ``kinds``), stopping early at ``time_limit`` seconds.

    Returns:
        {"cases", "seconds", "counts": {outcome: n}, "by_kind": {kind: {outcome: n}}, "failures": [...]}.
    """
    import warnings

    warnings.simplefilter("ignore")  # readers warn about odd-but-legal inputs; the outcome is what counts
    import logging

    logging.getLogger("gguf").setLevel(logging.ERROR)  # the writer warns on every overridden key
    import ember.loading  # noqa: F401 - imports happen before the first case's clock starts
    import ember.loading.gguf  # noqa: F401
    import ember.train.data  # noqa: F401

    tiny_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="ember-fuzz-"))
    # One clean load of each kind first: the native kernels are built/loaded on first use, which is
    # not a case's time.
    ember.loading.load_model(write_checkpoint(work / "warm"), dtype="fp32")
    ember.loading.gguf.load_gguf(write_gguf(work / "warm.gguf"), dtype="fp32")
    start, base_rss = time.perf_counter(), _rss_gb()
    counts = {o: 0 for o in OUTCOMES}
    by_kind = {k: {o: 0 for o in OUTCOMES} for k in kinds}
    failures: list[dict[str, Any]] = []
    done = 0
    try:
        for i in range(cases):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            kind = kinds[i % len(kinds)]
            case_seed = seed * 1_000_003 + i
            outcome, detail = run_case(kind, case_seed, work, case_timeout)
            if outcome in ("loaded", "clean") and _rss_gb() - base_rss > max_rss_gb:
                outcome, detail = "memory", f"peak RSS {_rss_gb():.1f} GB"
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            done += 1
            if outcome not in ("loaded", "clean") and len(failures) < 50:
                failures.append({"kind": kind, "seed": case_seed, "outcome": outcome, "detail": detail})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"cases": done, "seed": seed, "seconds": round(time.perf_counter() - start, 1), "counts": counts,
            "by_kind": by_kind, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    p.add_argument("--case-timeout", type=float, default=10.0)
    p.add_argument("--max-rss-gb", type=float, default=2.0)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--case", default=None, help="re-run one case, KIND:SEED, and print its outcome")
    args = p.parse_args(argv)
    if args.case:
        kind, seed = args.case.split(":")
        work = Path(tempfile.mkdtemp(prefix="ember-fuzz-"))
        print(run_case(kind, int(seed), work, args.case_timeout))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    result = fuzz(args.cases, args.seed, tuple(args.kinds.split(",")), case_timeout=args.case_timeout,
                  max_rss_gb=args.max_rss_gb)
    print(f"{'kind':<12}" + "".join(f"{o:>10}" for o in OUTCOMES))
    for kind, c in result["by_kind"].items():
        print(f"{kind:<12}" + "".join(f"{c[o]:>10}" for o in OUTCOMES))
    print(f"{'all':<12}" + "".join(f"{result['counts'][o]:>10}" for o in OUTCOMES))
    print(f"{result['cases']} cases in {result['seconds']} s (seed {result['seed']}); peak RSS {_rss_gb():.2f} GB")
    for f in result["failures"][:10]:
        print(f"  {f['outcome']}: {f['kind']}:{f['seed']}  {f['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    bad = sum(result["counts"][o] for o in ("multiline", "other", "hang", "memory"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
