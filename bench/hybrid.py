"""Decode rows of the hybrid models: a Qwen3.5-shape (Gated DeltaNet + gated attention) and a Nemotron-H-shape
(Mamba-2 + attention + relu2 MLP) random checkpoint, bf16 weights, batch 1.

For each model:

* **decode tok/s**, bytes read per token and % of the memory-bandwidth roofline, timed as ``bench/decode.py``
  times its rows (best of ``--repeats`` rounds of 1 and ``--new`` new tokens after a ``--prompt-len`` prompt,
  prefill excluded). Bytes per token = weights as stored (``Transformer.weight_bytes_per_token``) + the attention
  layers' KV at the mean context + the recurrent state, read and written once per token;
* the same with the native state-update kernel switched off (the PyTorch recurrence): its effect on decode;
* **context**: decode tok/s with 128 and 8,192 tokens already in the cache (the cache filled with random keys,
  values and states, no prefill: a decode step does the same work whatever the values), for the whole model and
  for its recurrent mixers alone (their time per step from forward hooks); the ratios 8192 / 128;
* **memory at 32k context**: the cache a 32,768-token sequence needs (``ember.cache`` sizes, as allocated) plus
  the weights, against a dense model of the same size (the same config with every layer full attention).

    python bench/hybrid.py --size small      # ~100M-parameter shapes (a few minutes on 2 cores)
    python bench/hybrid.py                   # ~1B-parameter shapes
    python bench/decode.py --hybrid small    # the same rows after decode.py's own
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DEADLINE, EmberRow, measure_bandwidth, more_rounds, release_memory  # noqa: E402
from models import write_word_tokenizer  # noqa: E402

# Qwen3.5-27B's block: 3 Gated DeltaNet layers, then one gated full-attention layer; dk = dv = 128.
QWEN35 = {
    "1b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=16, num_attention_heads=8,
               num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16),
    "small": dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, linear_num_key_heads=4, linear_num_value_heads=8),
}
# Nemotron-H's mix (Nemotron-H-8B: 24 Mamba-2, 4 attention, 24 MLP layers): Mamba/MLP pairs, an attention layer
# every 13 layers.
NEMOTRON = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
               mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, pairs=6),
    "small": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=6, num_key_value_heads=2, head_dim=128,
                  mamba_num_heads=24, mamba_head_dim=64, n_groups=4, ssm_state_size=128, pairs=3),
}
VOCAB = {"1b": 32000, "small": 16000}


def hybrid_config(family: str, size: str) -> dict:
    """config.json fields of the bench model (HF names)."""
    if family == "qwen3_5_text":
        d = QWEN35[size]
        n = d["num_hidden_layers"]
        return {"model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"], **d, "vocab_size": VOCAB[size],
                "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
                "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    d = dict(NEMOTRON[size])
    pairs = d.pop("pairs")
    blocks = (["linear_attention", "mlp"] * pairs + ["full_attention"]) * 2
    return {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], **d, "vocab_size": VOCAB[size],
            "layers_block_type": blocks, "num_hidden_layers": len(blocks), "conv_kernel": 4, "chunk_size": 128,
            "layer_norm_epsilon": 1e-5, "max_position_embeddings": 65536, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def write_hybrid_checkpoint(folder: Path, raw: dict, seed: int = 0) -> None:
    """Random bf16 weights under Ember's names (which it loads as they are) and a word-level tokenizer."""
    from safetensors.torch import save_file

    from ember.config import ModelConfig
    from ember.models import Transformer

    cfg = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("A_log"):  # decays exp(-dt exp(A_log)) spread over (0, 1), as trained models have them
            t = torch.log(torch.linspace(1, 16, shape[0]))
        elif name.endswith(("dt_bias", ".D")) or name.endswith("norm.weight") and cfg.model_type == "nemotron_h":
            t = torch.ones(shape)
        elif name.endswith("norm.weight"):
            t = torch.ones(shape) if "linear_attn.norm" in name else torch.zeros(shape)  # (1 + w) norms at 0
        else:
            t = torch.randn(shape, generator=g) * 0.02
        tensors[name] = t.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    write_word_tokenizer(folder, raw["vocab_size"])


