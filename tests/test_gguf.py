"""GGUF files written here with ``gguf.GGUFWriter`` from tiny HF checkpoints, as llama.cpp's converter does.

The conversion below (HF -> llama.cpp names, the llama q/k RoPE row permutation, rope_freqs for Llama 3
scaling, tied embeddings left out) restates the facts of ``convert_hf_to_gguf.py``; quantization uses
``gguf.quants`` (the reference numpy implementation shipped with the format). Oracles:

- logits: HF on the original weights (F32: < 1e-4; other types within the bounds in ``QUANT_TOL``),
  and HF on the weights round-tripped through the same quantization with the reference numpy
  decoder (< 1e-4 for every type: this isolates our loading from the quantization error itself);
- dequantization: ``gguf.quants.dequantize``, bit-exact in fp32;
- tokenizers: the HF ``tokenizers`` pipeline the vocabulary was taken from, and transformers' own
  GGUF tokenizer loader.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import gguf  # a runtime dependency of Ember: a missing install must fail here, not skip
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import ember
from ember.errors import EmberError, GGUFError, TokenizerError, UnsupportedGGUFTypeError
from ember.loading import gguf as egguf
from ember.loading.gguf import config as gguf_config
from ember.quant import gguf_blocks
from ember.loading.gguf import tokenizer as gguf_tokenizer
from ember.loading.gguf import GGUFFile, config_from_gguf, dequantize, load_gguf_model, load_gguf_tokenizer

FP32_TOL = 1e-4
# Max |logit diff| vs HF on the *original* fp32 weights, for the tiny random models here (|logits| <= ~1.3).
# Measured worst over llama/qwen2/qwen3/llama-bias/llama3-rope: F16 3.3e-4, BF16 2.6e-3, Q8_0 9.5e-3,
# Q4_0 0.13 (4-bit blocks of 32 on random weights); the bounds leave 2-4x headroom.
QUANT_TOL = {"F32": FP32_TOL, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2, "Q4_0": 0.3}

HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
ARCH = {"llama": "llama", "llama-tied": "llama", "llama-bias": "llama", "llama3-rope": "llama",
        "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama", "qwen3-moe": "qwen3moe", "qwen3-moe-mixed": "qwen3moe"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ==================================================================== HF -> GGUF, as llama.cpp converts


def gguf_tensors(hf_name: str, t: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's name(s) and data for one HF tensor; transformers 5's fused experts are split in two."""
    arr = t.float().numpy()
    if hf_name in HF_TO_GGUF_GLOBAL:
        return [(HF_TO_GGUF_GLOBAL[hf_name], arr)]
    if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", hf_name):
        if m.group(2) == "down_proj":  # (E, H, I)
            return [(f"blk.{m.group(1)}.ffn_down_exps.weight", arr)]
        inter = arr.shape[1] // 2  # (E, 2I, H): each expert's gate rows, then its up rows
        return [(f"blk.{m.group(1)}.ffn_gate_exps.weight", arr[:, :inter]),
                (f"blk.{m.group(1)}.ffn_up_exps.weight", arr[:, inter:])]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    return [(f"blk.{m.group(1)}.{HF_TO_GGUF_LAYER[m.group(2)]}.{m.group(3)}", arr)]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: per head, rows (2, hd/2) -> (hd/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quant_roundtrip(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a float weight becomes after storing it as ``qtype`` and decoding with gguf's reference code."""
    if qtype == "F32":
        return w
    if qtype == "F16":
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, QT[qtype]), QT[qtype])


