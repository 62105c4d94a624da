"""GGUF files of the hybrid families: Qwen3-Next, Qwen3.5 (dense and MoE) and Nemotron-H, as llama.cpp writes them.

What ``convert_hf_to_gguf.py`` does to these checkpoints, and we undo:

- architectures ``qwen3next``, ``qwen35``, ``qwen35moe``; ``nemotron_h`` and ``nemotron_h_moe`` (one Ember
  family: a layer's block is read off the tensors it has, ``ssm_in`` Mamba-2, ``attn_q`` attention,
  ``ffn_up_exps`` MoE, ``ffn_up`` MLP);
- the Qwen (1 + w) RMSNorms (layer, q/k and final norms; not the DeltaNet's gated norm) are stored as 1 + w;
- ``A_log`` is stored as ``ssm_a`` = -exp(A_log) (Nemotron-H: shape (H, 1)); ``dt_bias`` as ``ssm_dt.bias``;
  the depthwise conv weight (C, 1, K) squeezed to (C, K); Nemotron-H's D as (H, 1) and its grouped norm as
  (G, inner / G);
- Qwen3-Next's ``in_proj_qkvz`` (grouped per key head) is split into ``attn_qkv`` (all q, all k, all v) and
  ``attn_gate`` (z): exactly Qwen3.5's ``in_proj_qkv``/``in_proj_z``, so the model is built with Qwen3.5's split
  projections (``cfg.extra["gguf_split_deltanet"]``); its ``in_proj_ba`` stays grouped (``ssm_ba``) and is split
  row-wise into b and a here;
- Qwen3.5 with fewer key than value heads has its value heads reordered from grouped by key head (value head
  ``h * r + j`` reads key head ``h``) to tiled (value head ``j * Hk + h`` reads key head ``h``), consistently
  in every tensor that has a value-head axis. Rather than permute them back (impossible inside quantized blocks
  of ``out_proj``), the model reads key head ``i mod Hk`` for value head ``i``
  (``cfg.extra["gguf_v_heads_tiled"]``);
- Nemotron-H's q/k rows are permuted per head as for Llama (no RoPE, so only the names matter; undone on load);
- multi-token-prediction blocks (``nextn_predict_layers`` trailing blocks, ``mtp.*`` renamed to ``blk.{N}.*`` with
  ``nextn.eh_proj`` / ``nextn.enorm`` / ``nextn.hnorm`` / ``nextn.shared_head_norm`` for ``mtp.fc`` and the three
  norms, which get the +1 too) are kept apart in ``model.extra_weights`` under the checkpoint's ``mtp.*`` names
  (:func:`mtp_checkpoint_tensors`), where ``--speculate mtp`` finds them as it finds a safetensors head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ember.config import ModelConfig
from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.gguf.file_facts import check_layers_present, file_dtype_name
from ember.loading.gguf.reader import GGUFFile

# general.architecture -> (Ember model_type, whether q/k rows are RoPE-permuted as for llama)
HYBRID_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "qwen3next": ("qwen3_next", False),
    "qwen35": ("qwen3_5_text", False),
    "qwen35moe": ("qwen3_5_moe_text", False),
    "nemotron_h": ("nemotron_h", True),
    "nemotron_h_moe": ("nemotron_h", True),
}
_QWEN_LAYER = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z", "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a", "ssm_a": "linear_attn.A_log", "ssm_dt": "linear_attn.dt_bias",
    "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm", "ssm_out": "linear_attn.out_proj",
}
_QWEN_EXPERTS = {"ffn_gate_exps": "mlp.experts.{e}.gate_proj", "ffn_up_exps": "mlp.experts.{e}.up_proj",
                 "ffn_down_exps": "mlp.experts.{e}.down_proj"}
_QWEN_UNIT_OFFSET = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm")  # stored as 1 + w
_NEMOTRON_LAYER = {
    "attn_norm": "norm", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d", "ssm_dt": "mixer.dt_bias",
    "ssm_a": "mixer.A_log", "ssm_d": "mixer.D", "ssm_norm": "mixer.norm", "ssm_out": "mixer.out_proj",
    "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj", "attn_v": "mixer.v_proj", "attn_output": "mixer.o_proj",
    "ffn_up": "mixer.up_proj", "ffn_down": "mixer.down_proj", "ffn_gate_inp": "mixer.gate",
    "exp_probs_b": "mixer.gate.e_score_correction_bias", "ffn_up_shexp": "mixer.shared_experts.up_proj",
    "ffn_down_shexp": "mixer.shared_experts.down_proj", "ffn_latent_down": "mixer.fc1_latent_proj",
    "ffn_latent_up": "mixer.fc2_latent_proj",
}
_NEMOTRON_EXPERTS = {"ffn_up_exps": "mixer.experts.{e}.up_proj", "ffn_down_exps": "mixer.experts.{e}.down_proj"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)|blk\.(\d+)\.(ssm_a|ssm_d)")
_MTP_NAME = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorFix:
    """How one file tensor becomes its target parameter(s) beyond a rename.

    ``value`` maps the decoded float tensor (fp32) to the checkpoint's values (e.g. -exp(A_log) -> A_log);
    ``rows`` gives, per target, the rows of the file tensor it takes (None: all of them). A fix with no
    ``value`` applies to quantized blocks too (whole rows are selected). Shapes are then reshaped to the
    target's (the file squeezes or groups some vectors).
    """

    value: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: tuple[torch.Tensor | None, ...] = (None,)


def _unit_offset(w: torch.Tensor) -> torch.Tensor:
    return w - 1


def _a_log(a: torch.Tensor) -> torch.Tensor:
    """``ssm_a`` = -exp(A_log) back to A_log (in float64: the file's fp32 value round-trips to the ulp)."""
    if not bool((a < 0).all()):
        raise GGUFError("tensor ssm_a must be negative (-exp(A_log)); the file is corrupt")
    return torch.log(-a.double()).float()


def _qwen_config(gf: GGUFFile, arch: str, n_layers: int, raw: dict[str, Any]) -> None:
    """The Qwen3-Next / Qwen3.5 fields of ``raw`` (in place)."""
    key = f"{arch}.attention.recurrent_layers"
    recurrent = gf.get(key)
    if recurrent is None:  # older files: every full_attention_interval-th layer is full attention
        interval = gf.get_int(f"{arch}.full_attention_interval", 4)
        recurrent = [(i + 1) % interval != 0 for i in range(n_layers)]
    if not isinstance(recurrent, list) or len(recurrent) < n_layers:
        raise GGUFError(f"{gf.path}: metadata {key} must list one flag per layer ({n_layers}), got {recurrent!r}")
    raw["layer_types"] = ["linear_attention" if recurrent[i] else "full_attention" for i in range(n_layers)]
    for i, kind in enumerate(raw["layer_types"]):
        probe = f"blk.{i}.ssm_a" if kind == "linear_attention" else f"blk.{i}.attn_q.weight"
        if probe not in gf.tensors:
            raise GGUFError(f"{gf.path}: layer {i} is {kind} by {key} but tensor {probe!r} is missing")
    heads = gf.get_int(f"{arch}.ssm.time_step_rank", required=True)
    inner = gf.get_int(f"{arch}.ssm.inner_size", required=True)
    key_heads = gf.get_int(f"{arch}.ssm.group_count", required=True)
    if heads <= 0 or key_heads <= 0 or inner % heads or heads % key_heads:
        raise GGUFError(f"{gf.path}: ssm.inner_size {inner}, time_step_rank {heads} and group_count {key_heads} do "
                        "not describe value heads grouped over key heads")
    raw.update(linear_num_value_heads=heads, linear_value_head_dim=inner // heads, linear_num_key_heads=key_heads,
               linear_key_head_dim=gf.get_int(f"{arch}.ssm.state_size", required=True),
               linear_conv_kernel_dim=gf.get_int(f"{arch}.ssm.conv_kernel", required=True))
    raw["partial_rotary_factor"] = gf.get_int(f"{arch}.rope.dimension_count", raw["head_dim"]) / raw["head_dim"]
    n_experts = gf.get_int(f"{arch}.expert_count", 0)
    if n_experts:
        raw.update(num_experts=n_experts, num_experts_per_tok=gf.get_int(f"{arch}.expert_used_count", required=True),
                   moe_intermediate_size=gf.get_int(f"{arch}.expert_feed_forward_length", required=True),
                   norm_topk_prob=bool(gf.get(f"{arch}.expert_weights_norm", True)),
                   mlp_only_layers=[i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in gf.tensors])
        if "blk.0.ffn_up_shexp.weight" in gf.tensors:
            raw["shared_expert_intermediate_size"] = gf.get_int(f"{arch}.expert_shared_feed_forward_length",
                                                                required=True)
    elif arch != "qwen35":
        raise GGUFError(f"{gf.path}: {arch!r} needs metadata {arch}.expert_count")
    if arch == "qwen3next":
        raw["gguf_split_deltanet"] = True
    elif key_heads != heads:
        raw["gguf_v_heads_tiled"] = True


def _nemotron_config(gf: GGUFFile, arch: str, n_layers: int, raw: dict[str, Any]) -> None:
    """The Nemotron-H fields of ``raw`` (in place); each layer's block read off its tensors."""
    types = []
    for i in range(n_layers):
        has = [k for k in ("ssm_in", "attn_q", "ffn_up_exps", "ffn_up") if f"blk.{i}.{k}.weight" in gf.tensors]
        if not has:
            raise GGUFError(f"{gf.path}: layer {i} has none of ssm_in, attn_q, ffn_up_exps, ffn_up; cannot tell its "
                            "block")
        types.append({"ssm_in": "linear_attention", "attn_q": "full_attention", "ffn_up_exps": "moe",
                      "ffn_up": "mlp"}[has[0]])
    raw["layers_block_type"] = types
    kv = gf.get(f"{arch}.attention.head_count_kv")
    raw["num_key_value_heads"] = max(kv) if isinstance(kv, list) and kv else int(kv or raw["num_attention_heads"])
    heads = gf.get_int(f"{arch}.ssm.time_step_rank", required=True)
    inner = gf.get_int(f"{arch}.ssm.inner_size", required=True)
    if heads <= 0 or inner % heads:
        raise GGUFError(f"{gf.path}: ssm.inner_size {inner} is not a multiple of ssm.time_step_rank {heads}")
    raw.update(mamba_num_heads=heads, mamba_head_dim=inner // heads, n_groups=gf.get_int(f"{arch}.ssm.group_count", 1),
               ssm_state_size=gf.get_int(f"{arch}.ssm.state_size", required=True),
               conv_kernel=gf.get_int(f"{arch}.ssm.conv_kernel", required=True),
               use_conv_bias=any(n.endswith(".ssm_conv1d.bias") for n in gf.tensors),
               use_bias=any(n.endswith(".ssm_in.bias") for n in gf.tensors),
               mlp_bias=any(n.endswith((".ffn_up.bias", ".ffn_up_shexp.bias")) for n in gf.tensors),
               time_step_limit=[0.0, math.inf])  # not in the file; HF's default
    raw["rms_norm_eps"] = gf.get_float(f"{arch}.attention.layer_norm_epsilon", raw["rms_norm_eps"])
    mlp = next((i for i, t in enumerate(types) if t == "mlp"), None)
    if mlp is not None:  # feed_forward_length is per layer and, in some files, zero for MLP layers
        raw["intermediate_size"] = gf.tensor_shape(f"blk.{mlp}.ffn_up.weight")[0]
    if "moe" in types:
        raw.update(n_routed_experts=gf.get_int(f"{arch}.expert_count", required=True),
                   num_experts_per_tok=gf.get_int(f"{arch}.expert_used_count", required=True),
                   moe_intermediate_size=gf.get_int(f"{arch}.expert_feed_forward_length", required=True),
                   moe_shared_expert_intermediate_size=gf.get_int(f"{arch}.expert_shared_feed_forward_length", 0),
                   n_group=gf.get_int(f"{arch}.expert_group_count", 1),
                   topk_group=gf.get_int(f"{arch}.expert_group_used_count", 1),
                   routed_scaling_factor=gf.get_float(f"{arch}.expert_weights_scale", 1.0),
                   norm_topk_prob=bool(gf.get(f"{arch}.expert_weights_norm", True)),
                   moe_latent_size=gf.get_int(f"{arch}.moe_latent_size"))
    if mlp is None:  # no dense MLP layer (the published MoE models): the width is unused but must be positive
        raw["intermediate_size"] = raw.get("moe_intermediate_size") or raw["hidden_size"]


def hybrid_config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` of a hybrid-family GGUF file (metadata plus tensor shapes).

    Raises:
        GGUFError: metadata missing or contradicting the tensors.
        UnsupportedModelError: a layout Ember does not run.
    """
    arch = gf.architecture
    model_type, _ = HYBRID_ARCHITECTURES[arch]
    if "token_embd.weight" not in gf.tensors or len(gf.tensor_shape("token_embd.weight")) != 2:
        raise GGUFError(f"{gf.path}: tensor 'token_embd.weight' is missing or not a matrix")
    vocab, hidden = gf.tensor_shape("token_embd.weight")
    blocks = gf.get_int(f"{arch}.block_count", required=True)
    mtp = gf.get_int(f"{arch}.nextn_predict_layers", 0)
    check_layers_present(gf, blocks)
    n_layers = blocks - mtp
    if n_layers <= 0:
        raise GGUFError(f"{gf.path}: block_count {blocks} leaves no layers beside {mtp} nextn_predict_layers")
    n_head = gf.get_int(f"{arch}.attention.head_count", required=True)
    if n_head <= 0:
        raise GGUFError(f"{gf.path}: attention.head_count must be positive, got {n_head}")
    head_dim = gf.get_int(f"{arch}.attention.key_length", hidden // n_head)
    if gf.get_int(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{gf.path}: key_length != value_length is not supported")
    nemotron = arch.startswith("nemotron")  # per-layer arrays for head_count_kv and feed_forward_length
    raw: dict[str, Any] = {
        "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": n_layers,
        "num_attention_heads": n_head, "head_dim": head_dim,
        "num_key_value_heads": n_head if nemotron else gf.get_int(f"{arch}.attention.head_count_kv", n_head),
        "intermediate_size": 0 if nemotron else gf.get_int(f"{arch}.feed_forward_length", 0),
        "max_position_embeddings": gf.get_int(f"{arch}.context_length", 4096),
        "rms_norm_eps": gf.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": gf.get_float(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in gf.tensors),
        "bos_token_id": gf.get_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gf.get_int("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.get_int("tokenizer.ggml.padding_token_id"),
        "torch_dtype": file_dtype_name(gf), "gguf_file_type": gf.get_int("general.file_type"),
        "name_or_path": gf.get("general.name"), "gguf_mtp_layers": mtp,
    }
    if nemotron:
        _nemotron_config(gf, arch, n_layers, raw)
    else:
        _qwen_config(gf, arch, n_layers, raw)
    return ModelConfig.from_dict(raw, source=f"{gf.path} (metadata)")


def hybrid_tensor_map(gf: GGUFFile, cfg: ModelConfig) -> tuple[dict[str, list[str]], dict[str, TensorFix],
                                                                    list[str]]:
    """(GGUF name -> Ember parameter name(s), the :class:`TensorFix` of each tensor needing more than a rename,
    the names of the multi-token-prediction blocks' tensors, kept apart).

    Raises:
        GGUFError: a tensor whose name Ember does not know (naming the first few).
    """
    nemotron = cfg.model_type == "nemotron_h"
    layer, experts = (_NEMOTRON_LAYER, _NEMOTRON_EXPERTS) if nemotron else (_QWEN_LAYER, _QWEN_EXPERTS)
    mapping: dict[str, list[str]] = {}
    fixes: dict[str, TensorFix] = {}
    mtp: list[str] = []
    unknown: list[str] = []
    n_exp = cfg.num_local_experts
    for name in gf.tensors:
        if name in ("token_embd.weight", "output.weight", "output_norm.weight"):
            mapping[name] = [{"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                              "output_norm.weight": "model.norm.weight"}[name]]
            if name == "output_norm.weight" and not nemotron:
                fixes[name] = TensorFix(_unit_offset)
            continue
        b = _MTP_NAME.match(name)
        if b and int(b.group(1)) >= cfg.num_hidden_layers:
            mtp.append(name)
            continue
        m = _LAYER_NAME.fullmatch(name)
        if m is None:
            unknown.append(name)
            continue
        i, kind, suffix = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), None)
        prefix = f"model.layers.{i}."
        if kind in experts and suffix == "weight":
            mapping[name] = [prefix + experts[kind].format(e=e) + ".weight" for e in range(n_exp)]
        elif kind == "ssm_ba" and suffix == "weight" and not nemotron:  # grouped per key head: [b (r), a (r)] each
            r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
            idx = torch.arange(2 * cfg.linear_num_value_heads).view(cfg.linear_num_key_heads, 2, r)
            mapping[name] = [prefix + "linear_attn.in_proj_b.weight", prefix + "linear_attn.in_proj_a.weight"]
            fixes[name] = TensorFix(rows=(idx[:, 0].reshape(-1), idx[:, 1].reshape(-1)))
        elif kind in layer:
            target = layer[kind]
            if kind in ("ssm_a", "ssm_d", "ssm_dt", "exp_probs_b"):  # parameters, not modules: no .weight/.bias
                mapping[name] = [prefix + target]
            else:
                mapping[name] = [prefix + target + "." + (suffix or "weight")]
            if kind == "ssm_a":
                fixes[name] = TensorFix(_a_log)
            elif kind in _QWEN_UNIT_OFFSET and not nemotron:
                fixes[name] = TensorFix(_unit_offset)
            elif kind in ("ssm_d", "ssm_norm", "ssm_conv1d"):
                fixes[name] = TensorFix()  # reshaped only
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{gf.path}: {len(unknown)} tensor(s) Ember does not know for {gf.architecture!r}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return mapping, fixes, mtp


_NEXTN = {"nextn.eh_proj": "mtp.fc", "nextn.enorm": "mtp.pre_fc_norm_embedding",
          "nextn.hnorm": "mtp.pre_fc_norm_hidden", "nextn.shared_head_norm": "mtp.norm"}
_NEXTN_SHARED = ("nextn.embed_tokens", "nextn.shared_head_head")  # copies of the main model's


def mtp_checkpoint_tensors(gf: GGUFFile, cfg: ModelConfig, names: list[str], dtype: torch.dtype,
                           device: torch.device | str) -> dict[str, torch.Tensor]:
    """The multi-token-prediction blocks ``names`` (:func:`hybrid_tensor_map`'s third list) decoded to ``dtype``.
    Qwen3-Next / Qwen3.5 blocks are named as the HF checkpoint names them (``mtp.fc.weight``,
    ``mtp.layers.{i}.<Ember parameter>``, ...) with the converter's changes undone (norms stored as 1 + w;
    stacked experts split per expert); other tensors (Nemotron-H's blocks, kinds Ember does not know) keep their
    GGUF names."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)\.(weight|bias)", name)
        kind = m.group(2) if m and cfg.model_type != "nemotron_h" else None
        if kind in _NEXTN_SHARED:
            continue
        if kind not in _NEXTN and kind not in _QWEN_LAYER and kind not in _QWEN_EXPERTS:
            out[name] = gf.tensor(name, dtype, device)
            continue
        w = gf.tensor(name, torch.float32, device)
        w = _unit_offset(w) if kind in _QWEN_UNIT_OFFSET or kind in _NEXTN and kind != "nextn.eh_proj" else w
        prefix, suffix = f"mtp.layers.{int(m.group(1)) - cfg.num_hidden_layers}.", m.group(3)
        if kind in _NEXTN:
            out[f"{_NEXTN[kind]}.{suffix}"] = w.to(dtype)
        elif kind in _QWEN_EXPERTS:
            out.update((f"{prefix}{_QWEN_EXPERTS[kind].format(e=e)}.{suffix}", w[e].to(dtype)) for e in range(len(w)))
        else:
            out[f"{prefix}{_QWEN_LAYER[kind]}.{suffix}"] = w.to(dtype)
    return out
