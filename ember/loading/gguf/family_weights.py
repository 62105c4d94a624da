"""Tensors of the :mod:`ember.loading.gguf.families` architectures -> Ember parameters and block modules.

What :func:`family_tensors` returns, :func:`ember.loading.gguf.weights.load_gguf_model` installs:

- ``state``: float parameters (decoded; Gemma's norms with the converter's +1 taken off; DeepSeek's
  ``kv_b_proj`` rebuilt from ``attn_k_b``/``attn_v_b``; gpt-oss's float experts in HF's fused layout);
- ``kept``: module path -> (ggml type, block rows) for a projection or embedding held in its blocks;
- ``modules``: module path -> a ready module (gpt-oss experts held in their blocks,
  :class:`GGUFGptOssExperts`; Gemma's scaled token embedding over its blocks, :class:`GGUFScaledEmbedding`,
  with a tied LM head over the same blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from ember.config import ModelConfig
from ember.errors import GGUFError
from ember.loading.gguf.config import _LAYER_NAME, CONFIG_TENSORS, GLOBAL_TENSORS
from ember.loading.gguf.file_facts import _BLOCK
from ember.loading.gguf.dequant import check_tensor_types
from ember.loading.gguf.families import FAMILY_GLOBALS, KV_B_PARTS, NORM_PLUS_ONE, family_targets
from ember.loading.gguf.reader import GGUFFile
from ember.models.gemma import ScaledEmbedding
from ember.models.gemma4 import Gemma4Embedding, PerLayerEmbedding, begin_pass
from ember.models.gpt_oss import GptOssExperts
from ember.models.linear import Linear
from ember.quant.gguf_linear import KEPT_TYPES, GGUFEmbedding, GGUFLinear

_BLOCK_MODULES = (Linear, nn.Linear, nn.Embedding)
_OSS_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


class GGUFGptOssExperts(GptOssExperts):
    """gpt-oss experts as llama.cpp stores them: per expert a gate, up and down :class:`GGUFLinear` over the
    file's blocks (MXFP4 as published, or any kept type), and the biases. The fused product HF defines
    (gate/up interleaved along the output) is the two products stacked pairwise."""

    def __init__(self, cfg: ModelConfig, blocks: dict[str, tuple[Any, torch.Tensor]],
                 biases: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        E, H, inter = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, inter
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        for key in _OSS_EXPERTS:  # raw (E, out, row_bytes)
            qtype, raw = blocks[key]
            setattr(self, key, nn.ModuleList(GGUFLinear(raw[e], qtype, None, dtype) for e in range(E)))
        gate_up = torch.stack((biases["ffn_gate_exps"], biases["ffn_up_exps"]), dim=-1).flatten(-2)  # (E, 2I)
        self.gate_up_proj_bias = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj_bias = nn.Parameter(biases["ffn_down_exps"], requires_grad=False)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = torch.stack((self.ffn_gate_exps[e](x), self.ffn_up_exps[e](x)), dim=-1).flatten(-2)
        return y + self.gate_up_proj_bias[e].to(y.dtype)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        y = self.ffn_down_exps[e](h)
        return y + self.down_proj_bias[e].to(y.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"{self.ffn_gate_exps[0].qtype.name}")


class GGUFScaledEmbedding(GGUFEmbedding):
    """Gemma's token embedding (``ScaledEmbedding``: rows times sqrt(hidden), the scalar rounded to the compute
    dtype first, as HF) over a GGUF tensor's blocks: only the rows looked up are decoded."""

    def __init__(self, raw: torch.Tensor, qtype: Any, dtype: torch.dtype, scale: float) -> None:
        super().__init__(raw, qtype, dtype)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out * torch.tensor(self.scale, dtype=torch.float32, device=out.device).to(out.dtype)


class GGUFGemma4Embedding(GGUFScaledEmbedding):
    """Gemma 4's token embedding over a GGUF tensor's blocks: the scaled rows, then the start of the forward pass
    (per-layer inputs, shared keys/values) that :class:`ember.models.gemma4.Gemma4Embedding` makes."""

    def __init__(self, raw: torch.Tensor, qtype: Any, dtype: torch.dtype, replaces: Gemma4Embedding) -> None:
        super().__init__(raw, qtype, dtype, replaces.scale)
        self.cfg, self.state = replaces.cfg, replaces.state  # the pass object the layers already share

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return begin_pass(self.state, self.cfg, ids, super().forward(ids))


