"""One-sequence CPU decode: every layer the kernels know in one call, the rest as their modules.

:func:`forward` stands in for :meth:`ember.models.Transformer.forward` (through ``accel.model_forward``) for
one token of one sequence on the CPU with a cache that exposes its per-layer tensors (``layer_tensors``, the
static cache of :mod:`ember.cache`). It keeps each model's :class:`DecodeBlocks`: every layer's blocks
(:func:`ember.runtime.blocks.layer_blocks`) with what they were made from, checked once per session.

The step runs, in order:

1. the longest run of leading layers whose attention and MLP blocks are both known, together with the final
   norm and LM head when that run is every layer, in one ``ember_decode_layers`` call;
2. each remaining layer as its attention block (one call) and MLP block (one call), where it has them,
   else as its modules: a piece without a kernel never needs one for the model to decode correctly;
3. the final norm and LM head as their modules, where step 1 did not write the logits.

A layer with a sliding window hands it to its attention block, which reads only the window's keys. A model
whose sliding layers have their own RoPE base (Gemma 3) passes (2, hd) cos/sin tables: global then local.

Several tokens of one sequence whose every logit is asked for within a session (a speculative verification pass, up to
:data:`MAX_ROWS`; a prefill asks for the last only and runs its modules) run every layer and the head in one
``ember_decode_rows`` call where all layers have their blocks: each weight streams once for all rows,
and each row gets the bits the one-token step would give it, so greedy verification agrees with plain decoding
in bf16 too. Anything else of several tokens runs as the modules.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels
from ember.runtime import blocks as blocks_module

# Beside the models, not in them (as ember.kernels keeps its kernels): ctypes pointers cannot be deep-copied.
_decode_blocks: "weakref.WeakKeyDictionary[nn.Module, DecodeBlocks]" = weakref.WeakKeyDictionary()
MAX_ROWS = 16  # the most tokens of one sequence a call runs through the fused blocks (a verification pass)


class DecodeBlocks:
    """Every layer's :func:`~ember.runtime.blocks.layer_blocks` for one dtype, with what they were built from.

    Asking each layer again on every decode step costs module attribute lookups, hook checks and kernel-cache
    keys for each layer. :meth:`valid` re-checks the same facts in a few flat loops: each module of the layers
    is still where it was (``_modules``), holds the same tensors (``_parameters``, ``_buffers``) at the same
    storage, and has no forward hooks. Blocks made while a hook was registered are never reused: the hooked
    layers have none, and once the hook is removed they must be made.
    """

    __slots__ = ("dtype", "blocks", "head", "hooks", "dicts", "ids", "tensors", "ptrs", "hooked", "cache_layers",
                 "n_fused", "rows_window", "checked_in", "_steps", "_steps_key", "_steps_cache")

    def __init__(self, layers: nn.ModuleList, x: torch.Tensor, norm: nn.Module | None = None,
                 lm_head: nn.Module | None = None, local_rope: bool = False, cap: float | None = None) -> None:
        self.dtype = x.dtype
        self.blocks = [blocks_module.layer_blocks(layer, x, local_rope) for layer in layers]
        # leading layers with both blocks: they run in the whole-step call
        self.n_fused = next((i for i, b in enumerate(self.blocks)
                             if b is None or None in b or b[0].kind not in ("attn", "mla") or b[1].kind not in ("mlp", "moe")),
                            len(self.blocks))
        # the final norm and LM head (Gemma's: (1 + w) norm, final-logit cap), run after the layers in the same
        # kernel call: (norm weight, eps, kernel[, norm offset, cap])
        tail = [m for m in (norm, lm_head) if m is not None]
        self.head = blocks_module.head_block(norm, lm_head, x, cap) if self.n_fused == len(self.blocks) else None
        self.rows_window = _rows_window(self.blocks) if self.n_fused == len(self.blocks) else 0
        self.cache_layers = [getattr(getattr(layer, "self_attn", None), "layer", i) if b is not None else None
                             for i, (layer, b) in enumerate(zip(layers, self.blocks))]
        self.checked_in: object | None = None  # the session (see forward) they were last checked in
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

    def steps(self, cache, start: int, session: object | None = None) -> "kernels.LayerSteps | None":
        """The leading fused layers' blocks bound to their slices of ``cache`` (:func:`ember.kernels.run_decode_layers`),
        or None where there are none. Remade
        when the cache tensors move; the cache itself is not kept alive (the key is its tensors' addresses and
        shapes, enough to write into them correctly). In the session the blocks were checked in (see
        :func:`forward`), the same cache object is taken at its word: its tensors are the generation's."""
        if not self.n_fused:
            return None
        if session is not None and self._steps_cache is not None and self._steps_cache[0] is session \
                and self._steps_cache[1]() is cache:
            return self._steps
        caches = [cache.layer_tensors(i) for i in self.cache_layers[:self.n_fused]]
        key = [(k.data_ptr(), v.data_ptr(), k.shape, v.shape, k.dtype) for k, v in caches]
        if key != self._steps_key:
            self._steps, self._steps_key = kernels.layer_steps(self.blocks[:self.n_fused], caches), key
        self._steps_cache = None
        if session is not None:
            try:
                self._steps_cache = (session, weakref.ref(cache))
            except TypeError:  # a cache class without weak references: checked at every step
                pass
        return self._steps


