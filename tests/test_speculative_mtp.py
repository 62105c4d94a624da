"""Speculation by the checkpoint's multi-token-prediction head (``--speculate mtp``).

HF transformers does not run MTP heads, so, as for a draft model, the oracle is plain decoding: greedy output
with the head proposing must equal plain greedy output token for token. Tiny random checkpoints get random MTP
tensors under each layout's names (Qwen3.5 / Qwen3-Next ``mtp.*``, DeepSeek-V3's trailing
``model.layers.{num_hidden_layers}.*``); one head is then trained on the target's own continuations, to show
that the head is fed the right hidden state and token at each position (its acceptance becomes high).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ember
from conftest import TINY, make_hf_model, save_word_tokenizer
from ember.config import ModelConfig
from ember.errors import CheckpointError, GenerationError
from ember.speculative.mtp import DEEPSEEK, QWEN, MTPHead
from test_speculative import _greedy

transformers = pytest.importorskip("transformers")

PROMPT = list(range(3, 23))
QWEN_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512, linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
DEEPSEEK_CFG = dict(num_experts_per_tok=2, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=2, n_group=4,
                    topk_group=2, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                    kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                    num_key_value_heads=4)


def _hf(family: str):
    torch.manual_seed(0)
    if family == "qwen3_5_text":
        return transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(**QWEN_TEXT))
    if family == "qwen3_next":
        return transformers.AutoModelForCausalLM.from_config(transformers.Qwen3NextConfig(**QWEN_TEXT, **MOE))
    if family == "deepseek_v3":
        return transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**{**TINY, **DEEPSEEK_CFG}))
    return make_hf_model(family)


def _head_names(family: str, cfg: ModelConfig) -> dict[str, str]:
    """MTPHead name -> the checkpoint's name, for the family's layout (the inverse of mtp.head_tensors)."""
    if family == "deepseek_v3":
        pre = f"model.layers.{cfg.num_hidden_layers}."
        fixed = {v: pre + k for k, v in DEEPSEEK.items()}
        return {**fixed, "layer.": pre}
    return {**{v: k for k, v in QWEN.items()}, "layer.": "mtp.layers.0."}


def _with_mtp(folder: Path, family: str, seed: int = 0) -> Path:
    """Save a tiny ``family`` checkpoint with a random MTP head in its layout; returns the folder."""
    hf = _hf(family)
    hf.save_pretrained(folder)
    save_word_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    if family == "deepseek_v3":
        config["num_nextn_predict_layers"] = 1
        (folder / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig.from_file(folder)
    moe = family in ("qwen3_next", "deepseek_v3")
    torch.manual_seed(seed)
    head = MTPHead(cfg, moe=moe)
    names = _head_names(family, cfg)
    tensors = load_file(folder / "model.safetensors")
    with torch.no_grad():
        for name, p in head.state_dict().items():
            p = torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 and family in (
                "deepseek_v3", "llama") else 0.0)
            key = names.get(name) or names["layer."] + name[len("layer."):]
            tensors[key] = p.contiguous()
    if family == "deepseek_v3":  # DeepSeek ships copies of the embedding and head beside the layer
        pre = f"model.layers.{cfg.num_hidden_layers}."
        tensors[pre + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[pre + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next", "deepseek_v3", "llama", "qwen3"])
def test_mtp_greedy_equals_plain(tmp_path, family):
    """Every layout and mixer kind (Gated DeltaNet with its snapshot replay, MLA and routed MoE, and the fully
    fused dense families whose hidden states come from the one-token and rows kernels), k = 1 and 3."""
    llm = ember.load(_with_mtp(tmp_path, family), device="cpu", dtype="fp32", check_memory=False)
    ref = _greedy(llm, PROMPT)
    for k in (1, 3):
        out = _greedy(llm, PROMPT, method="mtp", num_speculative=k, adaptive=False)
        assert out.token_ids == ref.token_ids, k
        s = out.stats.speculation
        assert s.proposed > 0 and s.passes < len(ref.token_ids) + 1
    assert llm.model.hidden_tap is None  # the generation took its tap away


def test_mtp_bf16_and_sampled(tmp_path):
    """bf16 greedy equals plain bf16; a sampled run with a seed is reproducible and stays in the vocabulary."""
    llm = ember.load(_with_mtp(tmp_path, "qwen3"), device="cpu", dtype="bf16", check_memory=False)
    assert _greedy(llm, PROMPT, method="mtp", num_speculative=3, adaptive=False).token_ids == \
        _greedy(llm, PROMPT).token_ids
    llm.speculate("mtp", num_speculative=2, adaptive=False)
    try:
        a = llm.generate(PROMPT, max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
        b = llm.generate(PROMPT, max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    finally:
        llm.speculate()
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20 and a.stats.speculation.proposed > 0


def test_mtp_refusals(tmp_path):
    # a head whose tensors do not fit the config: named
    bad = tmp_path / "bad"
    _with_mtp(bad, "qwen3")
    t = load_file(bad / "model.safetensors")
    t["mtp.fc.weight"] = t["mtp.fc.weight"][:, :10].contiguous()
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="mtp|fc.weight"):
        ember.load(bad, device="cpu", check_memory=False).speculate("mtp")
    plain = tmp_path / "plain"
    make_hf_model("qwen3").save_pretrained(plain)
    save_word_tokenizer(plain)
    with pytest.raises(GenerationError, match="no mtp"):
        ember.load(plain, device="cpu", check_memory=False).speculate("mtp")


def _train_head(llm, prompts: list[list[int]], steps: int = 300) -> float:
    """Fit the loaded head to the target's greedy continuations of ``prompts``: at position j it sees the target's
    normed hidden state h_j and the token t_{j+1}, and learns t_{j+2}, which is exactly what proposing needs.
    Returns the last loss."""
    model = llm.model
    seqs = [p + llm.generate(p, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids for p in prompts]
    ids = torch.tensor(seqs)
    with torch.no_grad():
        hidden = model(ids, hidden_only=True)  # (B, T, H) after the final norm
    head = MTPHead(model.config, moe=False)
    head.load_state_dict(MTPHead.from_model(model).state_dict())
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    emb = model.model.embed_tokens.weight.detach()
    pos = torch.arange(ids.shape[1] - 1)
    from ember.models.rope import rope_cos_sin
    cos, sin = rope_cos_sin(model.inv_freq, pos[None].expand(ids.shape[0], -1), torch.float32)
    for _ in range(steps):
        x = head.fc(torch.cat([head.enorm(emb[ids[:, 1:]]), head.hnorm(hidden[:, :-1])], -1))
        x = head.norm(head.layer(x, cos[:, None], sin[:, None], None, None, True))
        logits = x[:, :-1] @ model.lm_head.weight.detach().T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = _head_names("llama", model.config)  # back under the checkpoint's names, as the loader keeps them
    model.extra_weights = {names.get(k) or names["layer."] + k[len("layer."):]: v.detach().clone()
                           for k, v in head.state_dict().items()}
    return loss.item()


def test_trained_head_is_accepted(tmp_path):
    """A head fitted to the target's continuations of a few prompts proposes, on one of them, what the target then
    emits: the proposer feeds each position the hidden state and token the head was fitted on (a random
    target's continuations are too erratic to generalize to new prompts; a misaligned feed keeps nothing)."""
    llm = ember.load(_with_mtp(tmp_path, "llama"), device="cpu", dtype="fp32", check_memory=False)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 256, (6,)).tolist() for _ in range(8)]
    prompt = prompts[0]
    before = _greedy(llm, prompt, n=40, method="mtp", num_speculative=1, adaptive=False).stats.speculation
    assert _train_head(llm, prompts) < 1.5
    ref = _greedy(llm, prompt, n=40)
    out = _greedy(llm, prompt, n=40, method="mtp", num_speculative=2, adaptive=False)
    assert out.token_ids == ref.token_ids
    s = out.stats.speculation
    assert s.acceptance > 0.6 > before.acceptance + 0.2, (s.acceptance, before.acceptance)