def _block_embedding(old: nn.Module, raw: torch.Tensor, qtype: Any, dtype: torch.dtype) -> nn.Module | None:
    """The block-holding module for a (scaled) embedding of ``old``'s class, or None when it has none."""
    if type(old) is ScaledEmbedding or type(old) is PerLayerEmbedding:
        return GGUFScaledEmbedding(raw, qtype, dtype, old.scale)
    if type(old) is Gemma4Embedding:
        return GGUFGemma4Embedding(raw, qtype, dtype, old)
    return None


def family_tensors(gf: GGUFFile, cfg: ModelConfig, model: nn.Module, dtype: torch.dtype, device: torch.device,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Any, torch.Tensor]], dict[str, nn.Module]]:
    """(state, kept, modules) for every tensor of ``gf`` (module docstring).

    Raises:
        GGUFError: an unknown tensor, a missing or extra one, or a shape the metadata does not imply.
        UnsupportedGGUFTypeError: a tensor type Ember does not read (before anything is decoded).
    """
    arch, n = gf.architecture, cfg.num_hidden_layers
    expected = dict(model.state_dict(keep_vars=True))
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    names: dict[str, list[str]] = {}
    special: dict[tuple[int, str], str] = {}  # (layer, "ffn_gate_exps.weight" / "attn_k_b.weight", ...) -> tensor
    unknown: list[str] = []
    for name in gf.tensors:
        m = _LAYER_NAME.fullmatch(name)
        if name in CONFIG_TENSORS or ((b := _BLOCK.match(name)) and int(b.group(1)) >= n):
            continue  # multi-token-prediction layers (GLM's nextn, counted in block_count): Ember does not run them
        if name in GLOBAL_TENSORS:
            names[name] = [GLOBAL_TENSORS[name]]
        elif name in FAMILY_GLOBALS.get(arch, {}):
            names[name] = [FAMILY_GLOBALS[arch][name]]
        elif m and ((arch == "gpt-oss" and m.group(2) in _OSS_EXPERTS) or m.group(2) in KV_B_PARTS):
            special[(int(m.group(1)), f"{m.group(2)}.{m.group(3)}")] = name
        elif m and (t := family_targets(arch, name, int(m.group(1)), m.group(2), m.group(3), cfg.num_local_experts)):
            names[name] = t
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{gf.path}: {len(unknown)} tensor(s) Ember does not know for {arch!r}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    filled = {t for targets in names.values() for t in targets}
    for layer, key in special:
        if key.startswith("attn_"):
            filled.add(f"model.layers.{layer}.self_attn.kv_b_proj.weight")
        else:
            prefix = f"model.layers.{layer}.mlp.experts."
            filled.update(k for k in expected if k.startswith(prefix))
    missing, extra = sorted(set(expected) - filled), sorted(filled - set(expected))
    if missing or extra:
        raise GGUFError(f"{gf.path}: tensors do not match the {arch!r} model its metadata describes: "
                        f"missing {missing[:5]}, unexpected {extra[:5]}")
    check_tensor_types(gf, [*names, *special.values()])

    state: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[Any, torch.Tensor]] = {}
    modules: dict[str, nn.Module] = {}
    for gname, targets in names.items():
        stacked = len(targets) > 1
        want = tuple(expected[targets[0]].shape)
        want = (len(targets), *want) if stacked else want
        have = gf.tensor_shape(gname)
        # a stack of (E, 2I, H) filling 2E Linears of (I, H) (Gemma 4's gate_up experts) is read as (2E, I, H)
        regrouped = stacked and len(have) == 3 and have[0] * have[1] == want[0] * want[1] and have[2:] == want[2:]
        if have != want and not regrouped:
            raise GGUFError(f"{gf.path}: tensor {gname!r} ({targets[0]}) has shape {list(gf.tensor_shape(gname))}, "
                            f"the metadata implies {list(want)}")
        qtype = QT(gf.tensors[gname].tensor_type)
        owners = [t.rsplit(".", 1)[0] for t in targets]
        if qtype in KEPT_TYPES and (emb := _block_embedding(model.get_submodule(owners[0]), gf.raw(gname).to(device),
                                                            qtype, dtype)) is not None:
            modules[owners[0]] = emb
            raw = emb.qweight
            if cfg.tie_word_embeddings and owners[0] == "model.embed_tokens":
                modules["lm_head"] = GGUFLinear(raw, qtype, None, dtype)  # the same blocks, held once
            continue
        if qtype in KEPT_TYPES and targets[0].endswith(".weight") and all(
                type(model.get_submodule(o)) in _BLOCK_MODULES for o in owners):
            raw = gf.raw(gname).to(device)
            raw = raw.reshape(len(targets), -1, raw.shape[-1])
            kept.update((o, (qtype, raw[i])) for i, o in enumerate(owners))
            continue
        if arch in NORM_PLUS_ONE and gname.endswith("norm.weight"):
            w = (gf.tensor(gname, torch.float32, device) - 1).to(dtype)
        else:
            w = gf.tensor(gname, dtype, device)
            w = w.reshape(want) if regrouped else w
        state.update((t, w[i]) for i, t in enumerate(targets)) if stacked else state.update({targets[0]: w})
    for layer in sorted({layer for layer, _ in special}):
        get = {key: special[(lyr, key)] for lyr, key in special if lyr == layer}
        if "attn_k_b.weight" in get or "attn_v_b.weight" in get:
            state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = _kv_b(gf, cfg, get, dtype, device)
        if arch == "gpt-oss":
            _gpt_oss_experts(gf, cfg, layer, get, dtype, device, state, modules)
    return state, kept, modules


