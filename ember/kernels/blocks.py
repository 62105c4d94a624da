"""Decoder pieces for one token on the CPU: RMSNorm, RoPE, single-query attention, and the fused blocks.

A block is a pre-norm half decoder layer with its residual add (attention, SwiGLU MLP, or softmax-routed
mixture of experts), bound once to its weights' :class:`~ember.kernels.matmul.LinearKernel` objects in a C
struct; :func:`run_decode_layers` runs every layer's pair of blocks (and the final norm and LM head) in one
call. Which modules become blocks is decided by the runtime (:mod:`ember.runtime.blocks`), not here.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels import loader as _loader
from ember.kernels.loader import _F, _FLOAT, _P
from ember.kernels.matmul import LinearKernel, _ptr

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF-exact RMSNorm over the last axis (fp32 statistics, bf16 roundings as HF's); None when not handled."""
    if (x.dtype not in _FLOAT or weight.dtype is not x.dtype or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    H = x.shape[-1]
    lib.ember_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // H, H, eps,
                       x.dtype is torch.bfloat16, torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate ``x`` (B, T, heads, hd), contiguous, in place by ``cos``/``sin`` (B, T, hd); False when not handled."""
    if (x.dtype not in _FLOAT or cos.dtype is not x.dtype or x.device.type != "cpu" or not x.is_contiguous()
            or not cos.is_contiguous() or not sin.is_contiguous()
            or (torch.is_grad_enabled() and x.requires_grad)):
        return False
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return False
    B, T, n, hd = x.shape
    if hd % 2:
        return False
    lib.ember_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B * T, n, hd, x.dtype is torch.bfloat16)
    return True


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of one new token per row: q (B, 1, nh, hd) contiguous against k/v (B, nkv, S, hd) (views of a
    cache: any batch/head/slot strides, the last axis contiguous), ``mask`` None or bool broadcastable to
    (B, 1, 1, S), True where a key is visible -> (B, 1, nh * hd), or None when not handled.

    What ``F.scaled_dot_product_attention`` computes for a single query (scale 1/sqrt(hd)), in one call that
    reads each cached key/value row once for all query heads of its group: fp32 scores and softmax, the output
    rounded once to the model dtype. SDPA's CPU kernel has a fixed cost per call that dominates at decode sizes."""
    B, T, nh, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if (T != 1 or q.dtype not in _FLOAT or k.dtype is not q.dtype or v.dtype is not q.dtype or q.device.type != "cpu"
            or not q.is_contiguous() or k.stride(-1) != 1 or v.stride(-1) != 1 or nh % nkv
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if mask is not None:
        if mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[-1] != S or mask.shape[2] != 1:
            return None
        mask = mask.expand(B, 1, 1, S)
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return None
    out = torch.empty(B, 1, nh * hd, dtype=q.dtype)
    m_args = (mask.data_ptr(), mask.stride(0), mask.stride(3)) if mask is not None else (None, 0, 0)
    ok = lib.ember_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, nh, nkv, hd, S,
                               k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *m_args,
                               1.0 / hd ** 0.5, q.dtype is torch.bfloat16, torch.get_num_threads())
    return out if ok else None


def attn_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Attention of every query row over its own run of visible keys: q (B, T, nh, hd) contiguous, k/v as
    :func:`attn_decode`, ``mask`` bool broadcastable to (B, 1, T, S) -> (B, T, nh * hd), or None when not handled
    (also where some row's visible keys are not one contiguous run).

    Each row is :func:`attn_decode` of that query alone over just its visible keys, so its bits depend neither on
    the batch's left padding nor on the rows beside it: the scheduler's steps, plain or verifying several
    proposals per sequence, round as generate's one-token step."""
    B, T, nh, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if (q.dtype not in _FLOAT or k.dtype is not q.dtype or v.dtype is not q.dtype or q.device.type != "cpu"
            or not q.is_contiguous() or k.stride(-1) != 1 or v.stride(-1) != 1 or nh % nkv or v.shape[-1] != hd
            or mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[-1] != S or mask.shape[1] != 1
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    lib = _loader._lib if _loader._lib is not None else _loader.load()
    if lib is None:
        return None
    mask = mask.expand(B, 1, T, S)
    out = torch.empty(B, T, nh * hd, dtype=q.dtype)
    ok = lib.ember_attn_runs(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, T, nh, nkv, hd, S,
                             k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                             mask.data_ptr(), mask.stride(0), mask.stride(2), mask.stride(3),
                             1.0 / hd ** 0.5, q.dtype is torch.bfloat16, torch.get_num_threads())
    return out if ok else None


class _AttnBlockDesc(ctypes.Structure):
    """Mirror of ``AttnBlockDesc`` in cpu_api.h."""

    _fields_ = [(n, _P) for n in ("q", "k", "v", "o", "norm", "q_norm", "k_norm")] + [
        (n, ctypes.c_int64) for n in ("H", "nh", "nkv", "hd")] + [("eps", _F), ("qk_eps", _F)] + [
        ("post_norm", _P)] + [(n, ctypes.c_int64) for n in ("norm_offset", "window", "local_rope")] + [("scale", _F)] + [
        ("rot", ctypes.c_int64), ("qk_full", ctypes.c_int64), ("softcap", _F), ("v_norm", ctypes.c_int64)]


class _MlpBlockDesc(ctypes.Structure):
    """Mirror of ``MlpBlockDesc`` in cpu_api.h."""

    _fields_ = [(n, _P) for n in ("gate", "up", "down", "norm")] + [("H", ctypes.c_int64), ("F", ctypes.c_int64),
                                                                    ("eps", _F)] + [
        ("post_norm", _P), ("norm_offset", ctypes.c_int64), ("act", ctypes.c_int64), ("out_scale", _P)]


class _MoeBlockDesc(ctypes.Structure):
    """Mirror of ``MoeBlockDesc`` in cpu_api.h."""

    _fields_ = [("router", _P), ("experts", _P), ("norm", _P)] + [
        (n, ctypes.c_int64) for n in ("H", "E", "k", "F", "norm_topk")] + [("eps", _F)] + [
        ("sigmoid_router", ctypes.c_int64), ("correction", _P), ("n_group", ctypes.c_int64),
        ("topk_group", ctypes.c_int64), ("scaling", _F), ("shared", _P * 3), ("shared_F", ctypes.c_int64)]


class BlockKernel:
    """A pre-norm decoder block (attention or SwiGLU MLP, residual add included) bound to its kernels, for one
    token of one sequence: one call where the modules' forward makes 10-20 (see ``ember_attn_block`` and
    ``ember_mlp_block`` in cpu_blocks.cpp). Built by :func:`attn_block_kernel` / :func:`mlp_block_kernel` from the
    modules' own :class:`LinearKernel` objects and norm weights, which it keeps alive (``parts``)."""

    __slots__ = ("kind", "desc", "addr", "parts")

    def __init__(self, kind: str, desc: ctypes.Structure, parts: tuple) -> None:
        self.kind, self.desc, self.addr, self.parts = kind, desc, ctypes.addressof(desc), parts


def attn_block_kernel(q: LinearKernel, k: LinearKernel, v: LinearKernel, o: LinearKernel, norm: torch.Tensor,
                      eps: float, nh: int, nkv: int, hd: int, q_norm: torch.Tensor | None = None,
                      k_norm: torch.Tensor | None = None, qk_eps: float = 0.0, post_norm: torch.Tensor | None = None,
                      norm_offset: int = 0, window: int | None = None, local_rope: bool = False,
                      scale: float | None = None, rot: int | None = None, qk_full: bool = False,
                      softcap: float | None = None, v_norm: bool = False) -> BlockKernel:
    """The attention block of a decoder layer: ``x += o(attn(rope(q/k/v(rms_norm(x, norm)))))``.

    Gemma's variant: ``norm_offset`` (every norm scales by ``1 + w`` in fp32, one rounding), ``post_norm`` (the
    output normed before the add), ``window`` (keys older than that many slots hidden), ``local_rope`` (the
    second row of (2, hd) cos/sin tables), ``scale`` (the softmax scale; default ``hd ** -0.5``), ``softcap``
    (Gemma 2: logits ``cap * tanh(logit / cap)``). GLM-4.5 / MiniMax-M2: ``rot`` (RoPE on the first rot channels
    of each head, cos/sin (rot,)), ``qk_full`` (q_norm/k_norm over all heads' channels at once). Gemma 4:
    ``norm_offset`` 2 (plain-weight norms, the fp32 product rounded once), ``v_norm`` (values normed per head with
    no weight, eps ``qk_eps``)."""
    desc = _AttnBlockDesc(q=q.addr, k=k.addr, v=v.addr, o=o.addr, norm=norm.data_ptr(), q_norm=_ptr(q_norm),
                          k_norm=_ptr(k_norm), H=norm.shape[0], nh=nh, nkv=nkv, hd=hd, eps=eps, qk_eps=qk_eps,
                          post_norm=_ptr(post_norm), norm_offset=int(norm_offset), window=window or 0,
                          local_rope=int(local_rope), scale=scale or 0.0, rot=rot if rot and rot < hd else 0,
                          qk_full=int(qk_full), softcap=softcap or 0.0, v_norm=int(v_norm))
    return BlockKernel("attn", desc, (q, k, v, o, norm, q_norm, k_norm, post_norm))


def mlp_block_kernel(gate: LinearKernel | None, up: LinearKernel, down: LinearKernel, norm: torch.Tensor,
                     eps: float, gelu: bool = False, post_norm: torch.Tensor | None = None,
                     norm_offset: int = 0, out_scale: torch.Tensor | None = None) -> BlockKernel:
    """The MLP block of a decoder layer: ``x += down(silu(gate(h)) * up(h))``, ``h = rms_norm(x, norm)``; Gemma's
    GeGLU with ``gelu`` (tanh-GELU gate), ``post_norm`` on the output and (1 + w) norms with ``norm_offset`` 1;
    Nemotron-H's ``down(relu(up(h))^2)`` with ``gate`` None, its fp32 weight product norm with ``norm_offset`` 2;
    Gemma 4's ``out_scale`` (its layer scalar, one value of x's dtype) multiplying x after the add."""
    desc = _MlpBlockDesc(gate=_addr(gate), up=up.addr, down=down.addr, norm=norm.data_ptr(), H=norm.shape[0],
                         F=up.out_features, eps=eps, post_norm=_ptr(post_norm), norm_offset=int(norm_offset),
                         act=2 if gate is None else int(gelu), out_scale=_ptr(out_scale))
    return BlockKernel("mlp", desc, (gate, up, down, norm, post_norm, out_scale))


def moe_block_kernel(router: LinearKernel, experts: list[tuple[LinearKernel, LinearKernel, LinearKernel]],
                     norm: torch.Tensor, eps: float, top_k: int, norm_topk: bool, groups=None,
                     shared: tuple[LinearKernel, LinearKernel, LinearKernel] | None = None,
                     float_router: bool = True) -> BlockKernel:
    """A mixture-of-experts block (:class:`ember.models.SparseMoE` after the post-attention norm, the residual add
    included): ``experts[e]`` = expert e's (gate, up, down) kernels. GLM-4.5 / DeepSeek-V3
    (:class:`ember.models.routed_moe.RoutedMoE`): ``groups`` = (correction bias (E,) fp32, n_group, topk_group,
    routed scaling) with ``router`` an fp32 kernel (the sigmoid router), ``shared`` the shared experts' kernels;
    MiniMax-M2 (:class:`ember.models.minimax.SigmoidMoE`): ``groups`` with one group and ``float_router`` False
    (the router of x's dtype, its logits rounded to it)."""
    flat = [k for triple in experts for k in triple]
    table = (_P * len(flat))(*[k.addr for k in flat])
    corr, n_group, topk_group, scaling = groups if groups is not None else (None, 0, 0, 1.0)
    desc = _MoeBlockDesc(router=router.addr, experts=ctypes.addressof(table), norm=norm.data_ptr(), H=norm.shape[0],
                         E=len(experts), k=top_k, F=experts[0][0].out_features, norm_topk=int(norm_topk), eps=eps,
                         sigmoid_router=0 if groups is None else 1 if float_router else 2,
                         correction=_ptr(corr), n_group=n_group,
                         topk_group=topk_group, scaling=scaling,
                         shared=(_P * 3)(*[k.addr for k in shared]) if shared else (_P * 3)(),
                         shared_F=shared[0].out_features if shared else 0)
    return BlockKernel("moe", desc, (router, tuple(flat), table, norm, corr, shared))


class _GptOssMoeDesc(ctypes.Structure):
    """Mirror of ``GptOssMoeDesc`` in families.cpp."""

    _fields_ = [(n, _P) for n in ("router", "norm", "gu_blocks", "gu_scales", "gu_bias", "dn_blocks", "dn_scales",
                                  "dn_bias", "lin")] + [(n, ctypes.c_int64) for n in ("H", "E", "k", "I", "act_q8")] + [
        (n, _F) for n in ("eps", "alpha", "limit")]


def gptoss_moe_block_kernel(router: LinearKernel, norm: torch.Tensor, eps: float, top_k: int, experts,
                            expert_kernels: list[LinearKernel] | None = None) -> BlockKernel:
    """gpt-oss's MoE block after its post-attention RMSNorm (residual add included): ``router`` the router's kernel
    (its bias bound), ``experts`` an :class:`ember.quant.mxfp4.Mxfp4Experts` (blocks, scales and biases as stored;
    the biases of x's dtype) or, with ``expert_kernels`` (per expert its gate, up and down kernel: 3E), experts
    held as a GGUF file's blocks (only their biases read here)."""
    if expert_kernels is None:
        t = [experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.gate_up_proj_bias,
             experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias]
        table = None
    else:
        t = [None, None, experts.gate_up_proj_bias, None, None, experts.down_proj_bias]
        table = (_P * len(expert_kernels))(*[k.addr for k in expert_kernels])
    p = [_ptr(a) for a in t]
    desc = _GptOssMoeDesc(router=router.addr, norm=norm.data_ptr(), gu_blocks=p[0], gu_scales=p[1], gu_bias=p[2],
                          dn_blocks=p[3], dn_scales=p[4], dn_bias=p[5], lin=ctypes.cast(table, _P) if table else None,
                          H=norm.shape[0], E=experts.num_experts, k=top_k, I=experts.intermediate_size,
                          act_q8=int(_loader.INT8_ACTIVATIONS), eps=eps, alpha=experts.alpha, limit=experts.limit)
    return BlockKernel("gptoss_moe", desc, (router, norm, *t, table, tuple(expert_kernels or ())))


class _SinkAttnDesc(ctypes.Structure):
    """Mirror of ``SinkAttnDesc`` in families.cpp."""

    _fields_ = [(n, _P) for n in ("q", "k", "v", "o", "norm", "sinks")] + [
        (n, ctypes.c_int64) for n in ("H", "nh", "nkv", "hd", "window")] + [("eps", _F)]


def sink_attn_block_kernel(q: LinearKernel, k: LinearKernel, v: LinearKernel, o: LinearKernel, norm: torch.Tensor,
                           eps: float, sinks: torch.Tensor, nh: int, nkv: int, hd: int,
                           window: int | None) -> BlockKernel:
    """gpt-oss's attention block (:class:`ember.models.gpt_oss.SinkAttention` after an RMSNorm, its biases bound in
    the projections' kernels, ``sinks`` (nh,) of x's dtype); run by :func:`run_attn_block` on a full cache or on
    a sliding layer's ring of ``window`` slots."""
    desc = _SinkAttnDesc(q=q.addr, k=k.addr, v=v.addr, o=o.addr, norm=norm.data_ptr(), sinks=sinks.data_ptr(),
                         H=norm.shape[0], nh=nh, nkv=nkv, hd=hd, window=window or 0, eps=eps)
    return BlockKernel("sink_attn", desc, (q, k, v, o, norm, sinks))


class _MlaDesc(ctypes.Structure):
    """Mirror of ``MlaDesc`` in families.cpp."""

    _fields_ = [(n, _P) for n in ("q", "q_a", "q_b", "kv_a", "o", "norm", "q_a_norm", "kv_norm", "w_kvb")] + [
        (n, ctypes.c_int64) for n in ("H", "nh", "r", "dn", "dr", "dv", "q_rank", "interleaved")] + [
        (n, _F) for n in ("eps", "q_a_eps", "kv_eps", "scaling")]


def mla_block_kernel(attn, pre, ks: dict) -> BlockKernel:
    """DeepSeek's latent attention block (:class:`ember.models.mla.MLAttention` ``attn`` after the RMSNorm ``pre``,
    the absorbed decode over the latent cache), from its projections' kernels ``ks`` (``q`` or ``q_a``/``q_b``,
    ``kv_a``, ``o``) and ``kv_b_proj``'s plain weight."""
    qa = attn.q_a_layernorm if attn.q_proj is None else None
    w = attn.kv_b_proj.weight.detach()
    desc = _MlaDesc(q=_addr(ks.get("q")), q_a=_addr(ks.get("q_a")), q_b=_addr(ks.get("q_b")), kv_a=ks["kv_a"].addr,
                    o=ks["o"].addr, norm=pre.weight.data_ptr(), q_a_norm=_ptr(qa.weight if qa is not None else None),
                    kv_norm=attn.kv_a_layernorm.weight.data_ptr(), w_kvb=w.data_ptr(), H=pre.weight.shape[0],
                    nh=attn.nh, r=attn.r, dn=attn.dn, dr=attn.dr, dv=attn.dv,
                    q_rank=qa.weight.shape[0] if qa is not None else 0, interleaved=int(bool(attn.interleaved)),
                    eps=pre.eps, q_a_eps=qa.eps if qa is not None else 0.0, kv_eps=attn.kv_a_layernorm.eps,
                    scaling=attn.scaling)
    return BlockKernel("mla", desc, (tuple(ks.values()), pre.weight, qa, attn.kv_a_layernorm.weight, w))


def _addr(k: LinearKernel | None) -> int | None:
    return None if k is None else k.addr


def run_attn_block(block: BlockKernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: int) -> bool:
    """Apply an attention :class:`BlockKernel` to ``x`` (H,) in place for the token at cache slot ``pos``:
    cos/sin (hd,) of its position, k_cache/v_cache (1, nkv, max_len, hd) contiguous (its k/v written at pos)."""
    if block.kind == "mla":  # k_cache/v_cache: the latent cache's latents and rotated keys
        return bool(_loader._lib.ember_mla_block(block.addr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                                 k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2], pos,
                                                 x.dtype is torch.bfloat16, torch.get_num_threads()))
    if block.kind == "sink_attn":  # k_cache/v_cache: a full cache or a ring of `window` slots
        return bool(_loader._lib.ember_sink_attn_block(block.addr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                                       k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2], pos,
                                                       x.dtype is torch.bfloat16, torch.get_num_threads()))
    return bool(_loader._lib.ember_attn_block(block.addr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                      v_cache.data_ptr(), k_cache.shape[2], pos, x.dtype is torch.bfloat16,
                                      torch.get_num_threads()))


def run_mlp_block(block: BlockKernel, x: torch.Tensor) -> bool:
    """Apply an MLP or MoE :class:`BlockKernel` to ``x`` (H,) in place."""
    lib = _loader._lib
    fn = {"moe": lib.ember_moe_block, "gptoss_moe": lib.ember_gptoss_moe_block}.get(block.kind, lib.ember_mlp_block)
    return bool(fn(block.addr, x.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads()))


class _LayerStepDesc(ctypes.Structure):
    """Mirror of ``LayerStepDesc`` in cpu_api.h."""

    _fields_ = [("attn", _P), ("mlp", _P), ("moe", ctypes.c_int64), ("Kc", _P), ("Vc", _P), ("max_len", ctypes.c_int64),
                ("mla", ctypes.c_int64)]


class LayerSteps:
    """Every layer's (attention, MLP or MoE) :class:`BlockKernel` pair bound to its key/value cache tensors, for
    :func:`run_decode_layers`. Keeps the blocks alive, not the caches: a KV cache can be gigabytes, and its owner
    (the running request) holds it while it is used."""

    __slots__ = ("table", "addr", "n", "parts")

    def __init__(self, blocks: list[tuple[BlockKernel, BlockKernel]],
                 caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.n = len(blocks)
        self.table = (_LayerStepDesc * self.n)(*[
            _LayerStepDesc(attn=a.addr, mlp=m.addr, moe=int(m.kind == "moe"), Kc=kc.data_ptr(), Vc=vc.data_ptr(),
                           max_len=kc.shape[2], mla=int(a.kind == "mla"))
            for (a, m), (kc, vc) in zip(blocks, caches)])
        self.addr = ctypes.addressof(self.table)
        self.parts = blocks


def layer_steps(blocks: list[tuple[BlockKernel, BlockKernel]],
                caches: list[tuple[torch.Tensor, torch.Tensor]]) -> LayerSteps | None:
    """The layers' blocks with their caches (each (1, nkv, max_len, hd), contiguous, of x's dtype; a latent
    attention's latents (1, 1, max_len, r) and rotated keys (1, 1, max_len, dr)), or None where a cache is not laid
    out so."""
    for kc, vc in caches:
        if not (kc.is_contiguous() and vc.is_contiguous() and kc.shape[:3] == vc.shape[:3] and kc.dim() == 4
                and kc.shape[0] == 1 and kc.device.type == "cpu"):
            return None
    return LayerSteps(blocks, caches)


def run_decode_layers(steps: LayerSteps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                      head: "tuple | None" = None, logits: torch.Tensor | None = None) -> int:
    """Apply every layer of ``steps`` to ``x`` (H,) in place, in one call, for the token at cache slot ``pos``
    (cos/sin (hd,) of its position), then, given ``head`` = (final norm weight, its eps, the LM head's kernel[,
    norm offset, final-logit cap]), write ``logits`` (V,) = head(rms_norm(x)) (Gemma: the (1 + w) norm with offset
    1, then cap * tanh(logits / cap) where cap > 0). Returns the number of blocks applied, two a layer, plus one
    when the logits were written: the caller finishes the rest (a cache too short, a kernel that refused the dtype)."""
    norm, eps, k = head[:3] if head is not None else (None, 0.0, None)
    offset, cap = head[3:5] if head is not None and len(head) > 3 else (0, 0.0)
    if offset or cap:
        return _loader._lib.ember_decode_layers_gemma(
            steps.addr, steps.n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos, norm.data_ptr(), eps, offset, cap,
            k.addr, logits.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads())
    return _loader._lib.ember_decode_layers(steps.addr, steps.n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos,
                                    None if norm is None else norm.data_ptr(), eps, None if k is None else k.addr,
                                    None if logits is None else logits.data_ptr(), x.dtype is torch.bfloat16,
                                    torch.get_num_threads())


def run_decode_rows(steps: LayerSteps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                    head: tuple, logits: torch.Tensor) -> bool:
    """:func:`run_decode_layers` for T rows of one sequence at slots ``pos .. pos + T - 1`` (a speculative
    verification pass): ``x`` (T, H) in place, cos/sin (T, hd) or, where the step passes two tables, (T, 2, w)
    (the layers with ``local_rope`` read the second), ``logits`` (T, V) written (``head`` as run_decode_layers').
    Each row gets the bits the one-token call gives it, while each weight streams once for all rows. False where a
    kernel refused (x and the cache slots are then partly written: the caller reruns the pass from its own copy
    of x)."""
    norm, eps, k = head[:3]
    offset, cap = head[3:5] if len(head) > 3 else (0, 0.0)
    cs = 2 * cos.shape[-1] if cos.dim() == 3 else 0  # values a row of the two tables; 0: (T, hd)
    done = _loader._lib.ember_decode_rows_v(steps.addr, steps.n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos,
                                            x.shape[0], cs, norm.data_ptr(), eps, offset, cap, k.addr,
                                            logits.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads())
    return done == 2 * steps.n + 1
