"""Write the hybrid-family GGUF fixtures of ``tests/test_gguf_hybrid.py`` into ``tests/data/gguf_hybrid/``.

For each family a tiny random HF checkpoint is saved with ``save_pretrained`` (plus a small byte-level BPE
vocabulary), converted with llama.cpp's own ``convert_hf_to_gguf.py`` (the copy vendored in llama-cpp-python's
source distribution), and HF's fp32 logits for a fixed prompt and its greedy continuation are stored beside
the f32 file (``<name>.npz``: ``ids`` (1, T + steps), the prompt and its greedy continuation; ``logits``
(1, P, V) at the ``positions`` P, a few of the prompt and every decode step). The tests then need neither the converter nor HF's reference run.

    python scripts/make_gguf_hybrid_fixtures.py --llama-cpp /path/to/llama.cpp [--out tests/data/gguf_hybrid]

``--llama-cpp`` is the folder holding ``convert_hf_to_gguf.py`` and ``gguf-py/``. The converter recognises a
BPE vocabulary by hashing how it tokenizes a probe text; a freshly trained vocabulary matches no known hash,
so the converter runs with its pre-tokenizer lookup answering ``qwen2`` (the split the vocabulary below uses).
The weights, which the fixtures are about, pass through the converter untouched by that.

``qwen35-mtp-f32`` is the Qwen3.5 checkpoint with a random multi-token-prediction head added under HF's ``mtp.*``
names, converted with its ``nextn`` block (no ``--no-mtp``); its ``.npz`` holds those head tensors.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPT_LEN, STEPS = 70, 4  # a prompt longer than one 64-token chunk of the delta rule
# Qwen2's split regex, the vocabulary's pre-tokenizer (llama.cpp "qwen2")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
CORPUS = ["Ember runs large language models on one machine, locally.", "The quick brown fox jumps over the lazy dog.",
          "Numbers 12345 and 67.89; hybrid layers keep a fixed state."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320  # embedding rows; the trained vocabulary is a little smaller (llama.cpp pads with [PAD] tokens)

QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=256, linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                 eos_token_id=0, bos_token_id=None, pad_token_id=None)
# Qwen3.5's multimodal RoPE sections must fit the rotated dims (4 here: 2 pairs) for llama.cpp to run the file;
# for text every section sees the same position, so HF's logits do not depend on them
QWEN35_ROPE = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                    "mrope_section": [1, 1, 0], "mrope_interleaved": True})
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
NEMOTRON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2,
                conv_kernel=4, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=32, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                eos_token_id=0, bos_token_id=None, pad_token_id=None, tie_word_embeddings=True)

# fixture name -> (family, converter --outtype)
FIXTURES = {
    "qwen3next-f32": ("qwen3_next", "f32"),
    "qwen35-f32": ("qwen3_5_text", "f32"),
    "qwen35moe-f32": ("qwen3_5_moe_text", "f32"),
    "qwen35moe-q8_0": ("qwen3_5_moe_text", "q8_0"),
    "nemotron_h-f32": ("nemotron_h", "f32"),
    "nemotron_h_moe-f32": ("nemotron_h_moe", "f32"),
}
MTP_FIXTURES = {"qwen35-mtp-f32": "qwen3_5_text"}  # converted with the checkpoint's MTP head


def hf_model(family: str):
    """A random HF model of ``family``, its norm weights spread around their identity value (a norm left at
    exactly 0 or 1 would hide a missing or doubled +1 offset)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "qwen3_next":
        cfg = tf.Qwen3NextConfig(**QWEN_TEXT, **QWEN_MOE, tie_word_embeddings=False)
    elif family == "qwen3_5_text":
        cfg = tf.Qwen3_5TextConfig(**QWEN_TEXT, **QWEN35_ROPE, tie_word_embeddings=True)
    elif family == "qwen3_5_moe_text":
        cfg = tf.Qwen3_5MoeTextConfig(**QWEN_TEXT, **QWEN_MOE, **QWEN35_ROPE, tie_word_embeddings=True)
    elif family == "nemotron_h":
        cfg = tf.NemotronHConfig(**NEMOTRON, layers_block_type=["linear_attention", "full_attention", "mlp",
                                                                "linear_attention"])
    elif family == "nemotron_h_moe":
        # as the published MoE models: no dense MLP layers (llama.cpp's nemotron_h_moe has none)
        cfg = tf.NemotronHConfig(**NEMOTRON, layers_block_type=["linear_attention", "moe", "full_attention",
                                                                "linear_attention"])
    else:
        raise KeyError(family)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                unit = family.startswith("nemotron") or "linear_attn.norm" in name
                p.copy_(0.2 * torch.randn_like(p) + (1.0 if unit else 0.0))
            elif name.endswith(".D") or name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE vocabulary with Qwen2's split, trained on a few sentences."""
    from transformers import PreTrainedTokenizerFast

    from make_gguf_fixtures import bpe_tokenizer  # the sibling script (scripts/ is sys.path[0] when run)

    tok = bpe_tokenizer(QWEN2_SPLIT, VOCAB - 16, SPECIALS, CORPUS)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