def _need(gf: GGUFFile, get: dict[str, str], key: str, layer: int) -> str:
    if key not in get:
        raise GGUFError(f"{gf.path}: tensor 'blk.{layer}.{key}' is missing")
    return get[key]


def _kv_b(gf: GGUFFile, cfg: ModelConfig, get: dict[str, str], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """DeepSeek's ``kv_b_proj`` (H*(nope+v), kv_lora_rank), per head nope rows of K then v rows of V, from the
    converter's ``attn_k_b`` (H, kv_lora_rank, nope) and ``attn_v_b`` (H, v, kv_lora_rank)."""
    H, r = cfg.num_attention_heads, cfg.kv_lora_rank
    layer = int(_LAYER_NAME.fullmatch(next(iter(get.values()))).group(1))
    k_name, v_name = (_need(gf, get, f"{p}.weight", layer) for p in KV_B_PARTS)
    k_b, v_b = gf.tensor(k_name, dtype, device), gf.tensor(v_name, dtype, device)
    want_k, want_v = (H, r, cfg.qk_nope_head_dim), (H, cfg.v_head_dim, r)
    for name, t, want in ((k_name, k_b, want_k), (v_name, v_b, want_v)):
        if tuple(t.shape) != want:
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {list(t.shape)}, the metadata implies {list(want)}")
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, r).contiguous()


def _gpt_oss_experts(gf: GGUFFile, cfg: ModelConfig, layer: int, get: dict[str, str], dtype: torch.dtype,
                     device: torch.device, state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
    """One layer's experts: held in their blocks when all three weights are of a kept type (MXFP4 as the
    hub publishes them), else decoded into HF's fused float layout (gate/up rows interleaved)."""
    E, H, inter = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"ffn_gate_exps": (E, inter, H), "ffn_up_exps": (E, inter, H), "ffn_down_exps": (E, H, inter)}
    biases, weights = {}, {}
    for key, shape in shapes.items():
        w_name, b_name = _need(gf, get, f"{key}.weight", layer), _need(gf, get, f"{key}.bias", layer)
        for name, want in ((w_name, shape), (b_name, shape[:2])):
            if gf.tensor_shape(name) != want:
                raise GGUFError(f"{gf.path}: tensor {name!r} has shape {list(gf.tensor_shape(name))}, "
                                f"the metadata implies {list(want)}")
        biases[key] = gf.tensor(b_name, dtype, device)
        weights[key] = w_name
    prefix = f"model.layers.{layer}.mlp.experts"
    types = {key: QT(gf.tensors[name].tensor_type) for key, name in weights.items()}
    if all(t in KEPT_TYPES for t in types.values()):
        blocks = {}
        for key, name in weights.items():
            raw = gf.raw(name).to(device)
            blocks[key] = (types[key], raw.reshape(E, -1, raw.shape[-1]))
        modules[prefix] = GGUFGptOssExperts(cfg, blocks, biases, dtype)
        return
    gate, up, down = (gf.tensor(weights[k], dtype, device) for k in _OSS_EXPERTS)
    state[f"{prefix}.gate_up_proj"] = torch.stack((gate, up), dim=2).flatten(1, 2).transpose(1, 2).contiguous()
    state[f"{prefix}.gate_up_proj_bias"] = torch.stack((biases["ffn_gate_exps"], biases["ffn_up_exps"]), -1).flatten(-2)
    state[f"{prefix}.down_proj"] = down.transpose(1, 2).contiguous()
    state[f"{prefix}.down_proj_bias"] = biases["ffn_down_exps"]