def forward(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start: int,
            k_valid: torch.Tensor | None, last_only: bool, hidden_only: bool,
            session: object | None, local: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """The model's output for one token (or a few, :func:`_rows`) of one sequence on the CPU, or None for any other
    call (the model then runs its modules).

    Args:
        model: an :class:`ember.models.Transformer`.
        x: (1, T, H) the tokens' embeddings, T <= MAX_ROWS (see :func:`_rows` for T > 1); cos/sin (1, T, hd) their RoPE tables;
            local: the sliding layers' own (1, 1, 1, hd) cos/sin where the model has them (Gemma 3), else None.
        cache: a cache with ``layer_tensors(layer)`` and ``pos == start`` (:class:`ember.cache.StaticKVCache`).
        session: any object standing for one generation, the same at each of its calls (the engine makes one
            per generation). The caller promises that between those calls no module, parameter, buffer or
            hook of the model is added, replaced or moved to other storage; the kernel blocks are then checked
            against the modules at the session's first step only (the check touches every module's dicts and
            tensors, which the weights streamed by the step before have evicted from the CPU caches).
            None: checked at every call.
    """
    T = x.shape[1]  # more than one: a verification pass asks for every row's logits (a prefill for the last only)
    gemma4 = getattr(model.config, "model_type", None) == "gemma4_text"
    # Gemma 4's sliding layers may have a narrower head than its full layers (their table is padded below)
    if local is not None and (local[0].shape[-1] > cos.shape[-1] or not gemma4 and local[0].shape[-1] != cos.shape[-1]):
        return None
    # several rows only for a session's verification pass: a plain call's prefill keeps the modules' rounding
    if not ((T == 1 or T <= MAX_ROWS and not last_only and session is not None) and x.shape[0] == 1 and k_valid is None and x.device.type == "cpu"
            and hasattr(cache, "layer_tensors") and start == getattr(cache, "pos", None)
            and x.dtype in (torch.bfloat16, torch.float32) and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    layers = model.model.layers
    x = x.contiguous()
    decode = _decode_blocks.get(model)
    if decode is None or not (session is not None and decode.checked_in is session and x.dtype is decode.dtype
                              or decode.valid(x)):
        decode = _decode_blocks[model] = DecodeBlocks(layers, x[:, :1], model.model.norm, model.lm_head,
                                                      local is not None,
                                                      getattr(model.config, "final_logit_softcapping", None))
    decode.checked_in = session
    if T > 1:
        if local is not None:  # per row the step's two tables (see below): (T, 2, width)
            lc, ls = local[0][0, 0], local[1][0, 0]  # (T, hd_sliding)
            pad = cos.shape[-1] - lc.shape[-1]
            cos = (torch.stack([F.pad(lc, (0, pad)), cos[0]], 1) if gemma4 else torch.stack([cos[0], lc], 1))[None]
            sin = (torch.stack([F.pad(ls, (0, pad)), sin[0]], 1) if gemma4 else torch.stack([sin[0], ls], 1))[None]
        return _rows(decode, x, cos, sin, cache, start, hidden_only, session, getattr(model, "hidden_tap", None))
    cos1, sin1 = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # (hd,)
    if local is not None and gemma4:  # (2, hd_full): the sliding layers' table (zero-padded), then the full layers'
        pad = cos1.shape[-1] - local[0].shape[-1]
        cos1 = torch.cat([F.pad(local[0].reshape(-1), (0, pad)), cos1])
        sin1 = torch.cat([F.pad(local[1].reshape(-1), (0, pad)), sin1])
    elif local is not None:  # (2, hd): global, then the sliding layers' table
        cos1, sin1 = torch.stack([cos1, local[0].reshape(-1)]), torch.stack([sin1, local[1].reshape(-1)])
    first = 0  # the first layer the loop below runs
    steps = decode.steps(cache, start, session)
    if steps is not None:
        head = None if hidden_only else decode.head
        logits = torch.empty(1, 1, head[2].out_features, dtype=x.dtype) if head is not None else None
        done = kernels.run_decode_layers(steps, x, cos1, sin1, start, head, logits)
        if done > 2 * steps.n:
            if getattr(model, "hidden_tap", None) is not None:  # x holds the last layer's output
                model.hidden_tap.last = x
            return logits
        first = done // 2
        if done % 2:  # that layer's attention block ran, its MLP block did not
            x = blocks_module.mlp_half(layers[first], x)
            first += 1
    if first < len(layers):
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, 1, hd)
        masks = model.layer_masks(1, start, None, True, x.device)
    for i in range(first, len(layers)):
        layer = layers[i]
        blocks = decode.blocks[i]
        c, s = local if local is not None and layer.attention_type == "sliding_attention" else (cos, sin)
        if blocks is not None and blocks[0] is None:  # the attention as its modules, the MLP block on its kernel
            x = blocks_module.attn_half(layer, x, c, s, masks[layer.window], cache)
            if not kernels.run_mlp_block(blocks[1], x):
                x = blocks_module.mlp_half(layer, x)
            continue
        if blocks is not None:
            # a sliding layer's ring (window slots, the token at p in slot p % window) or the full buffers
            ring = getattr(cache, "rings", {}).get(decode.cache_layers[i])
            k_cache, v_cache = cache.layer_tensors(decode.cache_layers[i])
            if ((ring is not None and ring.pos == start or ring is None and start < k_cache.shape[2])
                    and kernels.run_attn_block(blocks[0], x, cos1, sin1, k_cache, v_cache, start)):
                if ring is not None:
                    ring.pos = start + 1
                if blocks[1] is None or not kernels.run_mlp_block(blocks[1], x):
                    x = blocks_module.mlp_half(layer, x)
                continue
        x = layer(x, c, s, masks[getattr(layer, "window", None)], cache, False)
    return model.finish(x, last_only, hidden_only)


def _rows(decode: DecodeBlocks, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start: int,
          hidden_only: bool, session: object | None, tap=None) -> torch.Tensor | None:
    """Logits (1, T, V) for T tokens of one sequence (a speculative verification pass) in one
    ``ember_decode_rows`` call, each row rounded as the one-token step rounds it; None (the modules run the pass)
    where not every layer has its blocks, a sliding window hides a key from the last row, or hidden states are
    asked for."""
    T = x.shape[1]
    if hidden_only or decode.head is None or decode.n_fused < len(decode.blocks) or not decode.rows_window \
            or start + T > decode.rows_window:
        return None
    steps = decode.steps(cache, start, session)
    if steps is None:
        return None
    rows = x[0].clone()  # (T, H), written in place; x stays whole for the module path if the kernels refuse
    logits = torch.empty(T, decode.head[2].out_features, dtype=x.dtype)
    if not kernels.run_decode_rows(steps, rows, cos[0].contiguous(), sin[0].contiguous(), start, decode.head, logits):
        return None
    if tap is not None:  # the rows' last layer output (the model's hidden_tap)
        tap.last = rows[None]
    return logits[None]


def _rows_window(blocks: list) -> float:
    """The slots the rows call can serve: 0 where a layer's blocks carry a variant the rows kernels do not run
    (latent attention, a relu^2 MLP), else the smallest sliding
    window (no row may see a key past it), or infinity without windows. MoE layers run the one-row MoE block per
    row, so every router variant is served; Gemma's norms, scales, soft-caps and GeGLU, partial RoPE and
    whole-projection q/k norms (GLM-4.5, MiniMax-M2) have their rows form."""
    window = float("inf")
    for attn, mlp in blocks:
        a = attn.desc
        if attn.kind == "mla":
            return 0
        if a.window:
            window = min(window, a.window)
        if mlp.kind == "mlp" and mlp.desc.act == 2:
            return 0
    return window
