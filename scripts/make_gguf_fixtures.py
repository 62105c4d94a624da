"""Write tests/data/gguf_families/: tiny GGUF files made by llama.cpp's own converter, with HF's reference logits.

Usage (needs llama-cpp-python's source distribution for ``convert_hf_to_gguf.py``; CI only reads the output):

    PYTHONPATH=$PWD python scripts/make_gguf_fixtures.py /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

For each family a tiny random HF checkpoint is saved with ``save_pretrained`` (fp32, non-trivial norms and
biases) beside a small byte-level BPE vocabulary, converted with ``convert_hf_to_gguf.py --outtype f32`` and
``--outtype q8_0`` (gpt-oss also from its MXFP4 checkpoint, whose experts the converter writes as ggml
MXFP4), and HF's fp32 logits are stored for a fixed prompt plus HF's greedy continuation. The converter is
run unchanged except for one thing: it names a BPE vocabulary's pre-tokenizer by hashing how a *known* model
tokenizes a probe text, which a freshly trained vocabulary never matches, so here it is told the name
(``llama-bpe``, whose split regex the vocabulary was trained with).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gguf_families"
PROMPT = [5, 17, 42, 99, 7, 130, 64, 3, 250, 11, 88, 200]  # past gpt-oss's and Gemma's windows (6, 8)
NEW_TOKENS = 24
VOCAB = 272

# GGUF has no key for gpt-oss's SwiGLU clamp: llama.cpp fixes it at the released 7.0 (alpha 1.702), so the
# experts are drawn large enough (init below) for the clamp to bite at 7.
_GPT_OSS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0})
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Gemma 4's vocabulary is SentencePiece-style BPE with byte fallback (its own tokenizer model in GGUF): 4 specials,
# the 256 <0xXX> byte tokens, then merged pieces
GEMMA4_VOCAB = 400
_GEMMA4 = dict(_BASE, vocab_size=GEMMA4_VOCAB, bos_token_id=2, eos_token_id=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
               attention_k_eq_v=True, sliding_window=8, num_hidden_layers=6, final_logit_softcapping=30.0,
               hidden_size_per_layer_input=0,
               layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"])
# name -> (HF config class, kwargs, HF model class)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "gpt-oss": ("GptOssConfig", _GPT_OSS, "GptOssForCausalLM"),
    # llama.cpp's Gemma 3 layer pattern is fixed (every 6th layer global) and its query scale 1/sqrt(head_dim)
    # (but for the 62-layer 27B): 6 layers with the released default pattern and query_pre_attn_scalar = head_dim.
    "gemma3": ("Gemma3TextConfig", {**_BASE, "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                    "num_hidden_layers": 6,
                                    "rope_parameters": {
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 1000000.0}}},
               "Gemma3ForCausalLM"),
    "glm4moe": ("Glm4MoeConfig", {**_BASE, "num_experts_per_tok": 2, "n_routed_experts": 4, "moe_intermediate_size": 32,
                                  "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                                  "num_hidden_layers": 2, "routed_scaling_factor": 1.5, "head_dim": 16,
                                  "attention_bias": True, "partial_rotary_factor": 0.5, "use_qk_norm": True},
                "Glm4MoeForCausalLM"),
    "deepseek2": ("DeepseekV3Config", {**_BASE, "num_experts_per_tok": 2, "n_routed_experts": 4,
                                       "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 2,
                                       "topk_group": 1, "first_k_dense_replace": 1, "num_hidden_layers": 2,
                                       "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 32,
                                       "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                                       "num_key_value_heads": 4, "scoring_func": "sigmoid"},
                  "DeepseekV3ForCausalLM"),
    # DeepSeek-V3's released YaRN (factor 40, mscale = mscale_all_dim = 1) on a short original context
    "deepseek2-yarn": ("DeepseekV3Config", {**_BASE, "num_experts_per_tok": 2, "n_routed_experts": 4,
                                            "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 2,
                                            "topk_group": 1, "first_k_dense_replace": 1, "num_hidden_layers": 2,
                                            "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": None,
                                            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                                            "num_key_value_heads": 4, "scoring_func": "sigmoid",
                                            "max_position_embeddings": 640,
                                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 40.0, "original_max_position_embeddings": 16,
                                                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                                "mscale_all_dim": 1.0}},
                       "DeepseekV3ForCausalLM"),
    # rotary_dim: the released config's key, which the converter reads (HF derives it from the factor)
    "minimax-m2": ("MiniMaxM2Config", {**_BASE, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                       "num_hidden_layers": 2, "intermediate_size": 32, "rotary_dim": 8,
                                       "scoring_func": "sigmoid",
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                                           "partial_rotary_factor": 0.5}},
                   "MiniMaxM2ForCausalLM"),
    # Gemma 4 in the E2B/E4B shape (per-layer inputs, keys/values shared by the last layers, double-width MLPs
    # there; the last layer before the shared ones full and the one before it sliding, as llama.cpp assumes) with the 31B's k = v full layers of their own head shape, and the 26B-A4B's experts beside the MLP.
    "gemma4": ("Gemma4TextConfig", {**_GEMMA4, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": GEMMA4_VOCAB,
                                    "num_kv_shared_layers": 2, "use_double_wide_mlp": True},
               "Gemma4ForCausalLM"),
    "gemma4-moe": ("Gemma4TextConfig", {**_GEMMA4, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                        "moe_intermediate_size": 32, "num_hidden_layers": 3,
                                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
                   "Gemma4ForCausalLM"),
}
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Ember runs language models on one machine.",
          "Numbers 12345 and 67.89, dates 2024-05-17."] * 20


def bpe_tokenizer(split: str, vocab_size: int, specials: list[str], corpus: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` with the pre-split regex ``split``, trained on ``corpus`` to at most
    ``vocab_size`` entries (``specials`` first)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tokenizer_folder(folder: Path) -> None:
    """A byte-level BPE vocabulary of exactly VOCAB entries, split as Llama 3 splits (``llama-bpe``)."""
    from transformers import PreTrainedTokenizerFast

    from ember.loading.gguf.tokenizer import _LLAMA3_SPLIT

    # GLM's converter looks its special tokens up by name
    specials = ["<pad>", "<bos>", "<eos>", "<|endoftext|>", "[gMASK]", "<|user|>", "<|observation|>"]
    tok = bpe_tokenizer(_LLAMA3_SPLIT, VOCAB, specials, CORPUS)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(folder)


def gemma4_tokenizer_folder(folder: Path) -> None:
    """A Gemma 4 style vocabulary of GEMMA4_VOCAB entries: spaces escaped as U+2581, BPE over the whole text with
    byte fallback (``<0xXX>`` tokens), the decoder undoing both (the shape the converter's ``LlamaHfVocab`` reads)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    norm = normalizers.Replace(" ", "\u2581")
    learner = Tokenizer(models.BPE())
    learner.normalizer = norm
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=GEMMA4_VOCAB - len(specials) - len(byte_tokens), show_progress=False))
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + [t for t, _ in learned])}
    merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == GEMMA4_VOCAB, tok.get_vocab_size()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)


