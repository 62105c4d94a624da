"""The one decoder-only transformer: RMSNorm, RoPE (+scaling), GQA attention, SwiGLU MLP, MoE block.

Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE are this module with different
:class:`ModelConfig` fields. Submodule names equal HF's (``model.layers.3.self_attn.q_proj``) so
checkpoints and PEFT adapters load with no name map; MoE layers use the Qwen3-MoE names for every
family (``mlp.gate``, ``mlp.experts.5.gate_proj``), and :mod:`ember.loading.moe` maps Mixtral's
``block_sparse_moe.experts.5.w1`` and transformers-5's fused 3-D expert tensors onto them.
Every projection, each expert's included, is a plain ``nn.Linear``: quantization, LoRA and
streaming swap that module and nothing here branches on them (DESIGN principle 3).

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, nh/nkv query/kv heads, hd head dim,
N = B*T tokens, E experts, k experts per token.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels
from ember.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled in the model dtype (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = kernels.rms_norm(x, self.weight, self.eps)  # one fused op for inference, same roundings
            if y is not None:
                return y
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse RoPE frequencies, (hd/2,) fp32, including ``linear`` and ``llama3`` scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated smoothly (Meta's reference formulation).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig rejects these earlier


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` (B, T) -> two (B, T, hd) tensors in ``dtype``."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2) fp32, exact product like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hd) by cos/sin (B, 1, T, hd) in the half-split layout HF uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row CPU products use Ember's streaming kernels.

    Decode multiplies a few activation rows by each weight, so its time is the weight streaming
    from DRAM: :func:`ember.kernels.dense` streams bf16/fp32 weights about 2x faster than ``F.linear``
    on one row (45 vs 15-20 GB/s on a 2-core AVX512 EPYC; 15-25 vs 7-13 on a 2-core Xeon). Larger M
    (prefill), autograd, other dtypes and devices use ``F.linear``. Being a subclass, it is still the swap point for quantization and LoRA.
    """

    def cpu_kernel(self) -> "kernels.LinearKernel | None":
        """This weight (and bias) bound to Ember's CPU kernel, made once (:func:`ember.kernels.cached_kernel`);
        None under autograd, off the CPU, or where the kernels are off."""
        w, b = self.weight, self.bias
        if w.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))):
            return None
        return kernels.cached_kernel(self, (w, b), lambda: kernels.dense_kernel(w, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            k = self.cpu_kernel()
            y = k(x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])) if k is not None else None
            if y is not None:  # bias added
                return y.view(*x.shape[:-1], y.shape[-1])
        y = kernels.wide_linear(x, self.weight, self.bias)  # in fp32 where bf16 GEMMs are emulated (prefill)
        return y if y is not None else F.linear(x, self.weight, self.bias)


