"""CUDA paths (skipped without a GPU): the same parity checks as on CPU."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.loading import load_model
from test_gguf_native import wide_gguf  # noqa: F401  (fixture: small GGUF files of a given block type)
from test_model import assert_close
from test_mxfp4 import mxfp4_gpt_oss  # noqa: F401  (fixture: a gpt-oss MXFP4 folder as the hub ships it)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_cuda_logits_match_hf(hf_checkpoint, family):
    folder, hf = hf_checkpoint(family)
    ours = load_model(folder, device="cuda", dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.cuda()(ids.cuda()).logits
        assert_close(ours(ids.cuda()), ref, 1e-4, f"{family} cuda fp32")
    hf.cpu()


def test_cuda_bf16_generation_runs_and_is_deterministic(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    llm = ember.load(folder, device="cuda", dtype="bf16")
    a = llm.generate(["w3 w4", "w5 w6 w7 w8"], max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    b = llm.generate(["w3 w4", "w5 w6 w7 w8"], max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].stats.peak_memory_bytes > 0


def test_cuda_gpt_oss_mxfp4_folder_matches_cpu(mxfp4_gpt_oss):
    """gpt-oss as the hub ships it on CUDA: experts held as stored (uint8 blocks on the GPU, multiplied by
    dequantizing a row tile at a time), the same fp32 logits as the CPU kernels past the sliding window, and a
    bf16 greedy generation that runs and repeats itself."""
    from ember.quant.mxfp4 import Mxfp4Experts

    _, folder, _ = mxfp4_gpt_oss
    cpu = load_model(folder, dtype="fp32")
    gpu = load_model(folder, device="cuda", dtype="fp32")
    experts = gpu.model.layers[0].mlp.experts
    assert isinstance(experts, Mxfp4Experts)
    assert experts.gate_up_proj_blocks.is_cuda and experts.gate_up_proj_blocks.dtype == torch.uint8
    ids = torch.randint(0, cpu.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(gpu(ids.cuda()).cpu(), cpu(ids), 1e-4, "gpt-oss mxfp4 cuda fp32")
    llm = ember.load(folder, device="cuda", dtype="bf16")
    a = llm.generate(["w3 w4"], max_new_tokens=12, temperature=0.0, ignore_eos=True)
    b = llm.generate(["w3 w4"], max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert len(a[0].token_ids) == 12 and a[0].token_ids == b[0].token_ids


def test_cuda_gpt_oss_mxfp4_int8_matches_cpu(mxfp4_gpt_oss):
    """--quant int8 beside the stored MXFP4 experts on CUDA: int8 projections and uint8 expert blocks on the GPU, the
    fp32 logits of the CPU load."""
    from ember.quant.int8 import Int8Linear

    _, folder, _ = mxfp4_gpt_oss
    cpu = load_model(folder, dtype="fp32", quant="int8")
    gpu = load_model(folder, device="cuda", dtype="fp32", quant="int8")
    q = gpu.model.layers[0].self_attn.q_proj
    assert type(q) is Int8Linear and q.weight.is_cuda
    ids = torch.randint(0, cpu.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(gpu(ids.cuda()).cpu(), cpu(ids), 1e-4, "gpt-oss mxfp4+int8 cuda fp32")


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_K"), ("llama", "MXFP4")])
def test_cuda_gguf_blocks_match_cpu(wide_gguf, family, qtype):
    """A Q4_K / MXFP4 GGUF file on CUDA: blocks held as stored on the GPU, fp32 logits as the CPU kernels'."""
    from ember.loading.gguf import load_gguf_model
    from ember.quant.gguf_linear import GGUFLinear

    path, hf = wide_gguf(family, qtype)
    cpu = load_gguf_model(path, dtype="fp32")
    gpu = load_gguf_model(path, device="cuda", dtype="fp32")
    lins = [m for m in gpu.modules() if isinstance(m, GGUFLinear)]
    assert lins and all(m.qweight.is_cuda and m.qweight.dtype == torch.uint8 for m in lins)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = cpu(ids)
        assert_close(gpu(ids.cuda()).cpu(), ref, 1e-4 * max(1.0, ref.abs().max().item()), f"{family} {qtype} cuda")


def test_cuda_gguf_gpt_oss_mxfp4_file_matches_cpu():
    """llama.cpp's gpt-oss MXFP4 file on CUDA: experts in their blocks, fp32 logits as the CPU path's."""
    from ember.loading.gguf import load_gguf_model
    from test_gguf_families import DATA

    path = DATA / "gpt-oss-mxfp4.gguf"
    cpu = load_gguf_model(path, dtype="fp32")
    gpu = load_gguf_model(path, device="cuda", dtype="fp32")
    ids = torch.randint(0, cpu.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = cpu(ids)
        assert_close(gpu(ids.cuda()).cpu(), ref, 1e-4 * max(1.0, ref.abs().max().item()), "gpt-oss mxfp4 gguf cuda")
