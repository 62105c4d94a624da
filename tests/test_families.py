"""Parity with HF transformers for the families beyond Llama's shape: Gemma 2/3, GLM-4.5 MoE, DeepSeek-V3,
MiniMax-M2.

Each family is a tiny random checkpoint written by ``save_pretrained``; HF is the oracle. Checked: fp32 logits of a
left-padded batch of different lengths at prefill and at each decode step (past the sliding window where the family
has one), and greedy 32-token generations through ``ember.load``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ember
from conftest import TINY, save_word_tokenizer
from ember.cache import StaticKVCache, ring_layers
from ember.loading import load_model

FP32_TOL = 1e-4

_GEMMA = dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, num_hidden_layers=3,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})
_GLM = dict(num_experts_per_tok=3, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2,
            topk_group=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=1.5, head_dim=32,
            attention_bias=True, partial_rotary_factor=0.5)
_DEEPSEEK = dict(num_experts_per_tok=2, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=2, n_group=4,
                 topk_group=2, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                 kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                 num_key_value_heads=4)

# name -> (HF config class, kwargs over TINY, HF model class or None for AutoModelForCausalLM)
CASES: dict[str, tuple[str, dict, str | None]] = {
    "gemma3_text": ("Gemma3TextConfig", _GEMMA, None),
    "gemma3_text-softcap": ("Gemma3TextConfig", {**_GEMMA, "final_logit_softcapping": 3.0,
                                                 "tie_word_embeddings": False},
                            None),
    "gemma3": ("Gemma3Config", _GEMMA, "Gemma3ForConditionalGeneration"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
                                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "num_hidden_layers": 3},
               None),
    "glm4_moe": ("Glm4MoeConfig", _GLM, None),
    "glm4_moe-qknorm": ("Glm4MoeConfig", {**_GLM, "use_qk_norm": True, "n_group": 1, "norm_topk_prob": False,
                                          "attention_bias": False}, None),
    "deepseek_v3": ("DeepseekV3Config", _DEEPSEEK, None),
    # token ids inside the tiny vocabulary (HF's defaults are MiniMax's real ids, past it: Ember refuses those)
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=8, num_experts_per_tok=3, head_dim=32,
                                           bos_token_id=1, eos_token_id=2,
                                           rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                            "partial_rotary_factor": 0.5}), None),
    "deepseek_v3-noqlora": ("DeepseekV3Config", {**_DEEPSEEK, "q_lora_rank": None, "rope_interleave": False}, None),
    # 6 heads (the decode kernel's blocks of 4 heads: one short) and a latent width of 40 (not a multiple of 16)
    "deepseek_v3-6heads": ("DeepseekV3Config", {**_DEEPSEEK, "num_attention_heads": 6, "num_key_value_heads": 6,
                                                "kv_lora_rank": 40}, None),
    # DeepSeek-V3's released YaRN (factor 40, mscale_all_dim 1: the softmax scale changes too), on a short context
    "deepseek_v3-yarn": ("DeepseekV3Config", {**_DEEPSEEK, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, "max_position_embeddings": 640}, None),
}


def _hf_config(name: str):
    import transformers

    cls_name, extra, _ = CASES[name]
    kw = {**TINY, **extra}
    if cls_name == "Gemma3Config":  # multimodal: the text model under text_config, a tiny vision tower
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return transformers.Gemma3Config(text_config=kw, vision_config=vision, mm_tokens_per_image=4)
    return getattr(transformers, cls_name)(**kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(name: str):
        if name not in made:
            import transformers

            cfg = _hf_config(name)
            model_cls = CASES[name][2]
            torch.manual_seed(0)
            if model_cls:
                hf = getattr(transformers, model_cls)(cfg)
            else:
                hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            with torch.no_grad():  # default init hides norm and bias bugs: make them non-trivial
                for n, p in hf.named_parameters():
                    if n.endswith("norm.weight"):
                        p.copy_(0.3 * torch.randn_like(p) + (0.0 if "gemma" in name else 1.0))
                    elif n.endswith("bias"):
                        p.copy_(0.1 * torch.randn_like(p))
                for n, b in hf.named_buffers():
                    if n.endswith("e_score_correction_bias"):  # the router's correction changes the choice
                        b.copy_(0.2 * torch.randn_like(b))
            hf = hf.float().eval()
            folder = Path(tmp_path_factory.mktemp(f"ckpt-{name}"))
            hf.save_pretrained(folder)
            save_word_tokenizer(folder)
            made[name] = (folder, hf)
        return made[name]

    return make


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    worst = (ours.float() - ref.float()).abs().max().item()
    assert worst < FP32_TOL, f"{what}: max |diff| {worst:.3g} exceeds {FP32_TOL:g}"


def _hf_logits(hf, ids, mask, pos):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def check_padded_logits(folder: Path, hf, name: str) -> None:
    """Rows of 20, 15 and 9 prompt tokens (left-padded), then 8 decode steps: past the window of 8 slots."""
    ours = load_model(folder, dtype="fp32")
    torch.manual_seed(1)
    B, P, steps = 3, 20, 8
    ids = torch.randint(3, TINY["vocab_size"], (B, P + steps))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = _hf_logits(hf, ids, mask, pos)
    assert ref.std() > 0.01  # not a degenerate model
    valid = mask.bool()
    with torch.no_grad():
        cache = StaticKVCache(ours.config, B, P + steps, torch.float32, "cpu")
        # Gemma's sliding layers keep only their window of 8 (a ring), the others every slot
        assert set(cache.rings) == set(ring_layers(ours.config)) and bool(cache.rings) == ours.config.model_type.startswith("gemma")
        got = ours(ids[:, :P], pos[:, :P], cache, 0, k_valid=valid)
        cache.advance(P)
        assert_close(got[valid[:, :P]], ref[:, :P][valid[:, :P]], f"{name} prefill")
        for t in range(P, P + steps):
            step = ours(ids[:, t:t + 1], pos[:, t:t + 1], cache, cache.pos, k_valid=valid)
            cache.advance(1)
            assert_close(step, ref[:, t:t + 1], f"{name} decode step {t - P}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_padded_prefill_and_decode_logits_match_hf(checkpoint, name):
    folder, hf = checkpoint(name)
    check_padded_logits(folder, hf, name)


def check_greedy(folder: Path, hf, name: str) -> None:
    """Greedy 32 tokens through ember.load equal HF's generate."""
    hf.generation_config.eos_token_id = None
    llm = ember.load(folder, device="cpu", dtype="fp32")
    prompt = torch.randint(3, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(prompt):].tolist()
    got = llm.generate(prompt, max_new_tokens=32, temperature=0.0, ignore_eos=True).token_ids
    assert got == ref, f"{name}: first difference at {next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_32_tokens_identical_to_hf_generate(checkpoint, name):
    folder, hf = checkpoint(name)
    check_greedy(folder, hf, name)