class KVStore(Protocol):
    """What attention needs from a KV cache (see :mod:`ember.kv_cache`)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, nkv, T, hd) at the current slots; return all keys/values (B, nkv, S, hd)."""
        ...


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm (Qwen3) and qkv bias (Qwen2)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias
        o_bias = cfg.attention_bias and not cfg.qkv_bias_only
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVStore | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = kernels.project(x, (self.q_proj, self.k_proj, self.v_proj))  # one CPU kernel call in decode
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if x.device.type == "cpu" and kernels.rope_(q, cos[:, 0], sin[:, 0]) and kernels.rope_(k, cos[:, 0], sin[:, 0]):
            q_rows = q  # (B, T, nh, hd)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # rotated in place (inference): (B, n, T, hd)
            if T == 1 and cache is not None:  # decode on CPU: one fused call over the cache's keys/values
                k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
                cache = None
                out = kernels.attn_decode(q_rows, k, v, mask)  # (B, 1, nh * hd)
                if out is not None:
                    return self.o_proj(out)
        else:
            q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
            k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        rep = self.nh // self.nkv
        if T == 1 and rep > 1:
            # One query token: fold the query heads of each group into the "time" axis so the
            # kernel reads each cached k/v once instead of materialising repeat_kv copies.
            qg = q.view(B, self.nkv, rep, self.hd)  # (B, nkv, rep, hd)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
            out = out.reshape(B, self.nh, 1, self.hd)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, enable_gqa=rep > 1
            )
        out = out.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Also one expert of :class:`SparseMoE`."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or cfg.intermediate_size
        self.gate_proj = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = kernels.project(x, (self.gate_proj, self.up_proj))  # one CPU kernel call in decode
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts (Mixtral, Qwen3-MoE), routed as HF does.

    Router: ``softmax(gate(x))`` in fp32, keep the top ``k`` probabilities, renormalise them to sum
    to 1 when ``norm_topk_prob`` (always for Mixtral). Each token's output is the weighted sum of
    its k experts' outputs. Experts are an ``nn.ModuleList`` of :class:`MLP`, so quantization and
    LoRA swap their ``Linear`` modules like any other.

    Only the selected experts run, so a decode step reads k of the E experts' weights: one token
    calls its k experts directly; several tokens are grouped by expert (a sort) so each selected
    expert runs one matmul over all of its tokens. Reading the routing result on the host costs
    one device sync per MoE layer on CUDA.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert ids for tokens x (N, H) -> ((N, k) fp32, (N, k) int64)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (N, k), descending
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, ids = self.route(x)
        if x.shape[0] == 1:
            # Decode: one token, its k experts only; their outputs are combined by one fp32 mv.
            ys = torch.stack([self.experts[e](x)[0] for e in ids[0].tolist()], dim=-1)  # (H, k)
            return torch.mv(ys.float(), weights[0]).to(x.dtype).view(shape)
        # Prefill / batches: sort the N*k (token, expert) pairs by expert; one matmul per expert.
        flat = ids.flatten()  # (N*k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token = order // self.top_k  # token of each sorted pair
        w = weights.flatten()[order]  # (N*k,)
        xs = x[token]  # (N*k, H) tokens gathered in expert order
        out = torch.zeros_like(x)
        begin = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(begin, begin + n)
            begin += n
            y = self.experts[e](xs[sl]) * w[sl, None]  # (n, H) fp32
            out.index_add_(0, token[sl], y.to(x.dtype))
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.window = cfg.layer_window(layer)
        self.self_attn = Attention(cfg, layer)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, is_causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))

    def block_kernels(self, x: torch.Tensor) -> "tuple[kernels.BlockKernel, kernels.BlockKernel] | None":
        """This layer's attention block and MLP (or mixture-of-experts) block bound to CPU kernels for x's dtype, for one
        decoding token (:meth:`Transformer.forward`); None where a projection has no kernel (LoRA, another
        device) or any module involved has forward hooks (they must see their calls). Remade when a kernel is."""
        attn, mlp = self.self_attn, self.mlp
        moe = isinstance(mlp, SparseMoE)
        projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        norms = [self.input_layernorm, self.post_attention_layernorm]
        if attn.q_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        if moe:
            projs.append(mlp.gate)
            for e in mlp.experts:
                projs += [e.gate_proj, e.up_proj, e.down_proj]
            hooked = [*mlp.experts]
        else:
            projs += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            hooked = []
        for m in [self, attn, mlp, *hooked, *projs, *norms]:
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        x2 = x.view(1, -1)
        ks = []
        for m in projs:
            get = getattr(m, "cpu_kernel", None)
            k = get() if get is not None else None
            if k is None or not k.accepts(x2):
                return None
            ks.append(k)
        if any(n.weight.dtype is not x.dtype for n in norms):
            return None
        key = (tuple(map(id, ks)), tuple(n.weight.data_ptr() for n in norms))

        def build():
            qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
            a = kernels.attn_block_kernel(*ks[:4], self.input_layernorm.weight, self.input_layernorm.eps, attn.nh,
                                          attn.nkv, attn.hd, qn, kn, attn.q_norm.eps if qn is not None else 0.0)
            post = self.post_attention_layernorm
            if moe:
                experts = [tuple(ks[5 + 3 * e:8 + 3 * e]) for e in range(len(mlp.experts))]
                return a, kernels.moe_block_kernel(ks[4], experts, post.weight, post.eps, mlp.top_k, mlp.norm_topk_prob)
            return a, kernels.mlp_block_kernel(*ks[4:], post.weight, post.eps)

        return kernels.cached(self, f"blocks-{x.dtype}", key, build)


