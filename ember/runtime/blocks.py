"""Which pieces of a decoder layer the CPU kernels know, bound to their fused blocks.

The kernels have three fused blocks for one token of one sequence (``ember_attn_block``, ``ember_mlp_block``,
``ember_moe_block`` in cpu_blocks.cpp), each a pre-norm half-layer with its residual add:

* attention: :class:`~ember.models.attention.Attention` after an :class:`~ember.models.norms.RMSNorm`
  (grouped-query, RoPE, optional q/k norm and biases; a sliding window is handled by the caller, which
  runs the module once the window hides a cached key);
* MLP: :class:`~ember.models.mlp.MLP` (SwiGLU) after an RMSNorm;
* MoE: :class:`~ember.models.moe.SparseMoE` (softmax top-k router over SwiGLU experts) after an RMSNorm.

A piece is recognised by its exact class, so a family's new variant (a subclass with other math, or a new
class) is never mistaken for one of these: it runs as its module, and the pieces around it keep their
kernels. A piece also runs as its module where a projection has no kernel (LoRA, another device) or any
module involved has forward hooks (they must see their calls).
"""

from __future__ import annotations

import torch

from ember import kernels
from ember.models.attention import Attention
from ember.models.decoder import DecoderLayer
from ember.models.gemma import Gemma3Attention, Gemma3DecoderLayer, GeGLUMLP
from ember.models.gemma4 import Gemma4Attention, Gemma4DecoderLayer, Gemma4RMSNorm
from ember.models.gpt_oss import GptOssMLP, SinkAttention
from ember.models.mlp import MLP
from ember.models.moe import SparseMoE
from ember.models.norms import RMSNorm, UnitOffsetRMSNorm
from ember.models.nemotron_h import FloatScaleRMSNorm, NemotronHBlock, ReluSquaredMLP
from ember.models.qwen3_next import HybridDecoderLayer, new_token_valid
from ember.models.linear import Linear
from ember.models.mla import MLAttention
from ember.models.minimax import FullQKNormAttention, SigmoidMoE
from ember.models.routed_moe import PartialRopeAttention, RoutedMoE


def _hooked(*mods) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods)


def _kernels_of(projs, x2: torch.Tensor) -> list | None:
    ks = []
    for m in projs:
        get = getattr(m, "cpu_kernel", None)
        k = get() if get is not None else None
        if k is None or not k.accepts(x2):
            return None
        ks.append(k)
    return ks


