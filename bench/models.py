"""Bench model shapes and random checkpoints: the random Llama/Mixtral, family and gpt-oss checkpoints that
bench/decode.py (and gguf_decode.py, scale.py) time, written in the layouts their loaders read as published."""

from __future__ import annotations

import json
import sys
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
# Mixtral-shape MoE: 8 experts, top-2. "1.1b": ~1.2B parameters, ~0.35B active per token.
MOE_SIZES = {
    "1.1b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
}
# Gemma 4's 31B-style layers on Gemma 3's dims: full layers with their own head size and k = v, the final-logit
# cap; no per-layer input table (E2B's would add 262144 x layers x 256 embedding rows, one read per layer a token)
GEMMA4_EXTRA = dict(head_dim=256, global_head_dim=512, attention_k_eq_v=True, num_global_key_value_heads=1,
                    sliding_window=512, hidden_size_per_layer_input=0, final_logit_softcapping=30.0)
# The families' rows (--families): HF config kwargs. Gemma 3 1B's dims at "1.1b" (~1.0B, 0.30B of it the tied
# embedding); DeepSeek-V3's layout scaled down (~1.0B total, ~0.3B active at "1.1b").
FAMILY_SIZES = {
    "1.1b": {
        "gemma3-shape": ("Gemma3TextConfig", dict(
            vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256)),
        "gemma4-shape": ("Gemma4TextConfig", dict(GEMMA4_EXTRA,
            vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
            num_key_value_heads=1)),
        "deepseek-mla": ("DeepseekV3Config", dict(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, n_shared_experts=1,
            first_k_dense_replace=1, n_group=4, topk_group=2)),
    },
    "small": {
        "gemma3-shape": ("Gemma3TextConfig", dict(
            vocab_size=32000, hidden_size=640, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256)),
        "gemma4-shape": ("Gemma4TextConfig", dict(GEMMA4_EXTRA,
            vocab_size=32000, hidden_size=640, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=4,
            num_key_value_heads=1)),
        "deepseek-mla": ("DeepseekV3Config", dict(
            vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, n_shared_experts=1,
            first_k_dense_replace=1, n_group=4, topk_group=2)),
    },
}
# gpt-oss shape (gpt-oss-20b's ratios, scaled down): 32 experts, top-4, head_dim 64, window 128, MXFP4 experts.
# "1.1b": ~1.1B parameters (experts ~1.0B), ~0.16B active per token; "small": ~0.26B.
GPT_OSS_SIZES = {
    "1.1b": dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, num_local_experts=32, num_experts_per_tok=4),
    "small": dict(hidden_size=512, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000, num_local_experts=32, num_experts_per_tok=4),
}


def write_checkpoint(folder: Path, dims: dict, dtype: torch.dtype, seed: int = 0) -> None:
    """A random Llama (or, with ``num_local_experts`` in ``dims``, Mixtral) checkpoint in the normal HF
    layout and names, plus a word-level tokenizer covering the vocab."""
    from safetensors.torch import save_file

    moe = bool(dims.get("num_local_experts"))
    kind = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]} if moe else \
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    raw = {**kind, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": str(dtype).removeprefix("torch."), **dims}
    shapes = _tensor_shapes(raw)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if moe:  # Ember's names -> Mixtral's (ember.loading.moe maps them back)
            name = name.replace(".mlp.", ".block_sparse_moe.")
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                name = name.replace(f".{ours}.", f".{theirs}.")
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    write_word_tokenizer(folder, dims["vocab_size"])


def write_family_checkpoint(folder: Path, config_class: str, dims: dict, dtype: torch.dtype) -> None:
    """A random checkpoint of one of transformers' families (``config_class`` with ``dims``), saved by HF's own
    ``save_pretrained`` (norm weights as HF initialises them), plus the word-level tokenizer."""
    import transformers

    cfg = getattr(transformers, config_class)(**dims, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    del model
    write_word_tokenizer(folder, dims["vocab_size"])


def _tensor_shapes(raw: dict) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of Ember's model for a config.json dict (built on the meta device)."""
    from ember.config import ModelConfig
    from ember.models import Transformer

    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(ModelConfig.from_dict(raw)).state_dict().items()}


def write_gpt_oss_checkpoint(folder: Path, dims: dict, seed: int = 0) -> None:
    """A random gpt-oss checkpoint in the hub's layout: experts as MXFP4 ``*_blocks``/``*_scales`` (random codes,
    scales near 2^-4) under ``quantization_config.quant_method: mxfp4``, everything else bf16; tokenizer as
    :func:`write_checkpoint`'s."""
    from safetensors.torch import save_file

    from ember.loading.mxfp4 import hf_quantization_config

    raw = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": 128, "swiglu_limit": 7.0,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
           "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
           "quantization_config": hf_quantization_config(), **dims}
    shapes = _tensor_shapes(raw)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, n_in, n_out = shape  # HF's x @ W layout; stored transposed, per 32 inputs
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            tensors[name + "_scales"] = torch.randint(121, 124, (E, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    write_word_tokenizer(folder, dims["vocab_size"])


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``w3 .. w{V-1}`` (ids = numbers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