# Beside the models, not in them (as ember.kernels keeps its kernels): ctypes pointers cannot be deep-copied.
_decode_blocks: "weakref.WeakKeyDictionary[Transformer, DecodeBlocks]" = weakref.WeakKeyDictionary()


class DecodeBlocks:
    """Every layer's :meth:`DecoderLayer.block_kernels` for one dtype, with what they were built from.

    Asking each layer again on every decode step cost ~55 us a layer (1.2 ms of a 28 ms int4 step of a 22-layer
    model): module attribute lookups, hook checks and kernel-cache keys. :meth:`valid` re-checks the same facts in
    a few flat loops: each module of the layers is still where it was (``_modules``), holds the same tensors
    (``_parameters``, ``_buffers``) at the same storage, and has no forward hooks. Blocks made while a hook was
    registered are never reused: the hooked layers have none, and once the hook is removed they must be made.
    """

    __slots__ = ("dtype", "blocks", "head", "hooks", "dicts", "ids", "tensors", "ptrs", "hooked", "cache_layers",
                 "window", "checked_in", "_steps", "_steps_key", "_steps_cache")

    def __init__(self, layers: nn.ModuleList, x: torch.Tensor, norm: RMSNorm | None = None,
                 lm_head: nn.Module | None = None) -> None:
        self.dtype = x.dtype
        self.blocks = [layer.block_kernels(x) for layer in layers]
        # the final norm and LM head, run after the layers in the same kernel call: (norm weight, eps, kernel)
        self.head = None
        tail = [m for m in (norm, lm_head) if m is not None]
        if norm is not None and lm_head is not None and not any(m._forward_hooks or m._forward_pre_hooks for m in tail):
            get = getattr(lm_head, "cpu_kernel", None)
            k = get() if get is not None else None
            if (k is not None and k.accepts(x.view(1, -1)) and type(norm) is RMSNorm
                    and norm.weight.dtype is x.dtype and norm.weight.is_contiguous()):
                self.head = (norm.weight, norm.eps, k)
        self.cache_layers = [layer.self_attn.layer for layer in layers]
        # the smallest sliding window of the layers: from that slot on, some layer needs its mask (the module path)
        self.window = min((layer.window for layer in layers if layer.window is not None), default=None)
        self.checked_in: object | None = None  # the session (Transformer.forward) they were last checked in
        self._steps: kernels.LayerSteps | None = None
        self._steps_key: list | None = None
        self._steps_cache: tuple[object, weakref.ref] | None = None  # (session, the cache of the steps in it)
        # the ModuleList too (a replaced layer is a changed slot of its dict), and the final norm and head
        mods = list(layers.modules()) + [m for t in tail for m in t.modules()]
        self.hooks = [d for m in mods for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.hooked = any(self.hooks)
        # the non-empty child/parameter/buffer dicts and the ids of their values: a swapped submodule, a
        # re-assigned parameter or buffer
        self.dicts = [d for m in mods for d in (m._modules, m._parameters, m._buffers) if d]
        self.ids = self._ids()
        self.tensors = [t for d in self.dicts for t in d.values() if isinstance(t, torch.Tensor)]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))

    def _ids(self) -> list[int]:
        return list(map(id, itertools.chain.from_iterable(map(dict.values, self.dicts))))

    def valid(self, x: torch.Tensor) -> bool:
        """Whether the layers are as they were when these blocks were made (and x has their dtype)."""
        return (x.dtype is self.dtype and not self.hooked and not any(self.hooks) and self._ids() == self.ids
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)

    def steps(self, cache: "KVStore", start: int, session: object | None = None) -> "kernels.LayerSteps | None":
        """Every layer's blocks bound to its slice of ``cache`` (:func:`ember.kernels.run_decode_layers`), or None
        where a layer has no blocks or a sliding window already hides slot 0 from the token at ``start``. Remade
        when the cache tensors move; the cache itself is not kept alive (the key is its tensors' addresses and
        shapes, enough to write into them correctly). In the session the blocks were checked in (see
        :meth:`Transformer.forward`), the same cache object is taken at its word: its tensors are the generation's."""
        if self.window is not None and start >= self.window or None in self.blocks:
            return None
        if session is not None and self._steps_cache is not None and self._steps_cache[0] is session \
                and self._steps_cache[1]() is cache:
            return self._steps
        caches = [cache.layer_tensors(i) for i in self.cache_layers]
        key = [(k.data_ptr(), v.data_ptr(), k.shape, v.shape, k.dtype) for k, v in caches]
        if key != self._steps_key:
            self._steps, self._steps_key = kernels.layer_steps(self.blocks, caches), key
        self._steps_cache = None
        if session is not None:
            try:
                self._steps_cache = (session, weakref.ref(cache))
            except TypeError:  # a cache class without weak references: checked at every step
                pass
        return self._steps


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm; named ``model`` inside :class:`Transformer` as in HF."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_mask(
    q_slots: torch.Tensor, k_valid: torch.Tensor | None, n_keys: int, window: int | None
) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S): True where a query may attend to a key.

    Args:
        q_slots: (T,) cache slot of each new token (slots are shared across the batch; rows
            shorter than the longest are left-padded, so slot distance == position distance).
        k_valid: (B, S) False at padding slots, or None when there is no padding.
        n_keys: S, number of key slots attended over.
        window: sliding-window size (keys with q - k >= window are hidden), or None.
    """
    k_slots = torch.arange(n_keys, device=q_slots.device)
    allowed = k_slots[None, :] <= q_slots[:, None]  # (T, S) causal
    if window is not None:
        allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :n_keys]
    return allowed


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` runs T new tokens per row against an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE frequencies are derived, not stored in checkpoints; (re)made by reset_rope().
        self.register_buffer("inv_freq", rope_inv_freq(cfg, "cpu" if _on_meta() else None), persistent=False)
        self._windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: (w is not None, w or 0))

    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads per sequence, from the tensors this model holds.

        Counts every parameter and persistent buffer at its stored size (a quantized Linear's packed
        weights and scales as they are), except: the embedding table contributes one row (all of it
        when tied to the LM head, which reads it whole), and each MoE layer contributes
        ``num_experts_per_tok`` of its experts (k/E of their bytes). KV-cache reads are excluded.
        For an unquantized model this equals ``config.decode_bytes_per_token(element size)``.
        """
        cfg = self.config
        seen: set[int] = set()
        total = 0.0
        for name, t in self.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            if ".mlp.experts." in name:
                nbytes *= cfg.num_experts_per_tok / cfg.num_local_experts
            elif name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
                nbytes /= cfg.vocab_size
            total += nbytes
        return round(total)

    def reset_rope(self) -> None:
        """Recompute RoPE frequencies on the device of the weights (after a meta-device build)."""
        self.inv_freq = rope_inv_freq(self.config, self.model.norm.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: "KVStore | None" = None,
        start: int = 0,
        k_valid: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        session: object | None = None,
    ) -> torch.Tensor:
        """Run new tokens through the model.

        Args:
            input_ids: (B, T) token ids.
            positions: (B, T) RoPE positions; default ``start + arange(T)`` for every row.
            cache: KV cache written at slots ``start .. start+T-1``; None for a cache-free pass.
            start: first cache slot of the new tokens (the number of slots already filled).
            k_valid: (B, S_max) bool, False at left-padding slots; None when no row is padded.
            last_only: return logits for the last position only (B, 1, V): prefill for generation.
            hidden_only: return the final normed hidden states (B, T, H) instead of logits.
            session: any object standing for one generation, the same at each of its calls (the engine makes one
                per generation). The caller promises that between those calls no module, parameter, buffer or
                hook of the model is added, replaced or moved to other storage; one-sequence CPU decode then
                checks its kernel blocks against the modules at the session's first step only. The check
                touches ~1,400 Python objects (modules' dicts, tensors) that the weights streamed by the step
                before have evicted from the caches: ~0.5 ms of a 1.1B int4 model's 18 ms step on a 2-core
                Zen 4. None: checked at every call.
        Returns:
            logits (B, T or 1, V) in the model dtype.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(start, start + T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, T, hd)
        # One token of one sequence on the CPU (decode): all layers (and the final norm and LM head) in one kernel
        # call where their modules allow (DecoderLayer.block_kernels), the same products, norms and roundings as
        # their forward; a layer the call leaves runs in one or two calls, or as its modules.
        fast = (T == 1 and B == 1 and k_valid is None and x.device.type == "cpu" and hasattr(cache, "layer_tensors")
                and start == getattr(cache, "pos", None) and x.dtype in (torch.bfloat16, torch.float32)
                and not (torch.is_grad_enabled() and x.requires_grad))
        first = 0  # the first layer the loop below runs
        layers = self.model.layers
        if fast:
            x = x.contiguous()
            cos1, sin1 = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # (hd,)
            decode = _decode_blocks.get(self)
            if decode is None or not (session is not None and decode.checked_in is session and x.dtype is decode.dtype
                                      or decode.valid(x)):
                decode = _decode_blocks[self] = DecodeBlocks(layers, x, self.model.norm, self.lm_head)
            decode.checked_in = session
            steps = decode.steps(cache, start, session)
            if steps is not None:
                head = None if hidden_only else decode.head
                logits = torch.empty(1, 1, head[2].out_features, dtype=x.dtype) if head is not None else None
                done = kernels.run_decode_layers(steps, x, cos1, sin1, start, head, logits)
                if done > 2 * steps.n:
                    return logits
                first = done // 2
                if done % 2:  # that layer's attention block ran, its MLP block did not
                    layer = layers[first]
                    x = x + layer.mlp(layer.post_attention_layernorm(x))
                    first += 1
        if first < len(layers):
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
            n_keys = start + T if cache is not None else T
            # Masks: one per distinct window; None lets SDPA take its fastest path.
            masks: dict[int | None, torch.Tensor | None] = {}
            q_slots = torch.arange(start, start + T, device=device)
            for w in self._windows:
                if k_valid is None and (w is None or n_keys <= w) and (T == 1 or start == 0):
                    masks[w] = None  # plain causal (prefill from slot 0) or full (single decode token)
                else:
                    masks[w] = build_mask(q_slots, k_valid, n_keys, w)
            is_causal = T > 1
        for i in range(first, len(layers)):
            layer = layers[i]
            if fast and (layer.window is None or start < layer.window):
                blocks = decode.blocks[i]
                k_cache, v_cache = cache.layer_tensors(layer.self_attn.layer) if blocks is not None else (None, None)
                if (blocks is not None and start < k_cache.shape[2]
                        and kernels.run_attn_block(blocks[0], x, cos1, sin1, k_cache, v_cache, start)):
                    if not kernels.run_mlp_block(blocks[1], x):
                        x = x + layer.mlp(layer.post_attention_layernorm(x))
                    continue
            x = layer(x, cos, sin, masks[layer.window], cache, is_causal)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if hidden_only:
            return x
        return self.lm_head(x)


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"