def per_token_cache_bytes(cfg, context: float) -> tuple[float, float]:
    """(KV bytes the attention layers read at ``context`` tokens, recurrent-state bytes read + written) per step."""
    from ember.cache import bytes_per_sequence, layer_specs

    kv = state = 0.0
    for spec in layer_specs(cfg):
        if spec.kind == "recurrent":
            state += 2 * bytes_per_sequence(spec, torch.bfloat16, 1)  # read and written back
        else:
            kv += bytes_per_sequence(spec, torch.bfloat16, int(context))
    return kv, state


def _recurrent_mixers(model) -> list[torch.nn.Module]:
    return [getattr(layer, "linear_attn", None) or layer.mixer for layer in model.model.layers
            if layer.attention_type == "linear_attention"]


def time_at_context(model, context: int, steps: int, repeats: int) -> dict:
    """Decode tok/s of one sequence with ``context`` tokens in the cache (random keys, values and states), and
    the recurrent mixers' share of a step (forward hooks)."""
    from ember.cache import StaticKVCache

    cache = StaticKVCache(model.config, 1, context + steps, torch.bfloat16, "cpu")
    for ks in (cache.k, cache.v):
        for t in ks:
            t.normal_()
    for states in cache.states.values():
        for t in states:
            t.normal_(std=0.1)
    spent = [0.0]
    began: dict[int, float] = {}
    hooks = []
    for m in _recurrent_mixers(model):
        hooks.append(m.register_forward_pre_hook(lambda mod, a: began.__setitem__(id(mod), time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda mod, a, out: spent.__setitem__(0, spent[0] + time.perf_counter() - began[id(mod)])))
    ids = torch.randint(3, model.config.vocab_size, (1, 1))
    best, best_mix = 0.0, float("inf")
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                cache.pos = context
                spent[0] = 0.0
                t = time.perf_counter()
                for _ in range(steps):
                    model(ids, cache=cache, start=cache.pos, last_only=True)
                    cache.advance(1)
                rate = steps / (time.perf_counter() - t)
                best = max(best, rate)
                best_mix = min(best_mix, spent[0] / steps)
    finally:
        for h in hooks:
            h.remove()
    return {"context": context, "decode_tok_s": best, "recurrent_s_per_token": best_mix}


def time_state_updates(repeats: int = 20) -> list[dict]:
    """One layer's per-token state update alone, the native kernel against the PyTorch recurrence, at the
    published shapes: Qwen3.5-27B's Gated DeltaNet (48 value heads, 128 x 128) and Nemotron-H's Mamba-2
    (Nemotron 3 Nano: 64 heads, 64 x 128, 8 groups). Returns µs per call and the state's GB/s (read + write)."""
    from ember.models.gated_deltanet import recurrent_gated_delta_rule
    from ember.models.mamba2 import selective_state_update
    from ember.runtime import recurrent

    g = torch.Generator().manual_seed(0)
    H, dk, dv = 48, 128, 128
    q, k = (torch.nn.functional.normalize(torch.randn(1, H, 1, dk, generator=g), dim=-1) for _ in range(2))
    v, gate, beta = torch.randn(1, H, 1, dv, generator=g), -torch.rand(1, H, 1, generator=g), torch.rand(1, H, 1, generator=g)
    Hm, P, N, G = 64, 64, 128, 8
    x, dt, A, D = torch.randn(1, Hm, P, generator=g), torch.rand(1, Hm, generator=g), -torch.rand(Hm, generator=g), \
        torch.randn(Hm, generator=g)
    Bm, Cm = torch.randn(1, G, N, generator=g), torch.randn(1, G, N, generator=g)
    Bh, Ch = Bm.repeat_interleave(Hm // G, 1), Cm.repeat_interleave(Hm // G, 1)
    delta_state, mamba_state = torch.randn(1, H, dk, dv, generator=g), torch.randn(1, Hm, P, N, generator=g)
    cases = {
        "gated delta rule (Qwen3.5-27B layer)": (
            lambda: recurrent.gated_delta_step(delta_state, q[:, :, 0], k[:, :, 0], v[:, :, 0], gate[:, :, 0], beta[:, :, 0]),
            lambda: recurrent_gated_delta_rule(q, k, v, gate, beta, delta_state), delta_state),
        "Mamba-2 update (Nemotron 3 Nano layer)": (
            lambda: recurrent.mamba2_step(mamba_state, x, dt, A, Bm, Cm, D),
            lambda: selective_state_update(mamba_state, x, dt, A, Bh, Ch, D), mamba_state),
    }
    out = []
    for name, (native, torch_path, state) in cases.items():
        row = {"update": name, "state_bytes": state.numel() * 4}
        for label, fn in (("native", native), ("torch", torch_path)):
            fn()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            row[f"{label}_us"] = best * 1e6
            row[f"{label}_state_gb_s"] = 2 * state.numel() * 4 / best / 1e9
        out.append(row)
        print(f"[{name}] native {row['native_us']:.0f} µs, torch {row['torch_us']:.0f} µs", file=sys.stderr)
    return out


def cache_bytes(cfg, context: int) -> int:
    """Bytes ``ember.cache.StaticKVCache`` allocates for one sequence of ``context`` tokens (KV + state)."""
    from ember.cache import bytes_per_sequence, layer_specs

    return sum(bytes_per_sequence(s, torch.bfloat16, context) for s in layer_specs(cfg))


def run_rows(size: str, prompt_len: int, new: int, repeats: int, bw: dict) -> list[dict]:
    """Every row for both hybrid shapes; ``bw`` holds the measured copy bandwidth (bytes/s) under "copy"."""
    from ember.config import ModelConfig
    from ember.models import accel
    from ember.runtime import install

    rows = []
    with tempfile.TemporaryDirectory(prefix="ember-hybrid-") as tmp:
        for family in ("qwen3_5_text", "nemotron_h"):
            raw = hybrid_config(family, size)
            folder = Path(tmp) / family
            write_hybrid_checkpoint(folder, raw)
            cfg = ModelConfig.from_dict(raw)
            prompt = torch.randint(3, raw["vocab_size"], (prompt_len,),
                                   generator=torch.Generator().manual_seed(1)).tolist()
            rounds: dict[str, list[float]] = {"kernel": [], "torch": []}
            row = EmberRow(folder, "bf16", prompt, new)
            install()
            kernel_slots = (accel.gated_delta_step, accel.mamba2_step)
            for i in range(repeats):  # interleaved: the native state update, then the PyTorch recurrence
                if not more_rounds(i):
                    break
                for mode in ("kernel", "torch") if i % 2 == 0 else ("torch", "kernel"):
                    accel.gated_delta_step, accel.mamba2_step = kernel_slots if mode == "kernel" else (None, None)
                    rounds[mode].append(row.time_round())
            accel.gated_delta_step, accel.mamba2_step = kernel_slots
            e = row.result()
            kv, state = per_token_cache_bytes(cfg, prompt_len + new / 2)
            weights = e["weight_bytes_per_token"]
            per_token = weights + kv + state
            model = row.llm.model
            ctx = [time_at_context(model, c, 16, max(2, repeats)) for c in (128, 8192)]
            if family == "nemotron_h":  # every Mamba layer becomes an attention layer
                dense_raw = {**raw, "layers_block_type": ["full_attention" if t == "linear_attention" else t
                                                          for t in raw["layers_block_type"]]}
            else:
                dense_raw = {**raw, "layer_types": ["full_attention"] * cfg.num_hidden_layers}
            dense = ModelConfig.from_dict(dense_raw)
            best = max(max(rounds["kernel"]), max(rounds["torch"]))
            rows.append({
                "model": f"{family} ({size})", "params": cfg.num_parameters(), "weights": "bf16",
                "decode_tok_s": max(rounds["kernel"]), "decode_tok_s_torch_state_update": max(rounds["torch"]),
                "kernel_rounds_tok_s": rounds["kernel"], "torch_rounds_tok_s": rounds["torch"],
                "bytes_per_token": per_token, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
                "state_bytes_per_token": state, "roofline_tok_s": bw["copy"] / per_token,
                "roofline_frac": max(rounds["kernel"]) / (bw["copy"] / per_token),
                "best_roofline_frac": best / (bw["copy"] / per_token),
                "context": ctx, "ratio_8192_vs_128": ctx[1]["decode_tok_s"] / ctx[0]["decode_tok_s"],
                "recurrent_ratio_8192_vs_128": ctx[0]["recurrent_s_per_token"] / ctx[1]["recurrent_s_per_token"],
                "cache_bytes_32k": cache_bytes(cfg, 32768), "weight_bytes": e["tensor_bytes"],
                "dense_params": dense.num_parameters(), "dense_cache_bytes_32k": cache_bytes(dense, 32768),
                "dense_weight_bytes": 2 * dense.num_parameters(),
            })
            r = rows[-1]
            print(f"[{r['model']}] {r['decode_tok_s']:.2f} tok/s (torch state update {r['decode_tok_s_torch_state_update']:.2f}); "
                  f"ctx 8192/128 x{r['ratio_8192_vs_128']:.2f}", file=sys.stderr)
            row.close()
            del model
            release_memory()
    return rows


def print_rows(rows: list[dict], bw: dict) -> None:
    """The hybrid table and the context / memory lines."""
    print(f"\nHybrid decode, bf16 random weights, batch 1; roofline = copy bandwidth {bw['copy'] / 1e9:.1f} GB/s / "
          f"bytes per token (weights + attention KV + recurrent state read and written)")
    hdr = (f"| {'model':22} | {'params':>7} | {'decode tok/s':>12} | {'torch state update':>18} | {'MB/token':>8} | "
           f"{'% roofline':>10} | {'tok/s ctx 128':>13} | {'ctx 8192':>8} | {'8192/128':>8} | {'mixers 8192/128':>15} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        c0, c1 = r["context"]
        print(f"| {r['model']:22} | {r['params'] / 1e6:6.0f}M | {r['decode_tok_s']:12.2f} | "
              f"{r['decode_tok_s_torch_state_update']:18.2f} | {r['bytes_per_token'] / 1e6:8.1f} | "
              f"{100 * r['roofline_frac']:9.1f}% | {c0['decode_tok_s']:13.2f} | {c1['decode_tok_s']:8.2f} | "
              f"{r['ratio_8192_vs_128']:8.2f} | {r['recurrent_ratio_8192_vs_128']:15.2f} |")
    print()
    for r in rows:
        gib = 2 ** 30
        print(f"{r['model']}: at 32k context, weights {r['weight_bytes'] / gib:.2f} GiB + cache "
              f"{r['cache_bytes_32k'] / gib:.3f} GiB = {(r['weight_bytes'] + r['cache_bytes_32k']) / gib:.2f} GiB; "
              f"dense ({r['dense_params'] / 1e6:.0f}M params, every mixer full attention): "
              f"{r['dense_weight_bytes'] / gib:.2f} + {r['dense_cache_bytes_32k'] / gib:.3f} = "
              f"{(r['dense_weight_bytes'] + r['dense_cache_bytes_32k']) / gib:.2f} GiB "
              f"(cache x{r['dense_cache_bytes_32k'] / r['cache_bytes_32k']:.1f})")


def print_state_updates(rows: list[dict]) -> None:
    """The state-update table."""
    print(f"\n| state update, one layer, one token | state MB | native µs | torch µs | native / torch | native state GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['update']} | {r['state_bytes'] / 1e6:.1f} | {r['native_us']:.0f} | {r['torch_us']:.0f} | "
              f"{r['torch_us'] / r['native_us']:.1f}x faster | {r['native_state_gb_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(QWEN35), default="1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4, help="timing rounds (half with the native state update)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch / kernel threads (0: torch's default). On a machine shared with other busy processes "
                         "each parallel kernel call can wait a scheduler slice for its second thread; 1 avoids that")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: past this, every row stops after its first timing round (rows still all run)")
    ap.add_argument("--out", default="bench/results/hybrid.json")
    args = ap.parse_args()
    if args.time_limit:
        DEADLINE.append(time.monotonic() + args.time_limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bw = measure_bandwidth()
    updates = time_state_updates()
    rows = run_rows(args.size, args.prompt_len, args.new, args.repeats, bw)
    bw["copy"] = max(bw["copy"], measure_bandwidth(0.5, 3)["copy"])
    for r in rows:  # against the best bandwidth seen
        r["roofline_tok_s"] = bw["copy"] / r["bytes_per_token"]
        r["roofline_frac"] = r["decode_tok_s"] / r["roofline_tok_s"]
    from ember.hardware import cpu_name

    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{date.today()}; {machine}")
    print_rows(rows, bw)
    print_state_updates(updates)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "size": args.size, "rows": rows,
                               "state_updates": updates,
                               "bandwidth_bytes_s": bw, "seconds": time.perf_counter() - t0}, indent=2))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
