"""Shared fixtures: tiny random HF checkpoints written with ``save_pretrained``.

HF ``transformers`` is the oracle (docs/design.md, principle 2); it is imported here and in tests only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# family name -> (HF config class name, extra config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                    "rope_theta": 500000.0, "num_key_value_heads": 1}),
    "llama-bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": False}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                                     "head_dim": 32, "norm_topk_prob": False}),
    "qwen3-moe-mixed": ("Qwen3MoeConfig", {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                           "norm_topk_prob": True, "num_hidden_layers": 3, "mlp_only_layers": [1],
                                           "attention_bias": True}),
}


def make_hf_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A random HF model of ``family`` with non-trivial norm weights and biases."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Default init leaves norms at 1 and biases at 0, which would hide bugs in their use.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def save_word_tokenizer(folder: Path, vocab_size: int = TINY["vocab_size"], chat_template: str | None = None) -> None:
    """A word-level tokenizer over ``w3 .. w{V-1}`` (ids = numbers) saved as HF does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: ``hf_checkpoint(family, dtype=fp32, **overrides) -> (folder, hf_model)``; cached per args."""
    cache: dict = {}

    def make(family: str, dtype: torch.dtype = torch.float32, **overrides):
        key = (family, dtype, repr(sorted(overrides.items())))  # repr: list values (mlp_only_layers) too
        if key not in cache:
            model = make_hf_model(family, dtype, **overrides)
            folder = Path(tmp_path_factory.mktemp(f"ckpt-{family}"))
            model.save_pretrained(folder)
            save_word_tokenizer(folder)
            cache[key] = (folder, model)
        return cache[key]

    return make


DEMO_TEST_STEPS = 30  # enough to beat the untrained model clearly, cheap enough for every test run


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """``ember demo``'s model (a normal HF folder), trained for ``DEMO_TEST_STEPS`` steps; built once per session.

    Shared: tests that write next to it (an adapter, a copy to run from) copy it first.
    """
    from ember import demo

    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "trained", steps=DEMO_TEST_STEPS,
                                      progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; skip them (visibly) on CPU-only machines."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
