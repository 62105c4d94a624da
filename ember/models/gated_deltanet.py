"""Gated DeltaNet linear attention (HF's ``Qwen3NextGatedDeltaNet`` and ``Qwen3_5GatedDeltaNet``).

Each value head keeps a fixed (dk, dv) state matrix S instead of a growing KV cache. Per token, with a decay
``a = exp(g)`` (g <= 0) and a write strength ``beta`` in (0, 1) (the delta rule):

    S <- a * S                               # forget a little
    u  = beta * (v - S^T k)                  # what S would mis-predict for k, scaled
    S <- S + k u^T                           # correct S towards v at k
    o  = S^T q

Before that, q/k/v pass a causal depthwise convolution (kernel K, silu) whose last K - 1 inputs are the other
piece of per-sequence state; after it, the heads are normed by a gated RMSNorm (``norm(o) * silu(z)``).

Prefill runs the chunked form (:func:`chunk_gated_delta_rule`): tokens in chunks of 64, each chunk's delta-rule
corrections solved as one triangular system, the state carried from chunk to chunk. Decode runs the one-token
recurrence (:func:`recurrent_gated_delta_rule`), or the runtime's native kernel for it (``accel.gated_delta_step``).
All compute in fp32 and give the same result to fp32 rounding.

Shapes: B batch, T new tokens, Hk/Hv key/value heads, dk/dv head dims, C conv channels (2 Hk dk + Hv dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.linear import Linear


class GatedRMSNorm(nn.Module):
    """RMSNorm of x (fp32 statistics), scaled by ``weight`` in x's dtype, then times ``silu(gate)`` in fp32
    (HF's ``Qwen3NextRMSNormGated``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the normalisation the FLA kernels apply to q and k)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None,
                  pad: list[int] | None = None, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution (plus ``bias`` (C,) where given) with silu, continuing from a window of
    earlier inputs.

    Args:
        x: (B, C, T) new inputs, padding columns (the first ``pad[b]`` of row b) zeroed.
        weight: (C, K) per-channel taps, the last one for the current input.
        state: (B, C, K - 1) the previous K - 1 inputs (zeros for a new sequence), or None (a new sequence).
        pad: left-padding columns per row, or None for none. A padded row's earlier inputs are moved to sit just
            before its first real column, so padding never enters a real token's window.
    Returns:
        (silu(conv) (B, C, T), the new (B, C, K - 1) window: the last K - 1 real inputs of each row).
    """
    B, C, T = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    seq = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K - 1 + T)
    if pad is not None and any(pad):
        seq = seq.clone()
        for b, p in enumerate(pad):
            if p:  # [state, 0 * p, real] -> [0 * p, state, real]
                seq[b] = torch.cat([x.new_zeros(C, p), state[b].to(x.dtype), x[b, :, p:]], dim=-1)
    # K shifted multiply-adds in fp32 (PyTorch's depthwise bf16 convolution on the CPU costs tens of ms per call)
    w = weight.float()
    out = seq[:, :, :T].float() * w[:, 0, None]  # (B, C, T)
    for j in range(1, K):
        out += seq[:, :, j:j + T].float() * w[:, j, None]
    if bias is not None:
        out += bias.float()[:, None]
    return F.silu(out).to(x.dtype), seq[:, :, -(K - 1):] if K > 1 else seq[:, :, :0]


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token (decode). q, k (B, H, T, dk) normed and q scaled; v (B, H, T, dv); g, beta
    (B, H, T); state (B, H, dk, dv); all fp32. Returns (outputs (B, H, T, dv), new state)."""
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        kt = k[:, :, t]  # (B, H, dk)
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, kt))
        state = state + kt[..., None] * u[..., None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, t])
    return out, state


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule over whole chunks of tokens (prefill); same arguments and result as
    :func:`recurrent_gated_delta_rule`.

    Within a chunk of n tokens, with G_i the cumulative log decay up to token i and S0 the state before the
    chunk, the state after token i is ``exp(G_i) S0 + sum_{j<=i} exp(G_i - G_j) k_j u_j^T``. Putting that into
    ``u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i)`` gives a unit lower-triangular system for all u at once:

        (I + A) U = beta V - (beta exp(G) K) S0,   A_ij = beta_i exp(G_i - G_j) k_i.k_j  (j < i)

    so ``U = Wv - Wk S0`` with Wv, Wk from one triangular solve each (independent of S0: every chunk in
    parallel). Then each chunk in turn: ``o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j``
    and ``S_n = exp(G_n) S0 + sum_j exp(G_n - G_j) k_j u_j^T``.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:  # padded tokens have k = 0, beta = 0, g = 0: they change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)

    G = g.cumsum(-1)  # (B, H, n, c)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2) * decay).tril(-1)  # strictly lower
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    Wv = torch.linalg.solve_triangular(eye + A, v * beta[..., None], upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(eye + A, kb * G[..., None].exp(), upper=False, unitriangular=True)
    qk = q @ k.transpose(-1, -2) * decay  # (B, H, n, c, c), zero above the diagonal
    q_decayed = q * G[..., None].exp()  # reads S0 through the decay from the chunk start
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # k_j carried to the chunk end
    out = torch.empty_like(v)
    for c in range(n):
        u = Wv[:, :, c] - Wk[:, :, c] @ state  # (B, H, c, dv)
        out[:, :, c] = q_decayed[:, :, c] @ state + qk[:, :, c] @ u
        state = state * G[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ u
    return out.reshape(B, H, n * chunk, dv)[:, :, :T], state


class GatedDeltaNet(nn.Module):
    """The linear-attention mixer of a Qwen3-Next / Qwen3.5 layer, named ``linear_attn`` as in HF.

    ``split_projections`` picks the checkpoint layout: Qwen3.5's ``in_proj_qkv``/``in_proj_z``/``in_proj_b``/
    ``in_proj_a``, or Qwen3-Next's ``in_proj_qkvz``/``in_proj_ba`` (grouped per key head: for each key head its
    q, k, then the v and z of its Hv/Hk value heads; b and a likewise).

    State per sequence (:mod:`ember.cache`, kind ``recurrent``): the conv window (C, K - 1) and the delta-rule
    matrix (Hv, dk, dv), both kept in fp32.
    """

    def __init__(self, cfg: ModelConfig, layer: int, split_projections: bool) -> None:
        super().__init__()
        self.layer = layer
        self.window = None
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        self.split_projections = split_projections
        # value head i reads key head i // r (HF's grouped order) or, in llama.cpp's GGUF files of Qwen3.5, i % Hk
        self.v_heads_tiled = bool(cfg.extra.get("gguf_v_heads_tiled"))
        H = cfg.hidden_size
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False,
                                padding=self.kernel - 1)  # only its weight (C, 1, K) is used
        if split_projections:
            self.in_proj_qkv = Linear(H, self.conv_dim, bias=False)
            self.in_proj_z = Linear(H, self.value_dim, bias=False)
            self.in_proj_b = Linear(H, self.nv, bias=False)
            self.in_proj_a = Linear(H, self.nv, bias=False)
        else:
            self.in_proj_qkvz = Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = Linear(H, 2 * self.nv, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, H, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sequence state: the conv window and the delta-rule matrices."""
        return (self.conv_dim, self.kernel - 1), (self.nv, self.dk, self.dv)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, H) -> conv input (B, T, C) in q|k|v order, z (B, T, Hv, dv), b and a (B, T, Hv)."""
        B, T, _ = x.shape
        if self.split_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(B, T, self.nv, self.dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).view(B, T, self.nk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = torch.split(self.in_proj_ba(x).view(B, T, self.nk, 2 * r), [r, r], dim=-1)
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        return mixed, z.reshape(B, T, self.nv, self.dv), b.reshape(B, T, self.nv), a.reshape(B, T, self.nv)

    def _per_value_head(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, Hk, dk) -> (B, T, Hv, dk): each value head's key head."""
        r = self.nv // self.nk
        return t.repeat(1, 1, r, 1) if self.v_heads_tiled else t.repeat_interleave(r, dim=2)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, cache) -> torch.Tensor:
        """x (B, T, H); valid (B, T) bool, False at left-padding columns, or None; cache: a store with
        ``recurrent_state(layer)`` / ``set_recurrent_state(layer, states)`` (:mod:`ember.cache`) or None."""
        B, T, _ = x.shape
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)  # padding must not reach the state
        mixed, z, b, a = self._project(x)
        conv_state, state = cache.recurrent_state(self.layer) if cache is not None else (None, None)
        pad = None if valid is None else (T - valid.sum(-1)).tolist()
        mixed, conv_state = causal_conv1d(mixed.transpose(1, 2), self.conv1d.weight[:, 0], conv_state, pad)
        q, k, v = torch.split(mixed.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = self._per_value_head(l2norm(q.reshape(B, T, self.nk, self.dk).float())) * self.dk ** -0.5
        k = self._per_value_head(l2norm(k.reshape(B, T, self.nk, self.dk).float()))
        v = v.reshape(B, T, self.nv, self.dv).float()
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # log decay <= 0
        if valid is not None:
            g = g * valid[..., None]  # padding columns keep the state as it is (k = 0 there too)
        q, k, v, g, beta = (t.transpose(1, 2) for t in (q, k, v, g, beta))  # heads first
        if state is None:
            state = torch.zeros(B, self.nv, self.dk, self.dv, dtype=torch.float32, device=x.device)
        state = state.float()  # the cache's own fp32 tensor: the native decode step updates it in place
        step = accel.gated_delta_step if T == 1 else None
        out = step(state, q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0]) if step is not None else None
        if out is not None:
            out = out[:, :, None]
        else:
            rule = recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
            out, state = rule(q, k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), state)
        if cache is not None:
            cache.set_recurrent_state(self.layer, (conv_state, state))
        out = self.norm(out.transpose(1, 2).to(x.dtype), z)  # (B, T, Hv, dv)
        return self.out_proj(out.reshape(B, T, self.value_dim))