def layer_blocks(layer, x: torch.Tensor, local_rope: bool = False
                 ) -> "tuple[kernels.BlockKernel, kernels.BlockKernel | None] | None":
    """``layer``'s attention block and its MLP (or MoE) block bound to the CPU kernels for x's dtype, for one
    decoding token; the MLP block None where the layer's MLP is not one the kernels know (it then runs as its
    module after the attention block), the attention block None where only the MLP has one (gpt-oss: the
    attention runs as its module first); None where the layer is not a :class:`DecoderLayer` with a known
    attention or MLP (the whole layer runs as its modules). Remade when a kernel is. ``local_rope``: the model gives
    its sliding layers their own RoPE table (the second row of the step's cos/sin)."""
    if type(layer) is Gemma3DecoderLayer:
        return _gemma_blocks(layer, x, local_rope and layer.attention_type == "sliding_attention")
    if type(layer) is Gemma4DecoderLayer:  # the step's tables: (sliding, padded to the full width; full)
        return _gemma4_blocks(layer, x) if local_rope else None
    if type(layer) is HybridDecoderLayer:
        m = _offset_mlp_block(layer, x)
        return None if m is None else (None, m)
    if type(layer) is NemotronHBlock:
        m = _relu2_block(layer, x)
        return None if m is None else (None, m)
    if type(layer) is not DecoderLayer or _hooked(layer):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    pre, post = layer.input_layernorm, layer.post_attention_layernorm
    if type(mlp) is GptOssMLP:
        a, m = _sink_attn_block(layer, x), _gptoss_moe_block(mlp, post, x)
        return None if a is None and m is None else (a, m)
    x2 = x.view(1, -1)
    ks, norms = _attn_kernels(attn, pre, x2)
    mla = _mla_kernels(attn, pre, x2) if ks is None else None
    mlp_projs = _mlp_projections(mlp)
    mks = None
    if (mlp_projs is not None and type(post) is RMSNorm and post.weight.dtype is x.dtype
            and not _hooked(mlp, post, *mlp_projs, *(mlp.experts if isinstance(mlp, SparseMoE) else ()),
                            *([mlp.gate] if type(mlp) is RoutedMoE else []))):
        mks = _kernels_of(mlp_projs, x2)
    if ks is None and mla is None and mks is None:
        return None
    routed = type(mlp) is RoutedMoE
    key = (None if ks is None else (tuple(map(id, ks)), tuple(n.weight.data_ptr() for n in norms)),
           None if mla is None else (tuple(map(id, mla.values())), attn.kv_b_proj.weight.data_ptr(),
                                     tuple(n.weight.data_ptr() for n in _mla_norms(attn, pre))),
           None if mks is None else (tuple(map(id, mks)), post.weight.data_ptr()),
           (mlp.gate.weight.data_ptr(), mlp.gate.e_score_correction_bias.data_ptr()) if routed else
           mlp.e_score_correction_bias.data_ptr() if type(mlp) is SigmoidMoE else None)

    def build():
        a = kernels.mla_block_kernel(attn, pre, mla) if mla is not None else None
        if ks is not None:
            qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
            a = kernels.attn_block_kernel(*ks, pre.weight, pre.eps, attn.nh, attn.nkv, attn.hd, qn, kn,
                                          attn.q_norm.eps if qn is not None else 0.0, window=layer.window,
                                          rot=getattr(attn, "rotary_dim", None),
                                          qk_full=type(attn) is FullQKNormAttention)
        if mks is None:
            return a, None
        if type(mlp) in (SparseMoE, SigmoidMoE):
            experts = [tuple(mks[1 + 3 * e:4 + 3 * e]) for e in range(len(mlp.experts))]
            # MiniMax-M2: sigmoid scores of the router in x's dtype, chosen with the correction bias, one group
            groups = (mlp.e_score_correction_bias.float().contiguous(), 1, 1, 1.0) if type(mlp) is SigmoidMoE else None
            return a, kernels.moe_block_kernel(mks[0], experts, post.weight, post.eps, mlp.top_k, mlp.norm_topk_prob,
                                               groups, float_router=False)
        if routed:
            return a, _routed_moe_block(mlp, mks, post)
        return a, kernels.mlp_block_kernel(*mks, post.weight, post.eps)

    return kernels.cached(layer, f"blocks-{x.dtype}", key, build)


def _attn_kernels(attn, pre, x2: torch.Tensor) -> tuple[list | None, list]:
    """The q/k/v/o kernels of a Llama-style :class:`Attention` after an RMSNorm, and its norms; None kernels where
    the attention is another class, hooked, or has no kernel (it then runs as its module)."""
    if type(attn) not in (Attention, PartialRopeAttention, FullQKNormAttention) or type(pre) is not RMSNorm:
        return None, []
    projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    norms = [pre] + ([attn.q_norm, attn.k_norm] if attn.q_norm is not None else [])
    if _hooked(attn, *projs, *norms) or any(n.weight.dtype is not x2.dtype for n in norms):
        return None, norms
    return _kernels_of(projs, x2), norms


def _mla_norms(attn, pre) -> list:
    return [pre, attn.kv_a_layernorm] + ([attn.q_a_layernorm] if attn.q_proj is None else [])


def _mla_kernels(attn, pre, x2: torch.Tensor) -> dict | None:
    """The projections' kernels of a DeepSeek :class:`MLAttention` after an RMSNorm (name -> kernel), or None
    (hooks, no kernel, a ``kv_b_proj`` that is not a plain weight of x's dtype, norms of another class or dtype)."""
    if type(attn) is not MLAttention or type(pre) is not RMSNorm or type(attn.kv_b_proj) is not Linear:
        return None
    names = {"q": attn.q_proj} if attn.q_proj is not None else {"q_a": attn.q_a_proj, "q_b": attn.q_b_proj}
    names.update(kv_a=attn.kv_a_proj_with_mqa, o=attn.o_proj)
    norms = _mla_norms(attn, pre)
    if (_hooked(attn, attn.kv_b_proj, *names.values(), *norms) or attn.kv_b_proj.weight.dtype is not x2.dtype
            or not attn.kv_b_proj.weight.is_contiguous()
            or any(type(n) is not RMSNorm or n.weight.dtype is not x2.dtype for n in norms)):
        return None
    ks = _kernels_of(list(names.values()), x2)
    return None if ks is None else dict(zip(names, ks))


