"""GGUF decode benchmark: Ember running GGUF files in their own block types vs Ember's own int8/int4 of the same model.

A random Llama (``--size small``: ~110M parameters; ``1.1b``: TinyLlama dimensions) is written as a bf16
safetensors checkpoint (bench/decode.py's ``write_checkpoint``) and as GGUF files the way llama.cpp lays them
out (llama names, the q/k RoPE row permutation, tokenizer metadata), each quantized tensor random blocks of
its type with scales of the weight's size (decode speed and memory do not depend on the values). Rows, all batch 1, a ``--prompt``-token prompt, ``--new`` new tokens
(greedy, EOS ignored), bf16 compute, timed in interleaved rounds as bench/decode.py does (decode tok/s =
(new - 1) / (t(new) - t(1)), best round; prefill = t(1)):

* Ember int8 and int4 (group 32 and 128) quantized on load from the bf16 checkpoint (int4 group 32 printed right
  before the Q4_0 file: both are 4-bit codes in groups of 32);
* Ember on each GGUF file (its tensors kept as ggml blocks, ember/kernels/gguf.cpp).

"resident MB" is the process RSS growth from before the load to after a first decode, beside the GGUF
file's size (the file is memory-mapped: its touched pages count). ``--cpu-time`` runs one thread and times
process CPU seconds instead of wall clock, for a machine shared with other work. Prints a table; writes JSON.

    python bench/gguf_decode.py --size small
    python bench/gguf_decode.py --size small --cpu-time --prompt 32 --new 33
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import EmberRow  # noqa: E402  (bench/decode.py's harness)
from models import SIZES, write_checkpoint  # noqa: E402

LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, rows (2, hd/2) -> (hd/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _blocks(arr: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of ``qtype`` for a weight shaped like ``arr``, scales of its size: decode speed and memory do
    not depend on the values (the logits of such a file mean nothing), and gguf-py's numpy quantizers take
    minutes for a 1B model (and have none for the K-quants)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (arr.size // block, size), dtype=np.uint8)
    slots = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "IQ4_XS": [0],
             "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108]}.get(qtype.name, [])
    for s in slots:
        raw[:, s:s + 2] = np.full((raw.shape[0], 1), float(np.abs(arr).mean()) / 8, np.float16).view(np.uint8)
    if qtype.name == "MXFP4":
        raw[:, 0] = 120  # 2^-7 scales
    return raw.reshape(arr.shape[0], -1)


def write_gguf(folder: Path, path: Path, qtype_name: str) -> Path:
    """The checkpoint in ``folder`` as a llama GGUF file of ``qtype_name`` (norms stay F32)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    from safetensors.torch import load_file

    from ember.loading.gguf.tokenizer import _byte_level_alphabet

    cfg = json.loads((folder / "config.json").read_text())
    nh, nkv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = hidden // nh
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg["vocab_size"])
    qtype, rng = QT[qtype_name], np.random.default_rng(0)
    for name, t in load_file(str(folder / "model.safetensors")).items():
        arr = t.float().numpy()
        if name in GLOBAL:
            gname = GLOBAL[name]
        else:
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{LAYER[mod]}.{kind}"
        if ".attn_q." in gname or ".attn_k." in gname:
            arr = _permute(arr, nh if ".attn_q." in gname else nkv)
        if arr.ndim == 1:
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, _blocks(np.ascontiguousarray(arr), qtype, rng), raw_dtype=qtype)
    alphabet = _byte_level_alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [alphabet[b] for b in range(256)]
    tokens += [f"w{i}" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K,Q6_K,MXFP4")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed in process CPU seconds (a loaded, shared machine); default wall clock")
    ap.add_argument("--out", type=Path, default=Path("bench/recorded/gguf_decode.json"))
    args = ap.parse_args()

    from ember import kernels

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        write_checkpoint(folder, SIZES[args.size], torch.bfloat16)
        files = {t: write_gguf(folder, Path(tmp) / f"model-{t}.gguf", t) for t in args.types.split(",")}
        prompt = [3 + (7 * i) % 1000 for i in range(args.prompt)]
        specs = [("ember int8", folder, "int8", None), ("ember int4 g128", folder, "int4", 128)]
        for t, p in files.items():  # Ember's int4 group 32 right before the Q4_0 file (both 4 bits in groups of 32)
            specs += [("ember int4 g32", folder, "int4", 32)] if t == "Q4_0" else []
            specs.append((f"ember gguf {t}", p, None, None))
        if "Q4_0" not in files:
            specs.insert(1, ("ember int4 g32", folder, "int4", 32))
        if args.cpu_time:
            torch.set_num_threads(1)
        rows = {}
        for label, src, quant, group in specs:  # loaded one after another: each RSS delta is its own
            rows[label] = EmberRow(src, "bf16", prompt, args.new, quant, group)
        for _ in range(args.rounds):
            for row in rows.values():
                if args.cpu_time:  # this process's CPU seconds: what a quiet core would take, on a shared machine
                    t0 = time.process_time()
                    row._run(row.p1)
                    t1 = time.process_time()
                    row._run(row.pn)
                    t2 = time.process_time()
                    row.prefills.append(t1 - t0)
                    row.rates.append((args.new - 1) / ((t2 - t1) - (t1 - t0)))
                else:
                    row.time_round()
        results = []
        for (label, src, _, _), row in zip(specs, rows.values()):
            r = row.result()
            r.pop("tokens", None)
            r["row"] = label
            r["file_bytes"] = src.stat().st_size if src.is_file() else None
            results.append(r)

    clock = "CPU seconds, 1 thread" if args.cpu_time else "wall clock"
    print(f"\n{args.size} Llama, batch 1, {args.prompt}-token prompt, {args.new} new, bf16 compute, "
          f"best of {args.rounds} interleaved rounds ({clock}); kernels: {kernels.status()}")
    print(f"{'row':18} {'decode tok/s':>12} {'prefill s':>9} {'read MB/tok':>11} {'held MB':>8} {'resident MB':>11} "
          f"{'file MB':>8}")
    for r in results:  # read MB/tok: the weight bytes one decode step reads (the model's weight_bytes_per_token)
        rss = r["rss_after_decode"]
        print(f"{r['row']:18} {r['decode_tok_s']:12.1f} {r['prefill_s']:9.3f} {r['weight_bytes_per_token'] / 2**20:11.1f} "
              f"{r['tensor_bytes'] / 2**20:8.1f} {(rss or 0) / 2**20:11.1f} {(r['file_bytes'] or 0) / 2**20:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": str(date.today()), "machine": platform.processor() or platform.machine(),
                                    "size": args.size, "clock": clock, "kernels": kernels.status(), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