def check_continuous_batching(folder: Path, name: str) -> None:
    """The paged cache (latent pools for MLA) under ragged, chunked batches gives each sequence's own tokens."""
    from ember.scheduler import BatchScheduler, SeqRequest
    from ember.sampling import SamplingParams

    llm = ember.load(folder, dtype="fp32")
    sched = BatchScheduler(llm, max_batch=3, num_blocks=32, block_size=8, prefill_chunk=16)
    wpool = sched.cache.window_pool  # Gemma's sliding layers: blocks given back as they leave the window
    assert (wpool is not None) == llm.config.model_type.startswith("gemma")
    for t in sched.cache.k + sched.cache.v:  # uninitialised pool memory must never be read
        t[8:] = float("nan")
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in (5, 19, 11, 2)]
    events: dict[int, list[int]] = {}
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    ids = sched.submit([SeqRequest(p, params, on_event=lambda ev: events.setdefault(ev.seq_id, []).append(ev.token_id))
                        for p in ps])
    sched.run_until_idle()
    for p, i in zip(ps, ids):
        want = llm.generate(p, max_new_tokens=12, temperature=0.0, ignore_eos=True).token_ids
        assert events[i] == want, f"{name}: prompt of {len(p)} tokens"
    assert wpool is None or wpool.num_free == wpool.capacity


