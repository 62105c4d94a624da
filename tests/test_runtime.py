"""The CPU decode runtime composes per layer: pieces it has kernels for run on them, any other piece runs as its
PyTorch module, and the model decodes the same either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ember.runtime
from ember import kernels
from ember.loading import load_model
from ember.models import MLP, Attention
from test_model import FP32_TOL, _decode_matches_hf, _decode_steps, assert_close


class EagerSwiGLU(MLP):
    """HF's SwiGLU written out, without ``project``: the same math in a class the runtime does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(MLP):
    """A test-only MLP variant with other math (tanh-GELU gate): no kernel exists for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class EagerAttention(Attention):
    """The same attention as a class the runtime does not know."""


def _swap(module, cls):
    module.__class__ = cls  # the same weights and submodules, another class
    return module


def _count(monkeypatch) -> dict:
    calls = {"steps": [], "attn": 0, "mlp": 0}
    many, one, mlp = kernels.run_decode_layers, kernels.run_attn_block, kernels.run_mlp_block

    def run_many(steps, *a):
        done = many(steps, *a)
        calls["steps"].append((steps.n, done))
        return done

    def run_attn(*a):
        calls["attn"] += 1
        return one(*a)

    def run_mlp(*a):
        calls["mlp"] += 1
        return mlp(*a)

    monkeypatch.setattr(kernels, "run_decode_layers", run_many)
    monkeypatch.setattr(kernels, "run_attn_block", run_attn)
    monkeypatch.setattr(kernels, "run_mlp_block", run_mlp)
    return calls


def _needs_kernels():
    if kernels.load() is None:
        pytest.skip("native kernels unavailable")


@pytest.mark.parametrize("which", ["mlp", "attention"])
def test_a_piece_without_kernels_runs_as_its_module_and_matches_hf(hf_checkpoint, monkeypatch, which):
    # 3 layers; the middle one's MLP (or attention) is a class the runtime does not know
    _needs_kernels()
    folder, hf = hf_checkpoint("llama", num_hidden_layers=3)
    ours = load_model(folder, dtype="fp32")
    mid = ours.model.layers[1]
    if which == "mlp":
        _swap(mid.mlp, EagerSwiGLU)
    else:
        _swap(mid.self_attn, EagerAttention)
    calls = _count(monkeypatch)
    _decode_matches_hf(ours, hf, 12, 8, f"unknown {which}")
    steps = 12 - 6
    # layer 0 in the whole-step call; layer 1's attention block alone (unknown MLP) or its MLP block alone (unknown
    # attention); layer 2's two blocks one by one
    assert calls["steps"] == [(1, 2)] * steps
    assert calls["attn"] == steps * (2 if which == "mlp" else 1)
    assert calls["mlp"] == steps * (1 if which == "mlp" else 2)


def test_new_mlp_math_decodes_as_the_plain_pytorch_model(hf_checkpoint, monkeypatch):
    # a GeGLU layer has no HF twin here: the runtime's decode equals the model with no runtime at all (fp32)
    _needs_kernels()
    folder, _ = hf_checkpoint("qwen3-moe-mixed")
    ours = load_model(folder, dtype="fp32")
    _swap(ours.model.layers[1].mlp, GeGLU)  # the dense layer between two mixtures
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(9))
    calls = _count(monkeypatch)
    fast = _decode_steps(ours, ids, 6, torch.float32)
    assert calls["steps"] and all(n == 1 for n, _ in calls["steps"]) and calls["mlp"] > 0
    before = dict(calls, steps=len(calls["steps"]))
    ember.runtime.uninstall()
    try:
        plain = _decode_steps(ours, ids, 6, torch.float32)
    finally:
        ember.runtime.install()
    assert dict(calls, steps=len(calls["steps"])) == before  # no kernel ran: plain PyTorch modules
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert_close(a, b, FP32_TOL, f"GeGLU layer, step {i}")