def _routed_moe_block(mlp, mks: list, post) -> "kernels.BlockKernel | None":
    """GLM-4.5 / DeepSeek-V3's MoE block from its experts' (and shared experts') kernels ``mks``, with an fp32
    kernel for the router's fp32 weight."""
    gate = mlp.gate
    router = kernels.dense_kernel(gate.weight.detach())
    if router is None or gate.weight.dtype is not torch.float32:
        return None
    n = len(mlp.experts)
    experts = [tuple(mks[3 * e:3 * e + 3]) for e in range(n)]
    shared = tuple(mks[3 * n:3 * n + 3]) if mlp.shared_experts is not None else None
    corr = gate.e_score_correction_bias.float().contiguous()
    return kernels.moe_block_kernel(router, experts, post.weight, post.eps, mlp.top_k, gate.norm_topk_prob,
                                    (corr, gate.n_group, gate.topk_group, float(gate.scaling)), shared)


def _mlp_projections(mlp) -> list | None:
    """The projections of an MLP piece the kernels know, in their block's order; None for any other piece."""
    if type(mlp) is MLP:
        return [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if type(mlp) is RoutedMoE and all(type(e) is MLP for e in mlp.experts) and mlp.gate.n_group >= 1 and (
            mlp.shared_experts is None or type(mlp.shared_experts) is MLP):
        shared = mlp.shared_experts
        return [p for e in mlp.experts for p in (e.gate_proj, e.up_proj, e.down_proj)] + (
            [shared.gate_proj, shared.up_proj, shared.down_proj] if shared is not None else [])
    if type(mlp) in (SparseMoE, SigmoidMoE) and all(type(e) is MLP for e in mlp.experts):
        return [mlp.gate] + [p for e in mlp.experts for p in (e.gate_proj, e.up_proj, e.down_proj)]
    return None


# final norm class -> norm offset of the kernels' norm_rows (0 Llama's, 1 Gemma 2/3's (1 + w), 2 the fp32 weight
# product rounded once: Gemma 4's)
_HEAD_NORMS = {RMSNorm: 0, UnitOffsetRMSNorm: 1, Gemma4RMSNorm: 2}


def head_block(norm, lm_head, x: torch.Tensor, cap: float | None = None) -> "tuple | None":
    """The final norm and LM head for the whole-step call: (norm weight, eps, the head's kernel), or for Gemma's
    (1 + w) final norm or a final-logit cap (``cap``) (norm weight, eps, kernel, norm offset, cap or 0); None where
    they must run as their modules (hooks, no kernel, another norm)."""
    if norm is None or lm_head is None or _hooked(norm, lm_head):
        return None
    get = getattr(lm_head, "cpu_kernel", None)
    k = get() if get is not None else None
    if (k is not None and k.accepts(x.view(1, -1)) and type(norm) in _HEAD_NORMS and norm.weight is not None
            and norm.weight.dtype is x.dtype and norm.weight.is_contiguous()):
        offset = _HEAD_NORMS[type(norm)]
        return (norm.weight, norm.eps, k) if not (offset or cap) else (norm.weight, norm.eps, k, offset, float(cap or 0))
    return None


def _gemma_blocks(layer, x: torch.Tensor, local_rope: bool
                  ) -> "tuple[kernels.BlockKernel, kernels.BlockKernel | None] | None":
    """A Gemma 2/3 layer's blocks: sandwich (1 + w) norms, (1 + w) q/k norms, the query scale, the layer's window
    and RoPE table, Gemma 2's logit soft-capping, GeGLU. None where a piece is another class or hooked."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
             layer.post_feedforward_layernorm]
    if (type(attn) is not Gemma3Attention or _hooked(layer, attn)
            or any(type(n) is not UnitOffsetRMSNorm or n.weight.dtype is not x.dtype or n.eps != norms[0].eps
                   for n in norms)):  # a block's norms share one eps
        return None
    qk = [attn.q_norm, attn.k_norm] if attn.q_norm is not None else []
    projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    if (_hooked(*projs, *norms[:2], *qk)
            or any(type(n) is not UnitOffsetRMSNorm or n.weight.dtype is not x.dtype for n in qk)):
        return None
    x2 = x.view(1, -1)
    ks = _kernels_of(projs, x2)
    if ks is None:
        return None
    mlp_projs = [mlp.gate_proj, mlp.up_proj, mlp.down_proj] if type(mlp) is GeGLUMLP else None
    mks = _kernels_of(mlp_projs, x2) if mlp_projs is not None and not _hooked(mlp, *mlp_projs, *norms[2:]) else None
    pre, post, pre_ff, post_ff = norms
    key = (tuple(map(id, ks)), tuple(n.weight.data_ptr() for n in norms + qk), local_rope,
           None if mks is None else tuple(map(id, mks)))

    def build():
        qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if qk else (None, None)
        a = kernels.attn_block_kernel(*ks, pre.weight, pre.eps, attn.nh, attn.nkv, attn.hd, qn, kn,
                                      attn.q_norm.eps if qk else 0.0, post_norm=post.weight, norm_offset=True,
                                      window=layer.window, local_rope=local_rope, scale=attn.scaling,
                                      softcap=attn.softcap)
        if mks is None:
            return a, None
        return a, kernels.mlp_block_kernel(*mks, pre_ff.weight, pre_ff.eps, gelu=True,
                                           post_norm=post_ff.weight, norm_offset=True)

    return kernels.cached(layer, f"blocks-{x.dtype}", key, build)


def _gemma4_blocks(layer, x: torch.Tensor) -> "tuple[kernels.BlockKernel, kernels.BlockKernel] | None":
    """A dense Gemma 4 layer's blocks: plain-weight sandwich and q/k norms (norm offset 2), the weightless value
    norm, scale 1, the layer's own head size and window, values = the key projection with ``attention_k_eq_v``,
    GeGLU, the layer scalar. The full layers read the second RoPE table (see :func:`layer_blocks`). None (the layer
    runs as its modules) with per-layer inputs, shared keys/values (a layer that makes or reads them for
    another), experts, or a piece of another class or hooked."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
             layer.post_feedforward_layernorm]
    if (type(attn) is not Gemma4Attention or layer.per_layer or layer.moe or attn.shared or attn.stores
            or type(mlp) is not GeGLUMLP or _hooked(layer, attn, mlp)):
        return None
    qk = [attn.q_norm, attn.k_norm, attn.v_norm]
    if any(type(n) is not Gemma4RMSNorm or n.eps != norms[0].eps for n in norms + qk) or any(
            n.weight is None or n.weight.dtype is not x.dtype for n in norms + qk[:2]) or attn.v_norm.weight is not None:
        return None
    v_proj = attn.v_proj if attn.v_proj is not None else attn.k_proj  # k = v: the raw key projection twice
    projs = [attn.q_proj, attn.k_proj, v_proj, attn.o_proj]
    mlp_projs = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if _hooked(*projs, *mlp_projs, *norms, *qk) or layer.layer_scalar.dtype is not x.dtype:
        return None
    x2 = x.view(1, -1)
    ks, mks = _kernels_of(projs, x2), _kernels_of(mlp_projs, x2)
    if ks is None or mks is None:
        return None
    pre, post, pre_ff, post_ff = norms
    key = (tuple(map(id, ks)), tuple(map(id, mks)), tuple(n.weight.data_ptr() for n in norms + qk[:2]),
           layer.layer_scalar.data_ptr())

    def build():
        a = kernels.attn_block_kernel(*ks, pre.weight, pre.eps, attn.nh, attn.nkv, attn.hd, attn.q_norm.weight,
                                      attn.k_norm.weight, attn.q_norm.eps, post_norm=post.weight, norm_offset=2,
                                      window=layer.window, local_rope=layer.window is None, scale=1.0, v_norm=True)
        m = kernels.mlp_block_kernel(*mks, pre_ff.weight, pre_ff.eps, gelu=True, post_norm=post_ff.weight,
                                     norm_offset=2, out_scale=layer.layer_scalar)
        return a, m

    return kernels.cached(layer, f"blocks-{x.dtype}", key, build)