@pytest.mark.parametrize("name", ["gemma3_text", "glm4_moe", "deepseek_v3"])
def test_continuous_batching_equals_generate_alone(checkpoint, name):
    folder, _ = checkpoint(name)
    check_continuous_batching(folder, name)


def _ember_config(name: str):
    from ember.config import ModelConfig

    hf_cfg = _hf_config(name)
    return ModelConfig.from_dict({**hf_cfg.to_dict(), "model_type": hf_cfg.model_type})


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_count_and_planner_bytes_equal_the_model(name):
    """num_parameters and the planner's weight bytes count exactly the tensors the model holds (MLA projections,
    shared experts, sandwich and latent norms included)."""
    from ember import planner
    from ember.models import Transformer

    cfg = _ember_config(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert cfg.num_parameters() == real
    assert planner.weight_bytes(cfg, "bf16").total == 2 * real


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "gemma3_text"])
def test_kv_cache_bytes_equal_the_static_cache(name):
    """The planner's KV bytes equal what the cache allocates; MLA's are one latent per token per layer."""
    from ember import planner
    from ember.cache import bytes_per_token, layer_specs

    cfg = _ember_config(name)
    cache = StaticKVCache(cfg, 2, 40, torch.bfloat16, "cpu")
    assert planner.kv_cache_bytes(cfg, 40, 2, "bf16") == cache.nbytes()
    if cfg.kv_lora_rank:
        assert {s.kind for s in layer_specs(cfg)} == {"latent"}
        per_token = bytes_per_token(layer_specs(cfg)[0], torch.bfloat16)
        assert per_token == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        # what expanded keys/values of every head would take instead
        assert per_token < 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)


def test_catalog_sizes_of_the_new_families():
    """Published totals (checked within 1% for every catalog entry by test_planner) and the facts the plan uses."""
    from ember.catalog import get

    assert get("gemma-3-27b").config.layer_types.count("full_attention") == 62 // 6
    ds = get("deepseek-v3").config
    assert ds.kv_lora_rank == 512 and not ds.is_moe_layer(2) and ds.is_moe_layer(3)
    assert get("glm-4.5-air").config.rotary_dim == 64


def test_tune_refuses_a_family_it_cannot_train_yet(checkpoint, tmp_path):
    """A family whose training path is not verified (the multimodal wrapper: PEFT would look for its adapter under
    the wrapper's names) is refused up front with the family named, not run with silently wrong gradients."""
    from ember.errors import TrainingError
    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder, _ = checkpoint("gemma3")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w3 w4 w5"}\n')
    with pytest.raises(TrainingError, match="gemma3"):
        tune(folder, data, tmp_path / "out", TrainConfig(steps=1), device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["glm4_moe", "gemma3_text-softcap"])
def test_tune_runs_end_to_end_on_the_new_families(checkpoint, tmp_path, name):
    """`ember tune` trains a few steps (loss falls on a repeated text) and writes an adapter."""
    from ember.train.trainer import TrainConfig
    from ember.train.tune import tune

    folder, _ = checkpoint(name)
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"text": "w3 w4 w5 w6 w7 w8 w9 w10"}\n' for _ in range(8)))
    result = tune(folder, data, tmp_path / "out", TrainConfig(steps=6, lr=1e-2, batch=2, seq_len=16, dtype="fp32"),
                  device="cpu", progress=False)
    assert result.metrics[-1].loss < result.metrics[0].loss
    assert (tmp_path / "out" / "adapter_config.json").exists() or any((tmp_path / "out").rglob("adapter_config.json"))