def dense_config(folder: Path) -> None:
    """Drop the MoE fields transformers writes into every nemotron_h config.json: published dense Nemotron-H
    files have none, and the converter picks ``nemotron_h_moe`` when ``num_experts_per_tok`` is present."""
    import json

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("num_experts_per_tok", "n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "n_shared_experts",
                "moe_latent_size"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2))


def add_mtp_head(folder: Path) -> dict[str, np.ndarray]:
    """Add a random MTP head (Qwen3.5's ``mtp.*`` layout, norms spread around their (1 + w) identity 0) to the
    checkpoint in ``folder``; returns its tensors."""
    import json

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ember.config import ModelConfig
    from ember.speculative.mtp import QWEN, MTPHead

    cfg = ModelConfig.from_file(folder)
    names = {v: k for k, v in QWEN.items()}
    torch.manual_seed(2)
    head = {(names.get(n) or "mtp.layers.0." + n[len("layer."):]): (0.2 if p.ndim == 1 else 0.3) * torch.randn_like(p)
            for n, p in MTPHead(cfg, moe=False).state_dict().items()}
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, **head}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {n: t.numpy() for n, t in head.items()}


def convert(llama_cpp: Path, folder: Path, outtype: str, out: Path, mtp: bool = False) -> None:
    """Run llama.cpp's converter in a child process, its vocabulary pre-tokenizer lookup answering "qwen2"."""
    code = (
        "import sys, runpy\n"
        f"sys.path[:0] = [{str(llama_cpp / 'gguf-py')!r}, {str(llama_cpp)!r}]\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(folder)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}"
        f"{'' if mtp else ', ' + repr('--no-mtp')}]\n"
        f"runpy.run_path({str(llama_cpp / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def reference(model) -> dict[str, np.ndarray]:
    """HF's greedy continuation of a fixed prompt and its logits at a few prompt positions (either side of the
    delta rule's 64-token chunk boundary, the last) and at every decode step (one full forward each)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 16, (1, PROMPT_LEN), generator=g)
    with torch.no_grad():
        for _ in range(STEPS):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        logits = model(input_ids=ids[:, :-1]).logits
    positions = torch.tensor([0, 31, 63, 64, *range(PROMPT_LEN - 1, PROMPT_LEN + STEPS - 1)])
    return {"ids": ids.numpy(), "positions": positions.numpy(), "logits": logits[:, positions].float().numpy()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="folder with convert_hf_to_gguf.py and gguf-py/")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" / "gguf_hybrid")
    ap.add_argument("--only", nargs="*", help="fixture names to (re)write (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    models: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, outtype) in FIXTURES.items():
            if args.only and name not in args.only:
                continue
            folder = Path(tmp) / family
            if family not in models:
                models[family] = hf_model(family)
                models[family].save_pretrained(folder)
                save_tokenizer(folder)
                if family == "nemotron_h":
                    dense_config(folder)
            convert(args.llama_cpp, folder, outtype, args.out / f"{name}.gguf")
            if outtype == "f32":  # a quantized file is checked against its family's f32 reference
                np.savez_compressed(args.out / f"{name}.npz", **reference(models[family]))
            print(f"wrote {args.out / name}.gguf")
        for name, family in MTP_FIXTURES.items():
            if args.only and name not in args.only:
                continue
            folder = Path(tmp) / f"{family}-mtp"
            hf_model(family).save_pretrained(folder)
            save_tokenizer(folder)
            head = add_mtp_head(folder)
            convert(args.llama_cpp, folder, "f32", args.out / f"{name}.gguf", mtp=True)
            np.savez_compressed(args.out / f"{name}.npz", **head)
            print(f"wrote {args.out / name}.gguf")


if __name__ == "__main__":
    main()