def quantize_or_fill(w: np.ndarray, qtype) -> np.ndarray:
    """``w`` quantized by gguf's reference code where it has a quantizer; else (K-quants, IQ4) random blocks of
    the type with scales of ``w``'s magnitude: their values are not ``w``'s, so such files serve tests that
    compare Ember with the file's own decoded weights, not with the HF model."""
    try:
        return gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = w.shape[0] * (int(np.prod(w.shape[1:])) // block)
        raw = random_blocks(qtype, rows, 1, seed=int(abs(w).sum() * 1e3) % 2**31).reshape(*w.shape[:-1], -1)
        scale = float(np.abs(w).mean()) / 8  # codes of a few units times this: the weight's own size
        blocks = raw.reshape(-1, size)
        for s in FP16_SLOTS[qtype.name]:
            blocks[:, s:s + 2] = (np.frombuffer(blocks[:, s:s + 2].tobytes(), np.float16) * np.float16(scale * 10)
                                  ).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw


def byte_vocab(n: int) -> list[str]:
    """A tiny byte-level vocabulary of exactly ``n`` tokens: the specials, then byte characters."""
    alphabet = gguf_tokenizer._byte_level_alphabet()
    return SPECIALS + [alphabet[b] for b in range(256)][len(SPECIALS):n]


def write_model_gguf(path: Path, hf, family: str, qtype: str = "F32", chat_template: str | None = CHATML) -> Path:
    """Write ``hf`` as llama.cpp would: metadata, renamed (and for llama permuted) tensors, a byte vocabulary."""
    cfg = hf.config
    arch = ARCH[family]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "num_local_experts", 0):
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if rope.get("rope_type") == "llama3":  # Llama 3.1 scaling travels as per-frequency divisors
        inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        old = rope["original_max_position_embeddings"]
        lo, hi, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
        factors = []
        for f in inv.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    tied = cfg.tie_word_embeddings
    for hf_name, t in hf.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        for name, arr in gguf_tensors(hf_name, t):
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                arr = llama_cpp_permute(arr, nh if ".attn_q." in name else nkv)
            block = gguf.GGML_QUANT_SIZES[QT[qtype]][0]
            if arr.ndim == 1 or (qtype not in ("F16", "BF16") and arr.shape[-1] % block):
                w.add_tensor(name, np.ascontiguousarray(arr))  # norms, biases, rows that fit no block: F32
            elif qtype == "F16":
                w.add_tensor(name, arr.astype(np.float16))
            elif qtype != "F32":
                w.add_tensor(name, quantize_or_fill(np.ascontiguousarray(arr), QT[qtype]), raw_dtype=QT[qtype])
            else:
                w.add_tensor(name, np.ascontiguousarray(arr))
    tokens = byte_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_bos_token_id(0)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip_hf(hf, qtype: str):
    """A copy of ``hf`` whose matrices went through ``qtype`` and back (reference decoder)."""
    import copy

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and (qtype in ("F16", "BF16") or p.shape[-1] % 32 == 0):
                p.copy_(torch.from_numpy(quant_roundtrip(p.float().numpy(), qtype)))
    return ref


@pytest.fixture(scope="module")
def gguf_model(hf_checkpoint, tmp_path_factory):
    """Factory: ``gguf_model(family, qtype) -> (path, hf_model)``; cached per args."""
    cache: dict = {}

    def make(family: str, qtype: str = "F32"):
        if (family, qtype) not in cache:
            _, hf = hf_checkpoint(family)
            path = tmp_path_factory.mktemp("gguf") / f"{family}-{qtype}.gguf"
            cache[family, qtype] = (write_model_gguf(path, hf, family, qtype), hf)
        return cache[family, qtype]

    return make


# Byte offsets of the fp16 scales in one block of each type (random bytes there could be inf/NaN).
FP16_SLOTS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "MXFP4": []}
KEPT = list(FP16_SLOTS)


def worst(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, tuple]:
    diff = (ours.float() - ref.float()).abs()
    return diff.max().item(), tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])


# ==================================================================== dequantization