@pytest.mark.parametrize("name", ["glm4_moe", "deepseek_v3"])
def test_router_weights_kept_in_fp32_as_hf(checkpoint, name):
    """A bf16 load keeps the sigmoid router's weight and correction bias in fp32 (HF's
    _keep_in_fp32_modules_strict), so the experts chosen for bf16 hidden states are HF's."""
    import transformers

    folder, _ = checkpoint(name)
    ours = load_model(folder, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    layer = next(i for i in range(ours.config.num_hidden_layers) if ours.config.is_moe_layer(i))
    gate, hf_gate = ours.model.layers[layer].mlp.gate, hf.model.layers[layer].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, hf_gate.weight) and torch.equal(gate.e_score_correction_bias,
                                                                    hf_gate.e_score_correction_bias)
    assert ours.model.layers[layer].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    x = torch.randn(64, TINY["hidden_size"], generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        weights, ids = gate(x)
        _, ref_weights, ref = hf_gate(x)
    order, ref_order = ids.argsort(-1), ref.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref.gather(1, ref_order))
    assert torch.allclose(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-6)


@pytest.mark.parametrize("name", ["gemma3_text-softcap", "gemma2"])
def test_eval_perplexity_applies_final_soft_capping_as_hf_loss(checkpoint, name):
    """`ember eval` scores the capped logits: its mean NLL over one window equals HF's loss, and differs from the
    uncapped one (so the cap is what makes them equal)."""
    from ember.evaluate import perplexity

    folder, hf = checkpoint(name)
    ours = load_model(folder, dtype="fp32")
    ids = torch.randint(3, TINY["vocab_size"], (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = hf(input_ids=ids[None], labels=ids[None]).loss.item()
    got = perplexity(ours, ids.tolist(), window=40, stride=40)
    assert got["tokens"] == 39 and abs(got["mean_nll"] - loss) < 1e-5
    ours.config.final_logit_softcapping = None
    assert abs(perplexity(ours, ids.tolist(), window=40, stride=40)["mean_nll"] - loss) > 5e-5


@pytest.mark.parametrize("name", ["gemma3_text", "glm4_moe", "deepseek_v3", "minimax_m2"])
def test_quant_on_load_and_ember_quantize_round_trip(checkpoint, tmp_path, name):
    """int8 on load stays close to fp32 (routers left in float); the folder `ember quantize` writes loads back as
    stored and gives the same logits as quantizing on load."""
    from ember.loading.quantized import quantize_checkpoint
    from ember.quant import QuantizedLinear

    folder, _ = checkpoint(name)
    ids = torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(folder, dtype="fp32")(ids)
        on_load = load_model(folder, dtype="fp32", quant="int8")
        got = on_load(ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    routers = [m for n, m in on_load.named_modules() if n.endswith("mlp.gate")]
    assert all(not isinstance(m, QuantizedLinear) for m in routers)
    assert any(isinstance(m, QuantizedLinear) for m in on_load.modules())
    out, _ = quantize_checkpoint(folder, tmp_path / "q", "int8")
    with torch.no_grad():
        assert torch.equal(load_model(out, dtype="fp32")(ids), got)


# Chat templates in each family's documented format. The published templates (tokenizer_config.json /
# chat_template.jinja of the Hub repos) are not available offline here: these are reconstructions of their
# layouts (turn markers, reasoning blocks, tool-call syntax), kept small; rendering is checked against
# transformers' apply_chat_template and parsing against outputs in the same syntax.
TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
        "<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "glm45": (
        "[gMASK]<sop>{% if tools %}<|system|>\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
        "</tools>\nFor each function call, output:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
        "<arg_value>{arg-value-1}</arg_value>\n...\n</tool_call>{% endif %}"
        "{% for m in messages %}{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
        "{{ '/nothink' if enable_thinking is defined and not enable_thinking else '' }}"
        "{% elif m.role == 'assistant' %}<|assistant|>\n<think>{{ m.reasoning_content | default('') }}</think>"
        "{% if m.content %}\n{{ m.content.strip() }}{% endif %}"
        "{% for tc in m.tool_calls | default([]) %}\n<tool_call>{{ tc.function.name }}"
        "{% for k, v in tc.function.arguments.items() %}\n<arg_key>{{ k }}</arg_key>\n"
        "<arg_value>{{ v | tojson if v is not string else v }}</arg_value>{% endfor %}\n</tool_call>{% endfor %}"
        "{% elif m.role == 'tool' %}<|observation|>\n<tool_response>\n{{ m.content }}\n</tool_response>"
        "{% elif m.role == 'system' %}<|system|>\n{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>"
        "{{ '\n<think></think>' if enable_thinking is defined and not enable_thinking else '' }}{% endif %}"),
    "minimax_m2": (
        "]~!b[]~b]system\n{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful "
        "assistant.' }}{% if tools %}\n\n# Tools\n<tools>\n{% for t in tools %}<tool>{{ t.function | tojson }}</tool>\n"
        "{% endfor %}</tools>\n\n<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n<parameter name=\"param-key-1\">"
        "param-value-1</parameter>\n</invoke>\n</minimax:tool_call>{% endif %}[e~[\n"
        "{% for m in messages %}{% if m.role == 'user' %}]~b]user\n{{ m.content }}[e~[\n"
        "{% elif m.role == 'assistant' %}]~b]ai\n{{ m.content }}{% if m.tool_calls %}\n<minimax:tool_call>\n"
        "{% for tc in m.tool_calls %}<invoke name=\"{{ tc.function.name }}\">\n"
        "{% for k, v in tc.function.arguments.items() %}<parameter name=\"{{ k }}\">"
        "{{ v | tojson if v is not string else v }}</parameter>\n{% endfor %}</invoke>\n{% endfor %}"
        "</minimax:tool_call>{% endif %}[e~[\n{% elif m.role == 'tool' %}]~b]tool\n<response>{{ m.content }}"
        "</response>[e~[\n{% endif %}{% endfor %}{% if add_generation_prompt %}]~b]ai\n<think>\n{% endif %}"),
    "deepseek_r1": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}"
        "{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% elif m.role == 'assistant' %}<｜Assistant｜>"
        "{{ m.content.split('</think>')[-1] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"),
}
_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w5 w6"},
         {"role": "assistant", "content": "w7", "reasoning_content": "w8",
          "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                             "arguments": {"city": "Paris", "days": 3}}}]},
         {"role": "tool", "content": "sunny"}, {"role": "user", "content": "w9"}]
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_family_chat_templates_render_as_transformers(tmp_path, family):
    from transformers import AutoTokenizer

    from ember.tokenizer import Tokenizer

    save_word_tokenizer(tmp_path, chat_template=TEMPLATES[family])
    chat = [m for m in _CHAT if family != "gemma" or m["role"] in ("user", "assistant")][:2] if family == "gemma" \
        else _CHAT
    kw = {} if family == "gemma" else {"tools": _TOOLS}
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(chat, add_generation_prompt=True, **kw)
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(chat, add_generation_prompt=True,
                                                                       tokenize=False, **kw)
    assert ours == ref


