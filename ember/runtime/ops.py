"""CPU kernels behind single pieces of the model definitions (the slots of :mod:`ember.models.accel`).

Each function takes what the piece's forward takes and returns None (False for ``rope_``) where it does not
apply: another device, autograd, a dtype or shape the kernels do not take, kernels switched off. The
definition then runs its own PyTorch code. The results are those of the PyTorch code (the same products,
norms and roundings; see tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ember import kernels

# set inside exact_rows(): several rows round as each alone would (a batched speculative verification pass)
_EXACT_ROWS = contextvars.ContextVar("ember_exact_rows", default=False)


@contextlib.contextmanager
def exact_rows():
    """Within it, multi-row products run ``ember_linear_rows``: each row gets the bits of a one-token step while
    each dense weight still streams once for all rows (the scheduler's verification of every sequence's
    proposals, so its greedy tokens are those of plain decoding)."""
    token = _EXACT_ROWS.set(True)
    try:
        yield
    finally:
        _EXACT_ROWS.reset(token)


def linear_kernel(m) -> "kernels.LinearKernel | None":
    """An Ember ``Linear``'s weight (and bias) bound to its CPU streaming kernel, made once
    (:func:`ember.kernels.cached_kernel`); None under autograd, off the CPU, or where the kernels are off."""
    w, b = m.weight, m.bias
    if w.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))):
        return None
    return kernels.cached_kernel(m, (w, b), lambda: kernels.dense_kernel(w, b))


def linear(m, x: torch.Tensor) -> torch.Tensor | None:
    """``Linear.forward`` on the CPU: few rows through the streaming kernel; wide bf16 products in fp32 where
    PyTorch's bf16 GEMM is emulated (:func:`ember.kernels.wide_linear`); else None (``F.linear``)."""
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        k = m.cpu_kernel()
        x2 = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
        if k is not None and x2.shape[0] > 1 and _EXACT_ROWS.get():
            y = (kernels.linear_rows([k], x2) or [None])[0]
        else:
            y = k(x2) if k is not None else None
        if y is not None:  # bias added
            return y.view(*x.shape[:-1], y.shape[-1])
    return kernels.wide_linear(x, m.weight, m.bias)


def rms_norm(m, x: torch.Tensor) -> torch.Tensor | None:
    """``RMSNorm.forward`` on the CPU in one fused op with the same roundings."""
    if x.device.type != "cpu":
        return None
    return kernels.rms_norm(x, m.weight, m.eps)


def project(x: torch.Tensor, modules) -> list[torch.Tensor] | None:
    """``[m(x) for m in modules]`` in one kernel call where every module offers a CPU kernel for x; else None.

    q/k/v and gate/up read the same activations: one call quantizes nothing twice and costs one ctypes round
    trip instead of three. A module offers one through ``cpu_kernel()`` (Ember's Linear and the quantized
    Linears do; LoRA and other wrappers do not, so they run as themselves), and never while it has forward
    hooks (they must see the call)."""
    lib = kernels.load()  # builds on first use, as every other kernel entry does: results never depend on call order
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) or len(modules) < 2 or lib is None:
        return None
    ks = []
    x2 = x.reshape(-1, x.shape[-1])
    for m in modules:
        get = getattr(m, "cpu_kernel", None)
        k = get() if get is not None and not (m._forward_hooks or m._forward_pre_hooks) else None
        if k is None or not k.accepts(x2):
            return None
        ks.append(k)
    ys = (kernels.linear_rows if _EXACT_ROWS.get() and x2.shape[0] > 1 else kernels.linear_many)(ks, x2)
    return None if ys is None else [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate q (B, T, nh, hd) and k (B, T, nkv, hd) in place by cos/sin (B, T, hd); False when not handled."""
    return q.device.type == "cpu" and kernels.rope_(q, cos, sin) and kernels.rope_(k, cos, sin)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor | None:
    """q (B, T, nh, hd) against the cached keys/values -> (B, T, nh * hd), or None for T > 1 outside
    :func:`exact_rows`. With a mask (a batch of left-padded rows) every query row attends over just its own
    visible keys (:func:`ember.kernels.attn_runs`), so a served row rounds as generate's one-token step whatever
    the padding, and a verified proposal as that token's plain step; else one query token per row
    (:func:`ember.kernels.attn_decode`)."""
    if mask is not None and (q.shape[1] == 1 or _EXACT_ROWS.get()):
        out = kernels.attn_runs(q, k, v, mask)
        if out is not None or q.shape[1] > 1:
            return out
    return kernels.attn_decode(q, k, v, mask) if q.shape[1] == 1 else None


def attention_rows(attend, qs: tuple[torch.Tensor, ...], kvs: tuple[torch.Tensor, ...],
                   mask: torch.Tensor | None) -> torch.Tensor | None:
    """``attend`` (a module's one-token attention) run for each query row alone over just its visible keys ->
    (B, T, width); None off the CPU, under autograd, for T > 1 outside :func:`exact_rows`, or where some row's
    visible keys are not one run. Like :func:`attention_decode` with a mask, a row's bits then depend neither
    on the batch's left padding nor on the rows beside it (for attention the kernels do not cover: MLA's
    latent cache)."""
    q0 = qs[0]
    B, _, T = q0.shape[:3]
    S = kvs[0].shape[2]
    if (q0.device.type != "cpu" or (torch.is_grad_enabled() and q0.requires_grad) or not (T == 1 or _EXACT_ROWS.get())
            or (mask is None and T > 1)):
        return None
    vis = torch.ones(B, T, S, dtype=torch.bool) if mask is None else mask.expand(B, 1, T, S)[:, 0].cpu()
    n = vis.sum(-1)
    lo = vis.to(torch.uint8).argmax(-1)
    hi = S - vis.flip(-1).to(torch.uint8).argmax(-1)
    if bool(((n > 0) & (hi - lo != n)).any()):
        return None
    rows = []
    for b in range(B):
        for t in range(T):
            s0, s1 = int(lo[b, t]), int(lo[b, t]) + int(n[b, t])
            if s1 == s0:  # a padding query row: no key to attend to
                rows.append(None)
                continue
            rows.append(attend(*(q[b:b + 1, :, t:t + 1] for q in qs), *(kv[b:b + 1, :, s0:s1] for kv in kvs), None)[0, 0])
    width = next(r for r in rows if r is not None)
    out = torch.stack([r if r is not None else torch.zeros_like(width) for r in rows])
    return out.view(B, T, -1)