def mlp_half(layer, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of ``layer`` as its modules (after its attention block ran on a kernel), residual included."""
    if type(layer) is Gemma3DecoderLayer:
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
    if type(layer) is Gemma4DecoderLayer:  # a dense layer without per-layer inputs (the only ones with blocks)
        return (x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))) * layer.layer_scalar
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _sink_attn_block(layer, x: torch.Tensor) -> "kernels.BlockKernel | None":
    """gpt-oss's attention (sinks, biases, its window) after an RMSNorm, or None (hooks, no kernel, other dtypes)."""
    attn, pre = layer.self_attn, layer.input_layernorm
    projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    if (type(attn) is not SinkAttention or type(pre) is not RMSNorm or _hooked(attn, pre, *projs)
            or pre.weight.dtype is not x.dtype or attn.sinks.dtype is not x.dtype):
        return None
    ks = _kernels_of(projs, x.view(1, -1))
    if ks is None:
        return None
    key = (tuple(map(id, ks)), pre.weight.data_ptr(), attn.sinks.data_ptr())
    return kernels.cached(attn, f"sink-block-{x.dtype}", key, lambda: kernels.sink_attn_block_kernel(
        *ks, pre.weight, pre.eps, attn.sinks, attn.nh, attn.nkv, attn.hd, layer.window))


def _gptoss_moe_block(mlp, post, x: torch.Tensor) -> "kernels.BlockKernel | None":
    """gpt-oss's MoE block (router with bias; MXFP4 experts as stored, or a GGUF file's experts in their blocks)
    after an RMSNorm, or None (float experts, biases of another dtype, hooks, a projection without a kernel)."""
    from ember.quant.mxfp4 import Mxfp4Experts  # the quant package imports the models: not at module level
    from ember.loading.gguf.family_weights import GGUFGptOssExperts

    experts = mlp.experts
    gguf = type(experts) is GGUFGptOssExperts
    if ((type(experts) is not Mxfp4Experts and not gguf) or type(post) is not RMSNorm
            or post.weight.dtype is not x.dtype or _hooked(mlp, post, mlp.router, experts)
            or any(b.dtype is not x.dtype for b in (experts.gate_up_proj_bias, experts.down_proj_bias))):
        return None
    projs = [m for e in range(experts.num_experts) for m in (experts.ffn_gate_exps[e], experts.ffn_up_exps[e],
                                                              experts.ffn_down_exps[e])] if gguf else []
    if gguf and _hooked(*projs):
        return None
    ks = _kernels_of([mlp.router] + projs, x.view(1, -1))
    if ks is None:
        return None
    key = (tuple(map(id, ks)), post.weight.data_ptr(), experts.gate_up_proj_bias.data_ptr(),
           experts.down_proj_bias.data_ptr()) + (() if gguf else (experts.gate_up_proj_blocks.data_ptr(),
                                                                   experts.down_proj_blocks.data_ptr()))
    return kernels.cached(mlp, f"moe-block-{x.dtype}", key, lambda: kernels.gptoss_moe_block_kernel(
        ks[0], post.weight, post.eps, mlp.top_k, experts, ks[1:] if gguf else None))


def _offset_mlp_block(layer, x: torch.Tensor) -> "kernels.BlockKernel | None":
    """The SwiGLU MLP half of a Qwen3-Next / Qwen3.5 layer (its (1 + w) post-attention norm), or None (a mixture
    of experts, hooks, no kernel)."""
    mlp, post = layer.mlp, layer.post_attention_layernorm
    projs = [mlp.gate_proj, mlp.up_proj, mlp.down_proj] if type(mlp) is MLP else None
    if (projs is None or type(post) is not UnitOffsetRMSNorm or post.weight.dtype is not x.dtype
            or _hooked(mlp, post, *projs)):
        return None
    ks = _kernels_of(projs, x.view(1, -1))
    if ks is None:
        return None
    return kernels.cached(mlp, f"mlp-block-{x.dtype}", (tuple(map(id, ks)), post.weight.data_ptr()),
                          lambda: kernels.mlp_block_kernel(*ks, post.weight, post.eps, norm_offset=1))


def _relu2_block(layer, x: torch.Tensor) -> "kernels.BlockKernel | None":
    """A Nemotron-H MLP layer (``x + down(relu(up(norm(x)))^2)``) as an MLP block, or None (another block type,
    hooks, no kernel)."""
    mlp, norm = layer.mixer, layer.norm
    if (layer.block_type != "mlp" or type(mlp) is not ReluSquaredMLP or type(norm) is not FloatScaleRMSNorm
            or norm.weight.dtype is not x.dtype or _hooked(mlp, norm, mlp.up_proj, mlp.down_proj)):
        return None
    ks = _kernels_of([mlp.up_proj, mlp.down_proj], x.view(1, -1))
    if ks is None:
        return None
    return kernels.cached(mlp, f"mlp-block-{x.dtype}", (tuple(map(id, ks)), norm.weight.data_ptr()),
                          lambda: kernels.mlp_block_kernel(None, *ks, norm.weight, norm.eps, norm_offset=2))


def attn_half(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache) -> torch.Tensor:
    """The token-mixing half of a :class:`DecoderLayer` or a Qwen3-Next / Qwen3.5 layer as its modules (before its
    MLP block runs on a kernel), residual included; ``x`` itself for a Nemotron-H MLP layer (no mixer)."""
    if type(layer) is NemotronHBlock:
        return x
    h = layer.input_layernorm(x)
    if type(layer) is HybridDecoderLayer and layer.attention_type == "linear_attention":
        return x + layer.linear_attn(h, new_token_valid(mask, 1), cache)
    return x + layer.self_attn(h, cos, sin, mask, cache, False)