@pytest.mark.parametrize("family,fmt,reasoning_in_prompt,text,want", [
    ("glm45", "glm45", False,
     "<think>w8 plan</think>\nHello<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
     ("w8 plan", "Hello", [("get_weather", {"city": "Paris", "days": 3})])),
    ("minimax_m2", "minimax_m2", True,
     "w8 plan\n</think>\n\nHello\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Paris"
     "</parameter>\n<parameter name=\"days\">3</parameter>\n</invoke>\n<invoke name=\"get_time\">\n</invoke>\n"
     "</minimax:tool_call>",
     ("w8 plan\n", "Hello\n", [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})])),
    ("deepseek_r1", "hermes", True, "w8 plan\n</think>\n\nThe answer.", ("w8 plan\n", "The answer.", [])),
])
def test_family_outputs_split_into_reasoning_content_and_calls(tmp_path, family, fmt, reasoning_in_prompt, text,
                                                               want):
    """The template picks the format and says it reasons; streamed character by character or whole, the output
    splits the same way into reasoning_content, content and tool calls."""
    import json

    from ember.chat_formats import (OutputParser, ParsedOutput, detect_format, is_reasoning_template,
                                    prompt_in_reasoning)
    from ember.tokenizer import Tokenizer

    template = TEMPLATES[family]
    assert detect_format(template).name == fmt and is_reasoning_template(template)
    save_word_tokenizer(tmp_path, chat_template=template)
    prompt = Tokenizer.from_dir(tmp_path).apply_chat_template(_CHAT[:2], add_generation_prompt=True)
    assert prompt_in_reasoning(prompt) == reasoning_in_prompt
    for pieces in ([text], list(text)):
        parser, out = OutputParser(detect_format(template), True, reasoning_in_prompt), ParsedOutput()
        for p in pieces:
            out.add(parser.feed(p))
        out.add(parser.finish())
        assert (out.reasoning, out.content) == want[:2]
        assert [(c.name, json.loads(c.arguments)) for c in out.calls] == want[2]


