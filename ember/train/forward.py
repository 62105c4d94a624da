"""The training forward pass: per-block gradient checkpointing and a chunked, fused LM loss.

:func:`hidden_states` runs :class:`ember.models.Transformer`'s own submodules (embedding, RoPE,
decoder blocks, final norm) in the same order as ``Transformer.forward``, with two things the
inference forward does not need:

* an optional per-example attention mask (packed rows: block-diagonal causal, from segment ids),
  combined with each layer's sliding window;
* gradient checkpointing at *sub-block* granularity: the attention half and the MLP half of each
  layer are checkpointed separately, so backward keeps two (B, T, H) tensors per layer and
  recomputes one half at a time. PyTorch's non-reentrant checkpoint stops recomputing as soon as
  the last tensor backward needs has been rebuilt, so the o_proj/down_proj base matmuls at the end
  of each half are never recomputed (their backward needs only their input and the frozen weight).

:func:`lm_loss_sum` computes the summed next-token cross-entropy over the target positions only,
``chunk`` rows at a time, and forms ``d loss / d hidden`` in the same pass: the (N, V) fp32 logits
(and their softmax and gradient, ~3 copies) that a plain ``F.cross_entropy(model(x))`` holds at
once never exist; peak is one (chunk, V) block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.models import DecoderLayer, Linear, Transformer, rope_cos_sin
from ember.train.data import IGNORE

# Rows of logits per loss chunk, chosen so that one fp32 (chunk, V) block is ~32 MiB.
LOSS_CHUNK_BYTES = 32 * 2**20


def _attn_half(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    return x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, None, mask is None)


def _mlp_half(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _whole_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    return layer(x, cos, sin, mask, None, mask is None)


class _CappedHead(nn.Module):
    """The LM head followed by the final soft-capping, ``cap * tanh(logits / cap)`` (Gemma)."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(h) / self.cap) * self.cap
def _halves(layer: nn.Module) -> bool:
    """Whether ``layer`` is an attention half then an MLP half (checkpointed apart); a recurrent mixer's layer
    (Qwen3.5's DeltaNet layers) or a one-block layer (Nemotron-H) runs as a whole."""
    return hasattr(layer, "self_attn") and hasattr(layer, "post_attention_layernorm")


def layer_masks(model: Transformer, T: int, segments: torch.Tensor | None,
                device: torch.device) -> dict[int | None, torch.Tensor | None]:
    """Attention mask per distinct sliding window: None = plain causal (SDPA's fast path).

    Args:
        segments: (B, T) example ids of packed rows (0 = padding), or None.
    Returns:
        window -> bool (B or 1, 1, T, T) mask, True where a query may attend to a key.
    """
    windows = {layer.window for layer in model.model.layers}
    out: dict[int | None, torch.Tensor | None] = {}
    base = None
    if segments is not None:
        from ember.train.data import attention_mask

        base = attention_mask(segments)  # (B, 1, T, T)
    for w in windows:
        if w is None or T <= w:
            out[w] = base
            continue
        q = torch.arange(T, device=device)
        band = (q[:, None] - q[None, :] < w) & (q[None, :] <= q[:, None])  # (T, T) causal within window
        out[w] = band[None, None] if base is None else base & band
    return out


def hidden_states(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor,
                  segments: torch.Tensor | None = None, grad_checkpoint: bool = False) -> torch.Tensor:
    """Final normed hidden states (B, T, H) of a training batch.

    Args:
        model: the Transformer (LoRA/quantized projections are just its submodules).
        input_ids: (B, T).
        positions: (B, T) RoPE positions (per packed example).
        segments: (B, T) example ids of packed rows, or None for one example per row.
        grad_checkpoint: recompute each half-layer in backward instead of keeping its activations.
    """
    B, T = input_ids.shape
    x = model.model.embed_tokens(input_ids)  # (B, T, H)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype, getattr(model, "rope_scale", 1.0))
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    local = None  # the sliding layers' own RoPE (Gemma 3/4)
    if getattr(model, "local_inv_freq", None) is not None:
        lc, ls = rope_cos_sin(model.local_inv_freq, positions, x.dtype)
        local = (lc[:, None], ls[:, None])
    masks = layer_masks(model, T, segments, input_ids.device)
    use_ckpt = grad_checkpoint and torch.is_grad_enabled()
    for layer in model.model.layers:
        m = masks[layer.window]
        if type(layer) is not DecoderLayer or not _halves(layer):
            # a family's own layer (sandwich norms, per-layer inputs) or a recurrent/one-block layer: as a whole
            sliding = local is not None and getattr(layer, "attention_type", None) == "sliding_attention"
            c, s = local if sliding else (cos, sin)
            x = checkpoint(_whole_layer, layer, x, c, s, m, use_reentrant=False) if use_ckpt \
                else _whole_layer(layer, x, c, s, m)
        elif use_ckpt:
            x = checkpoint(_attn_half, layer, x, cos, sin, m, use_reentrant=False)
            x = checkpoint(_mlp_half, layer, x, use_reentrant=False)
        else:
            x = _attn_half(layer, x, cos, sin, m)
            x = _mlp_half(layer, x)
    return model.model.norm(x)