def hf_model(family: str, seed: int = 0):
    import transformers

    cls_name, kw, model_cls = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # default init leaves norms at 1 (Gemma: 0) and biases at 0, hiding bugs in their use
        for n, p in hf.named_parameters():
            if n.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if family == "gemma3" else 1.0))
            elif n.endswith("bias") or n.endswith("sinks"):
                p.copy_(0.3 * torch.randn_like(p))
            elif ".experts." in n and family == "gpt-oss":
                p.copy_(torch.randn_like(p))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):  # the router's correction changes the choice
                b.copy_(0.2 * torch.randn_like(b))
            elif n.endswith("layer_scalar"):
                b.copy_(torch.rand_like(b) + 0.5)
    return hf


def reference(hf) -> dict[str, np.ndarray]:
    """HF's fp32 logits over PROMPT and its greedy continuation."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
        out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                          eos_token_id=None, pad_token_id=0)
    return {"logits": logits.numpy(), "greedy": out[0, len(PROMPT):].numpy()}


def convert(llama_cpp_dir: Path, folder: Path, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py in a child process, naming the vocabulary's pre-tokenizer."""
    code = (
        "import sys; sys.argv = sys.argv[1:]; import runpy\n"
        "from conversion import base\n"
        "for cls in vars(base).values():\n"
        "    if isinstance(cls, type) and 'get_vocab_base_pre' in vars(cls):\n"
        "        cls.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env_path = f"{llama_cpp_dir}:{llama_cpp_dir / 'gguf-py'}"
    subprocess.run([sys.executable, "-c", code, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(folder),
                    "--outtype", outtype, "--outfile", str(outfile)], check=True,
                   env={**os.environ, "PYTHONPATH": env_path})


def make(family: str, llama_cpp_dir: Path, tmp: Path) -> None:
    folder = tmp / family
    hf = hf_model(family)
    hf.save_pretrained(folder)
    (gemma4_tokenizer_folder if family.startswith("gemma4") else tokenizer_folder)(folder)
    refs = {f"{k}": v for k, v in reference(hf).items()}
    for outtype in ("f32",) if family.endswith("-yarn") else ("f32", "q8_0"):
        convert(llama_cpp_dir, folder, OUT / f"{family}-{outtype}.gguf", outtype)
    if family == "gpt-oss":  # the hub's layout: MXFP4 experts, which the converter keeps as ggml MXFP4
        from ember.loading.quantized import quantize_checkpoint
        from ember.quant.mxfp4 import dequantize_mxfp4
        from safetensors.torch import load_file

        q = tmp / "gpt-oss-mxfp4"
        quantize_checkpoint(folder, q, "mxfp4", lm_head=None)
        convert(llama_cpp_dir, q, OUT / f"{family}-mxfp4.gguf", "f32")
        stored = {}
        for f in q.glob("*.safetensors"):
            stored.update(load_file(f))
        with torch.no_grad():  # HF on the checkpoint's dequantized experts: the oracle for the MXFP4 file
            for i, layer in enumerate(hf.model.layers):
                for kind in ("gate_up_proj", "down_proj"):
                    p = f"model.layers.{i}.mlp.experts.{kind}"
                    w = dequantize_mxfp4(stored[f"{p}_blocks"], stored[f"{p}_scales"]).transpose(1, 2)
                    getattr(layer.mlp.experts, kind).copy_(w)
        refs.update({f"mxfp4_{k}": v for k, v in reference(hf).items()})
    np.savez_compressed(OUT / f"{family}-reference.npz", prompt=np.array(PROMPT),
                        config=np.array(json.dumps(hf.config.to_dict())), **refs)


def main() -> None:
    llama_cpp_dir = Path(sys.argv[1])
    families = sys.argv[2:] or list(FAMILIES)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for family in families:
            make(family, llama_cpp_dir, Path(d))
            print(f"{family}: done", json.dumps(sorted(p.name for p in OUT.glob(f"{family}-*"))))


if __name__ == "__main__":
    main()