def test_glm_and_minimax_bodies_that_are_not_calls_stay_content():
    from ember.chat_formats import FORMATS

    assert FORMATS["glm45"].parse_body("get weather now\n<arg_key>a</arg_key>") is None
    assert FORMATS["glm45"].parse_body("f\n<arg_key>a</arg_key>\n<arg_value>x</arg_value>\nstray") is None
    assert FORMATS["minimax_m2"].parse_body("no invoke here") is None
    assert FORMATS["glm45"].parse_body("f\n<arg_key>q</arg_key>\n<arg_value>w1 w2</arg_value>") == [("f", '{"q": "w1 w2"}')]


def check_lora_against_peft(folder: Path, hf, targets, tmp_path: Path) -> None:
    """Ember's training loss and every LoRA gradient equal HF + PEFT's for the same adapter weights (fp32, random
    A and B), and the adapter Ember saves loads in PEFT with the same logits."""
    import copy

    import peft

    from ember.train.data import IGNORE
    from ember.train.forward import batch_loss_sum
    from ember.train.adapter_files import save_adapter
    from ember.train.lora import LoRAConfig, inject_lora, lora_modules

    ours = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=targets)
    inject_lora(ours, cfg, seed=0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=targets))
    mods = lora_modules(ours)
    assert len(mods) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules()) > 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    ids = torch.randint(3, TINY["vocab_size"], (2, 24), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    positions = torch.arange(24).expand(2, 24)
    for ckpt in (False, True):
        for m in mods.values():
            m.lora_A.grad = m.lora_B.grad = None
        total, n = batch_loss_sum(ours, ids, labels, positions, grad_checkpoint=ckpt)
        (total / n).backward()
        pm.zero_grad()
        logits = pm(input_ids=ids).logits.float()
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        ref.backward()
        assert abs((total / n).item() - ref.item()) < 1e-5 * ref.item()
        for name, m in mods.items():
            layer = pm.base_model.model.get_submodule(name)
            for ours_g, ref_g in ((m.lora_A.grad, layer.lora_A["default"].weight.grad),
                                  (m.lora_B.grad, layer.lora_B["default"].weight.grad)):
                assert (ours_g - ref_g).abs().max() <= 5e-4 * ref_g.abs().max() + 1e-7, f"{name} gradient"
    save_adapter(ours, tmp_path / "ad", cfg, str(folder))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()
    with torch.no_grad():
        assert_close(ours(ids), loaded(ids).logits, "adapter in PEFT")


_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("name,targets", [
    ("gemma3_text-softcap", "all-linear"), ("gemma2", "all-linear"), ("glm4_moe", _ATTN), ("minimax_m2", _ATTN),
    ("deepseek_v3", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
])
def test_training_forward_loss_and_lora_grads_match_hf_peft(checkpoint, tmp_path, name, targets):
    folder, hf = checkpoint(name)
    check_lora_against_peft(folder, hf, targets, tmp_path)