class _FusedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) for a frozen (V, H) W; d/dh formed chunk by chunk in forward.

    Per chunk of rows: logits (c, V) fp32 -> e = exp(logits - max) in place -> lse; then
    d/dh = (e @ W) / sum(e) - W[t], so the softmax is never normalised over (c, V) and no one-hot
    is formed: one (c, V) fp32 block (+ its bf16 copy) is the whole working set.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):  # noqa: D102 - autograd plumbing
        n = h.shape[0]
        grad_h = torch.empty_like(h) if h.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = torch.mm(hc, w.t()).float()  # (c, V) fp32, like HF's logits.float()
            mx = logits.amax(dim=-1, keepdim=True)  # (c, 1)
            picked = logits.gather(1, tc[:, None])  # (c, 1)
            e = logits.sub_(mx).exp_()  # (c, V), in place
            z = e.sum(dim=-1, keepdim=True)  # (c, 1)
            total += (mx + z.log() - picked).sum()
            if grad_h is not None:
                gc = torch.mm(e.to(h.dtype), w).float().div_(z)  # softmax @ W, (c, H)
                gc.sub_(w[tc].float())  # minus the target rows (the one-hot term)
                grad_h[s:s + chunk] = gc
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


class _ChunkedModuleCE(torch.autograd.Function):
    """Same as :class:`_FusedLinearCE` for any head module (LoRA-wrapped, quantized, trainable)."""

    @staticmethod
    def forward(ctx, h, targets, head, chunk, *params):  # noqa: D102
        n = h.shape[0]
        grads_h = torch.empty_like(h) if h.requires_grad else None
        grads_p = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            with torch.enable_grad():
                hc = h[s:s + chunk].detach().requires_grad_(grads_h is not None)
                logits = head(hc).float()
                loss = F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
                wrt = ([hc] if grads_h is not None else []) + list(params)
                gs = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else []
            total += loss.detach()
            if grads_h is not None:
                grads_h[s:s + chunk] = gs[0]
                gs = gs[1:]
            for acc, gp in zip(grads_p, gs):
                if gp is not None:
                    acc += gp
        ctx.save_for_backward(grads_h, *grads_p)
        ctx.has_h = grads_h is not None
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        grads_h, *grads_p = ctx.saved_tensors
        gh = grads_h * g.to(grads_h.dtype) if ctx.has_h else None
        return (gh, None, None, None, *[gp * g.to(gp.dtype) for gp in grads_p])


def lm_loss_sum(model: Transformer, hidden: torch.Tensor, labels: torch.Tensor,
                chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not ``IGNORE``.

    Args:
        model: supplies ``lm_head``.
        hidden: (B, T, H) final hidden states.
        labels: (B, T) next-token ids or ``IGNORE``.
        chunk: rows per logits block (default: ~32 MiB of fp32 logits).
    Returns:
        (fp32 scalar loss sum, number of target tokens).
    """
    keep = labels != IGNORE
    h = hidden[keep]  # (n, H): only positions that carry loss reach the LM head
    t = labels[keep]
    n = int(t.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    head = model.lm_head
    V = head.out_features
    if chunk is None:
        chunk = max(8, LOSS_CHUNK_BYTES // (4 * V))
    params = [p for p in head.parameters() if p.requires_grad]
    cap = model.config.final_logit_softcapping
    if cap is not None:
        head = _CappedHead(head, cap)
    elif type(head) in (nn.Linear, Linear) and not params and head.bias is None:
        return _FusedLinearCE.apply(h, head.weight, t, chunk), n
    return _ChunkedModuleCE.apply(h, t, head, chunk, *params), n


def batch_loss_sum(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                   segments: torch.Tensor | None = None, grad_checkpoint: bool = False) -> tuple[torch.Tensor, int]:
    """(summed CE over target tokens, their count) for one micro-batch."""
    h = hidden_states(model, input_ids, positions, segments, grad_checkpoint)
    return lm_loss_sum(model, h, labels)
