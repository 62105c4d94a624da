"""Multi-token-prediction heads (``mtp.*``) of Qwen3.5 checkpoints as the Hub ships them: loaded and kept in
``model.extra_weights`` under their checkpoint names and dtype, untouched by the forward pass, and carried
through ``ember quantize`` (float, beside the quantized model) back into ``extra_weights``.

HF drops ``mtp.*`` on load, so they are written into the ``save_pretrained`` safetensors here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ember.loading import load_model
from test_hybrid import MOE, TEXT, _hf_logits, checkpoint  # noqa: F401 - checkpoint is a fixture

transformers = pytest.importorskip("transformers")


def hub_mtp_tensors(moe: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """One MTP block with the Hub's names and shapes for the tiny configs: ``fc`` joins the normed embedding and
    hidden state (H x 2H), then a gated-attention decoder layer (dense SwiGLU, or routed experts stored per expert
    plus the shared expert) and a final norm; bf16 as published."""
    g = torch.Generator().manual_seed(seed)
    h, heads, kv, hd = TEXT["hidden_size"], TEXT["num_attention_heads"], TEXT["num_key_value_heads"], TEXT["head_dim"]
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)}
    layer = "mtp.layers.0."
    shapes.update({layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
                   layer + "self_attn.q_proj.weight": (2 * heads * hd, h), layer + "self_attn.k_proj.weight": (kv * hd, h),
                   layer + "self_attn.v_proj.weight": (kv * hd, h), layer + "self_attn.o_proj.weight": (h, heads * hd),
                   layer + "self_attn.q_norm.weight": (hd,), layer + "self_attn.k_norm.weight": (hd,)})
    if moe:
        e, im, sh = MOE["num_experts"], MOE["moe_intermediate_size"], MOE["shared_expert_intermediate_size"]
        shapes[layer + "mlp.gate.weight"] = (e, h)
        for i in range(e):
            shapes.update({f"{layer}mlp.experts.{i}.gate_proj.weight": (im, h),
                           f"{layer}mlp.experts.{i}.up_proj.weight": (im, h),
                           f"{layer}mlp.experts.{i}.down_proj.weight": (h, im)})
        shapes.update({layer + "mlp.shared_expert.gate_proj.weight": (sh, h),
                       layer + "mlp.shared_expert.up_proj.weight": (sh, h),
                       layer + "mlp.shared_expert.down_proj.weight": (h, sh),
                       layer + "mlp.shared_expert_gate.weight": (1, h)})
    else:
        i = TEXT["intermediate_size"]
        shapes.update({layer + "mlp.gate_proj.weight": (i, h), layer + "mlp.up_proj.weight": (i, h),
                       layer + "mlp.down_proj.weight": (h, i)})
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


@pytest.fixture(scope="module")
def with_mtp(checkpoint, tmp_path_factory):
    """test_hybrid's tiny checkpoint of ``family``, copied, with a Hub-shaped MTP block added to its file."""
    cache: dict = {}

    def make(family: str):
        if family not in cache:
            src, hf = checkpoint(family)
            folder = Path(tmp_path_factory.mktemp(f"mtp-{family}")) / "ckpt"
            shutil.copytree(src, folder)
            (shard,) = folder.glob("*.safetensors")
            mtp = hub_mtp_tensors(moe="moe" in family)
            save_file({**load_file(shard), **mtp}, shard, metadata={"format": "pt"})
            cache[family] = (folder, hf, mtp)
        return cache[family]

    return make


def _assert_kept(model, mtp: dict[str, torch.Tensor]) -> None:
    assert set(model.extra_weights) == set(mtp)
    for name, t in mtp.items():
        got = model.extra_weights[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, t), name


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_hub_mtp_heads_load_and_are_kept(with_mtp, family):
    folder, hf, mtp = with_mtp(family)
    model = load_model(folder, dtype="fp32")
    _assert_kept(model, mtp)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the heads are not part of the forward pass: still HF's logits
        assert (model(ids) - _hf_logits(hf, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("family,mode", [("qwen3_5_moe", "int8"), ("qwen3_5", "int4"), ("qwen3_5_moe", "nf4")])
def test_quantized_folder_keeps_mtp_heads(with_mtp, tmp_path, family, mode):
    from ember.loading.quantized import quantize_checkpoint

    folder, _, mtp = with_mtp(family)
    group = 32 if mode == "int4" else None
    out, summary = quantize_checkpoint(folder, tmp_path / "q", mode, group)
    written = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            written.update({n: f.get_tensor(n) for n in f.keys() if n.startswith("mtp.")})
    assert set(written) == set(mtp) and all(torch.equal(written[n], t) for n, t in mtp.items())
    assert summary["bytes_after"] < summary["bytes_before"]
    stored = load_model(out, dtype="fp32")
    _assert_kept(stored, mtp)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the folder's model is the one --quant builds, heads or not
        assert torch.equal(stored(ids), load_model(folder, dtype="fp32", quant=mode, group_size=group)(ids))


def test_a_derived_checkpoint_keeps_mtp_heads(with_mtp, tmp_path):
    """``ember merge`` (and every other HF checkpoint Ember writes from a loaded model) keeps the heads too."""
    from ember.checkpoint_io import save_hf_checkpoint

    folder, _, mtp = with_mtp("qwen3_5")
    model = load_model(folder, dtype="fp32")
    out = save_hf_checkpoint(tmp_path / "copy", model)
    shutil.copy(folder / "config.json", out / "config.json")  # the wrapper's config; weights under text names
    _assert_kept(load_model(out, dtype="fp32"), mtp)
