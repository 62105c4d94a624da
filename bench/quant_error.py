"""What each 4-8 bit weight format costs in accuracy, per bit: the relative rms error of the weight and of the
product ``x @ W.T`` (one matrix, float64 against the float weight), for Ember's own formats beside the GGUF block
types Ember runs natively.

Two matrices: a layer weight (5632 x 2048, TinyLlama's MLP shape) and an LM head (8192 x 2048). Their entries are
Student-t (5 degrees of freedom: heavier tails than a Gaussian, as trained weights have) times a log-normal scale
per output row (rows of unlike magnitude); ``x`` holds Gaussian rows (what an RMSNorm hands the next matmul). A
random matrix, not a trained model: the table ranks the formats' rounding, it does not predict a perplexity.

    python bench/quant_error.py            # prints the table, writes bench/results/quant_error.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.models import Linear  # noqa: E402
from ember.quant import quantize_linear  # noqa: E402
from ember.quant.quantize import resolve_spec  # noqa: E402

LAYER_FORMATS = ["int4-g32", "int4-g128", "gguf-q4_0", "gguf-q4_1", "gguf-q4_k", "nf4"]
HEAD_FORMATS = ["int8", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "int4-g32", "gguf-q4_k"]


def matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT samples from the global generator
    t = torch.distributions.StudentT(5.0).sample((rows, cols))
    scale = torch.exp(0.5 * torch.randn(rows, 1, generator=g)) * 0.02
    return (t * scale).to(torch.bfloat16)


def dequantized(fmt: str, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The weight as format ``fmt`` holds it (float64) and its bits per weight (scales included)."""
    if fmt.startswith("gguf-"):
        import gguf

        from ember.loading.gguf.kquants import quantize_k
        from ember.quant.gguf_blocks import dequantize

        qtype = gguf.GGMLQuantizationType[fmt[5:].upper()]
        x = w.float().numpy()
        raw = quantize_k(x, qtype.name) if qtype.name in ("Q4_K", "Q5_K", "Q6_K") else gguf.quants.quantize(x, qtype)
        raw = torch.from_numpy(raw)
        return dequantize(raw, qtype, torch.float32).double().view_as(w), raw.numel() * 8 / w.numel()
    lin = Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    mode, _, group = fmt.partition("-g")
    q = quantize_linear(lin, resolve_spec(mode, int(group) if group else None), fmt)
    return q.dequantize_rows(0, w.shape[0]).double(), q.weight_bytes() * 8 / w.numel()


def errors(formats: list[str], w: torch.Tensor, x: torch.Tensor) -> list[dict]:
    wd = w.double()
    y = x @ wd.T
    rows = []
    for fmt in formats:
        wq, bits = dequantized(fmt, w)
        dw = wq - wd
        rows.append({"format": fmt, "bits_per_weight": round(bits, 3),
                     "weight_rel_rms": (dw.norm() / wd.norm()).item(),
                     "output_rel_rms": ((x @ dw.T).norm() / y.norm()).item()})
        print(f"  {fmt}: done", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(Path(__file__).with_name("results") / "quant_error.json"))
    args = ap.parse_args()
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {"layer (5632 x 2048)": errors(LAYER_FORMATS, matrix(5632, 2048, 0), x),
           "lm head (8192 x 2048)": errors(HEAD_FORMATS, matrix(8192, 2048, 1), x)}
    for name, rows in out.items():
        print(f"\n{name}\n| format | bits/weight | weight rel. rms error | output rel. rms error |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['format']} | {r['bits_per_weight']:.2f} | {r['weight_rel_rms']:.4f} | {r['output_rel_rms']:.4f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