def random_blocks(qtype, n_rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random ggml blocks with finite fp16 scales in their scale slots."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_rows * blocks_per_row, size), dtype=np.uint8)
    for s in FP16_SLOTS[qtype.name]:
        raw[:, s:s + 2] = rng.uniform(-0.1, 0.1, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    if qtype == QT.MXFP4:
        raw[:, 0] = rng.integers(110, 130, raw.shape[0])  # e8m0 exponents of moderate scales
    return raw.reshape(n_rows, blocks_per_row * size)


@pytest.mark.parametrize("qtype", KEPT)
def test_dequantize_is_bit_exact_with_gguf_reference(qtype, monkeypatch):
    raw = random_blocks(QT[qtype], n_rows=24, blocks_per_row=3)
    ref = gguf.quants.dequantize(raw, QT[qtype])
    monkeypatch.setattr(gguf_blocks, "DEQUANT_CHUNK", 1000)  # several chunks, ending mid-tensor
    got = dequantize(torch.from_numpy(raw), QT[qtype], torch.float32)
    assert got.shape == ref.shape
    assert torch.equal(got, torch.from_numpy(ref)), f"{qtype}: max diff {np.abs(got.numpy() - ref).max()}"
    assert torch.equal(dequantize(torch.from_numpy(raw), QT[qtype], torch.bfloat16), torch.from_numpy(ref).bfloat16())


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 4):
        back = egguf.unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


# ==================================================================== model


@pytest.mark.parametrize("family", sorted(ARCH))
def test_f32_logits_match_hf(gguf_model, family):
    path, hf = gguf_model(family)
    model = load_gguf_model(path, dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref = model(ids), hf(ids).logits
    err, at = worst(got, ref)
    assert err < FP32_TOL, f"{family} F32: max |diff| {err:.3g} at {at} exceeds {FP32_TOL}"


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mixtral"])
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_quantized_logits_match_hf(gguf_model, family, qtype):
    path, hf = gguf_model(family, qtype)
    model = load_gguf_model(path, dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids)
        exact = roundtrip_hf(hf, qtype)(ids).logits
        ref = hf(ids).logits
    err, at = worst(got, exact)
    assert err < FP32_TOL, f"{family} {qtype} vs HF on the same decoded weights: max |diff| {err:.3g} at {at}"
    if family == "mixtral":
        return  # quantization noise can flip a top-k expert choice: no max-abs bound vs the original weights
    err, at = worst(got, ref)
    assert err < QUANT_TOL[qtype], f"{family} {qtype} vs original HF: max |diff| {err:.3g} at {at} > {QUANT_TOL[qtype]}"


def test_config_read_from_metadata(gguf_model):
    path, hf = gguf_model("qwen3")
    cfg = config_from_gguf(GGUFFile.open(path))
    c = hf.config
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == \
        ("qwen3", c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.qk_norm and not cfg.tie_word_embeddings and cfg.vocab_size == 256
    assert cfg.rope_theta == c.rope_parameters["rope_theta"] and cfg.max_position_embeddings == 512
    assert cfg.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    tied = config_from_gguf(GGUFFile.open(gguf_model("qwen2")[0]))
    assert tied.tie_word_embeddings and tied.attention_bias and tied.qkv_bias_only
    rope = config_from_gguf(GGUFFile.open(gguf_model("llama3-rope")[0])).rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    moe = config_from_gguf(GGUFFile.open(gguf_model("qwen3-moe-mixed")[0]))
    assert (moe.model_type, moe.num_local_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == \
        ("qwen3_moe", 6, 2, 32)
    assert moe.norm_topk_prob and moe.mlp_only_layers == [1] and moe.attention_bias
    mixtral = config_from_gguf(GGUFFile.open(gguf_model("mixtral")[0]))
    assert mixtral.model_type == "mixtral" and mixtral.norm_topk_prob and mixtral.num_local_experts == 8


def test_llama31_rope_freqs_recovered():
    """Llama 3.1's real rope (head dim 128: several frequencies in the smooth band) survives the round trip."""
    from ember.config import ModelConfig
    from ember.models import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = ModelConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    base = ModelConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0)
    factors = (rope_inv_freq(base) / rope_inv_freq(cfg)).double()
    fitted = gguf_config._llama3_scaling_from_factors(factors, {"head_dim": 128, "rope_theta": 500000.0}, "x")
    again = rope_inv_freq(ModelConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                      rope_scaling=fitted))
    assert torch.allclose(again, rope_inv_freq(cfg), rtol=1e-5, atol=0)


def test_greedy_tokens_identical_to_hf_via_ember_load(gguf_model):
    path, hf = gguf_model("llama")
    llm = ember.load(path, device="cpu", dtype="fp32")
    prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 12, dtype=torch.long),
                          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = llm.generate(prompt, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert got.token_ids == out[0, 12:].tolist()
    assert llm.tokenizer.chat_template == CHATML
    assert llm.tokenizer.eos_token_ids[0] == 2 and 2 in llm.tokenizer.eos_token_ids


def test_auto_dtype_follows_the_file(gguf_model):
    assert load_gguf_model(gguf_model("llama", "F32")[0]).lm_head.weight.dtype == torch.float32
    q = load_gguf_model(gguf_model("llama", "Q8_0")[0]).model.norm.weight.dtype  # bf16 where native, else fp32
    assert q in (torch.bfloat16, torch.float32)


@pytest.mark.gpu
def test_cuda_dequantize_and_load_match_cpu(gguf_model):
    for qtype in KEPT:
        raw = torch.from_numpy(random_blocks(QT[qtype], n_rows=16, blocks_per_row=2))
        assert torch.equal(dequantize(raw.cuda(), QT[qtype]).cpu(), dequantize(raw, QT[qtype])), qtype
    path, hf = gguf_model("qwen3", "Q4_0")
    cpu, gpu = load_gguf_model(path, dtype="fp32"), load_gguf_model(path, device="cuda", dtype="fp32")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err, at = worst(gpu(ids.cuda()).cpu(), cpu(ids))
    assert err < 1e-3, f"CUDA vs CPU: max |diff| {err:.3g} at {at}"


def test_cli_generate_runs_a_gguf_file(gguf_model, capsys):
    from ember.cli import main

    path, _ = gguf_model("qwen3", "Q8_0")
    assert main(["generate", str(path), "hello", "-n", "4", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip() != ""


# ==================================================================== tokenizers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ember runs large language models on one machine, locally; nothing leaves it.",
    "Numbers: 12345 67.89 -3e10, dates 2024-05-17 and times 12:30.",
    "def f(x):\n    return x * 2  # a comment\n\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe, \u4f60\u597d\u4e16\u754c, \u3053\u3093\u306b\u3061\u306f.",
    "Emoji \U0001f525\U0001f680 and symbols \u2211 \u221e \u2192 \u00a9.",
    "It's what we've said: they'll see, I'd think, you're right, she's here.",
] * 20
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "Numbers 1234567 and 3.14159",
    "Unicode: caf\u00e9 \u4f60\u597d \U0001f525 \u00df\u2211",
    "unseen characters \u0416\u0417\u0418 \u05d0\u05d1",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside",
    "",
]


def train_byte_level_bpe() -> HFTokenizer:
    """A Qwen2-style byte-level BPE trained here: split regex + ByteLevel, three special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_tokenizer._QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def train_sentencepiece_style_bpe() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-like vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces by merge order."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens]
    scores = [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)]  # SentencePiece: later piece, lower score
    return tokens, scores, types


def write_tokenizer_gguf(path: Path, kind: str, tokens, types, *, merges=None, scores=None, pre=None,
                         bos=None, eos=None, add_bos=None, chat_template=None, arch="qwen2") -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(kind)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gpt2_style_vocabulary_encodes_like_its_source(tmp_path):
    import json

    hf_tok = train_byte_level_bpe()
    vocab = hf_tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(hf_tok.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    path = write_tokenizer_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, types, merges=merges, pre="qwen2",
                                eos=vocab["<|im_end|>"], chat_template=CHATML)
    ours = load_gguf_tokenizer(path)
    for text in TEXTS:
        ref = hf_tok.encode(text).ids
        assert ours.encode(text) == ref, text
        assert ours.decode(ref) == hf_tok.decode(ref, skip_special_tokens=False) == text
    assert ours.eos_token_ids[0] == vocab["<|im_end|>"] and vocab["<|endoftext|>"] in ours.eos_token_ids
    assert ours.bos_token_id is None and ours.encode("hi") == hf_tok.encode("hi").ids  # no BOS for qwen2
    msgs = [{"role": "user", "content": "hi there"}]
    assert ours.apply_chat_template(msgs) == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode_chat(msgs)[0] == vocab["<|im_start|>"]

    from transformers import AutoTokenizer  # transformers' own GGUF reader agrees

    hf_gguf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == hf_gguf.encode(text, add_special_tokens=False), text

    # A Llama 3 style file (pre "llama-bpe", no add_bos_token key) starts every encoding with BOS.
    llama3 = load_gguf_tokenizer(write_tokenizer_gguf(tmp_path / "l3.gguf", "gpt2", tokens, types, merges=merges,
                                                      pre="llama-bpe", bos=vocab["<|endoftext|>"], arch="llama"))
    assert llama3.encode("Hello world")[0] == vocab["<|endoftext|>"]
    assert llama3.encode("Hello world", add_special_tokens=False) == hf_tok.encode("Hello world").ids


def test_llama_style_vocabulary_encodes_like_its_source(tmp_path):
    from transformers.tokenization_utils_base import generate_merges

    tokens, scores, types = train_sentencepiece_style_bpe()
    vocab = {t: i for i, t in enumerate(tokens)}
    # The HF tokenizer for this SentencePiece vocabulary, built as HF's converter builds Llama 2's
    # tokenizer.json: merges from the scores, byte fallback, the legacy space-prefix normalizer.
    normal = {t: s for t, s, ty in zip(tokens, scores, types) if ty == 1}
    hf_tok = HFTokenizer(models.BPE(vocab, generate_merges(vocab, normal), unk_token="<unk>", fuse_unk=True,
                                    byte_fallback=True))
    hf_tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf_tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    hf_tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2,
                                arch="llama")
    ours = load_gguf_tokenizer(path)
    for text in TEXTS:
        ref = [1] + hf_tok.encode(text).ids  # llama vocabularies add BOS unless the file says otherwise
        assert ours.encode(text) == ref, text
        assert ours.decode(ref, skip_special_tokens=True) == hf_tok.decode(ref), text
    assert ours.encode("\u4f60\u0416")[1:] == hf_tok.encode("\u4f60\u0416").ids  # byte fallback
    assert any(tokens[i].startswith("<0x") for i in ours.encode("\u0416"))
    assert (ours.bos_token, ours.eos_token_ids) == ("<s>", [2])

    from transformers import AutoTokenizer  # transformers' GGUF reader (Metaspace "first" differs only on
    # text that starts with a space or follows a special token, which these avoid)

    hf_gguf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        if text and not text.startswith(" ") and "<|" not in text:
            assert ours.encode(text) == hf_gguf.encode(text), text


def test_model_file_without_tokenizer_is_clear(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", "bert", ["a", "b"], [1, 1])
    with pytest.raises(TokenizerError, match="tokenizer model 'bert' is not supported"):
        load_gguf_tokenizer(path)
    w = gguf.GGUFWriter(str(tmp_path / "none.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_gguf_tokenizer(tmp_path / "none.gguf")


# ==================================================================== malformed files


def tensor_type_offset(path: Path, tensor: str) -> int:
    """Byte offset of the ggml type field in ``tensor``'s info record."""
    r = gguf.GGUFReader(str(path))
    f = next(t.field for t in r.tensors if t.name == tensor)
    return f.offset + sum(int(p.nbytes) for p in f.parts[:4])


def test_bad_magic(tmp_path, gguf_model):
    data = bytearray(gguf_model("llama")[0].read_bytes())
    data[:4] = b"GGUX"
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        ember.load(tmp_path / "bad.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf_model(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        load_gguf_model(tmp_path / "missing.gguf")


def test_truncated_files_name_what_is_cut(tmp_path, gguf_model):
    data = gguf_model("llama", "Q4_0")[0].read_bytes()
    header_end = gguf.GGUFReader(str(gguf_model("llama", "Q4_0")[0])).data_offset
    for cut in (6, 20, 100, header_end // 2, header_end - 3, header_end + 10, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated") as e:
            ember.load(p)
        assert str(p) in str(e.value)
    p.write_bytes(data[:len(data) - 1])
    with pytest.raises(GGUFError, match=r"tensor '.*' ends at byte"):
        load_gguf_model(p)


def test_unknown_and_unsupported_tensor_types_are_named(tmp_path, gguf_model):
    src = gguf_model("llama")[0]
    data = bytearray(src.read_bytes())
    off = tensor_type_offset(src, "blk.1.ffn_up.weight")
    data[off:off + 4] = (99).to_bytes(4, "little")
    (tmp_path / "unknown.gguf").write_bytes(data)
    with pytest.raises(UnsupportedGGUFTypeError, match=r"'blk.1.ffn_up.weight' has ggml type id 99.*Q4_K"):
        ember.load(tmp_path / "unknown.gguf")

    # A real ggml type Ember does not take (Q8_1): named with the tensor and the supported list, before loading.
    off = tensor_type_offset(src, "blk.1.ffn_up.weight")
    data = bytearray(src.read_bytes())
    data[off:off + 4] = int(QT.Q8_1).to_bytes(4, "little")  # F32 bytes read as Q8_1 blocks: never decoded
    (tmp_path / "q81.gguf").write_bytes(data)
    with pytest.raises(UnsupportedGGUFTypeError, match=r"'blk.1.ffn_up.weight' is Q8_1; Ember reads F32, F16, BF16, Q8_0"):
        ember.load(tmp_path / "q81.gguf")


def test_unsupported_architecture_is_clear(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EmberError, match="architecture 'gemma2' is not supported; supported: deepseek2, gemma3, .*llama, .*qwen3"):
        load_gguf_model(tmp_path / "g.gguf")


def test_corrupted_headers_raise_ember_errors_only(tmp_path, gguf_model):
    """Random byte damage in the header: either it still loads, or an EmberError says why; nothing else."""
    src = gguf_model("qwen3", "Q8_0")[0]
    data = src.read_bytes()
    header_end = gguf.GGUFReader(str(src)).data_offset
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "error": 0}
    for i in range(40):
        bad = bytearray(data)
        for pos in rng.integers(4, header_end, size=3):
            bad[pos] = int(rng.integers(0, 256))
        p = tmp_path / f"fuzz{i}.gguf"
        p.write_bytes(bad)
        try:
            ember.load(p, device="cpu", dtype="fp32")
            outcomes["loaded"] += 1
        except EmberError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0
