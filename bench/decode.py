"""Decode benchmark: Ember vs HF transformers on the same random TinyLlama-shape checkpoint.

For each dtype: batch 1, a 128-token prompt, 128 new tokens (greedy, EOS ignored). Both engines
are timed the same way, in the same process: decode tok/s = 127 / (t(128 new) - t(1 new)), so
prefill is excluded. The memory-bandwidth roofline is measured here with a large copy:
roofline tok/s = bandwidth / bytes that must be read per token (all weights except the
embedding table, of which one row is read, plus the KV cache). Prints a table; writes JSON.

    python bench/decode.py                 # 1.1B TinyLlama dims, bf16 + fp32, Ember vs HF
    python bench/decode.py --size small    # a quick 110M-parameter run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # TinyLlama-1.1B dimensions
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000),
}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in bytes/s: a large copy (read + write counted) and a large sum (read only)."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); dst.copy_(src); best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter(); src.sum(); best_read = min(best_read, time.perf_counter() - t)
    del src, dst
    gc.collect()
    return {"copy": 2 * n * 4 / best_copy, "read": n * 4 / best_read}


def write_checkpoint(folder: Path, dims: dict, dtype: torch.dtype, seed: int = 0) -> None:
    """A random Llama checkpoint (normal HF layout) plus a word-level tokenizer covering the vocab."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ember.config import ModelConfig
    from ember.model import Transformer

    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."), **dims}
    cfg = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, dims["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters read for one decode token: everything but the embedding table (one row)."""
    total = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def time_ember(folder: Path, dtype: str, prompt: list[int], new: int, repeats: int) -> dict:
    import ember
    from ember.sampling import SamplingParams

    llm = ember.load(folder, device="cpu", dtype=dtype)
    p1 = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    pn = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)

    def run(params):
        t = time.perf_counter()
        res = llm.generate(prompt, params)
        return time.perf_counter() - t, res

    run(p1)  # warm-up
    t1 = min(run(p1)[0] for _ in range(repeats))
    tn, res = min((run(pn) for _ in range(repeats)), key=lambda x: x[0])
    assert len(res.token_ids) == new
    out = {"prefill_s": t1, "decode_tok_s": (new - 1) / (tn - t1), "bytes_per_token": weight_bytes_per_token(llm.model),
           "tokens": res.token_ids}
    del llm
    gc.collect()
    return out


def time_hf(folder: Path, dtype: torch.dtype, prompt: list[int], new: int, repeats: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(1)
    t1 = min(run(1)[0] for _ in range(repeats))
    tn, toks = min((run(new) for _ in range(repeats)), key=lambda x: x[0])
    del model
    gc.collect()
    return {"prefill_s": t1, "decode_tok_s": (new - 1) / (tn - t1), "tokens": toks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    bw = measure_bandwidth()
    print(f"memory bandwidth: copy {bw['copy'] / 1e9:.1f} GB/s (read+write), read-only sum {bw['read'] / 1e9:.1f} GB/s")
    dims = SIZES[args.size]
    prompt = torch.randint(3, dims["vocab_size"], (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        for dt in args.dtypes.split(","):
            folder = Path(tmp) / dt
            t = time.perf_counter()
            write_checkpoint(folder, dims, names[dt])
            print(f"[{dt}] wrote random checkpoint in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            e = time_ember(folder, dt, prompt, args.new, args.repeats)
            roof = bw["copy"] / e["bytes_per_token"]
            row = {"dtype": dt, "engine": "ember", "decode_tok_s": e["decode_tok_s"], "prefill_s": e["prefill_s"],
                   "bytes_per_token": e["bytes_per_token"], "roofline_tok_s": roof,
                   "roofline_frac": e["decode_tok_s"] / roof}
            rows.append(row)
            print(f"[{dt}] ember {e['decode_tok_s']:.2f} tok/s", file=sys.stderr)
            if not args.no_hf:
                h = time_hf(folder, names[dt], prompt, args.new, args.repeats)
                same = sum(a == b for a, b in zip(h["tokens"], e["tokens"]))
                rows.append({"dtype": dt, "engine": "hf-transformers", "decode_tok_s": h["decode_tok_s"],
                             "prefill_s": h["prefill_s"], "bytes_per_token": e["bytes_per_token"],
                             "roofline_tok_s": roof, "roofline_frac": h["decode_tok_s"] / roof,
                             "greedy_tokens_equal": f"{same}/{args.new}"})
                row["speedup_vs_hf"] = e["decode_tok_s"] / h["decode_tok_s"]
                print(f"[{dt}] hf {h['decode_tok_s']:.2f} tok/s", file=sys.stderr)

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.device}"
    print(f"\nDecode, {args.size} Llama ({dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}), batch 1, "
          f"prompt {args.prompt_len}, {args.new} new tokens; {date.today()}; {machine}")
    print(f"roofline = copy bandwidth {bw['copy'] / 1e9:.1f} GB/s / bytes read per token\n")
    hdr = f"| {'dtype':5} | {'engine':15} | {'decode tok/s':>12} | {'prefill s':>9} | {'MB/token':>8} | {'roofline tok/s':>14} | {'% roofline':>10} | {'vs HF':>6} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        vs = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""
        print(f"| {r['dtype']:5} | {r['engine']:15} | {r['decode_tok_s']:12.2f} | {r['prefill_s']:9.2f} | "
              f"{r['bytes_per_token'] / 1e6:8.0f} | {r['roofline_tok_s']:14.2f} | {100 * r['roofline_frac']:9.1f}% | {vs:>6} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "size": args.size, "dims": dims,
                               "bandwidth_bytes_s": bw, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
