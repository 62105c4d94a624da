"""The Mamba-2 mixer (HF's ``NemotronHMamba2Mixer``): a selective state-space model in its SSD form.

Each of H heads keeps a (P, N) state matrix S (P channels of x, N state size). Per token, with a step
``dt = softplus(dt_raw + dt_bias)`` (> 0, clamped to ``time_step_limit``) and ``A = -exp(A_log)`` (< 0):

    S <- exp(dt A) S + dt x B^T        # decay, then write x along the token's B (N,)
    y  = S C + D x                     # read along the token's C (N,), plus a skip

B and C are shared by the H/G heads of each of G groups. Before that, x|B|C pass a causal depthwise
convolution (kernel K, bias, silu) whose last K - 1 inputs are the other piece of per-sequence state; after it,
``y`` is gated and normed per group (``norm(y * silu(gate))``) and projected back by ``out_proj``.

Prefill runs the chunked (SSD) form, :func:`chunk_scan`: tokens in chunks, the within-chunk part as one masked
matrix product, the state carried from chunk to chunk. Decode runs the one-token recurrence,
:func:`selective_state_update`, or the runtime's native kernel for it (``accel.mamba2_step``). All compute in
fp32 and give the same result to fp32 rounding.

Shapes: B batch (``Bm``/``Cm`` for the SSM's B and C), T new tokens, H heads, P head dim, G groups, N state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.hybrid_config import mamba_dims
from ember.models import accel
from ember.models.gated_deltanet import causal_conv1d
from ember.models.linear import Linear


class GroupedGatedRMSNorm(nn.Module):
    """``weight * rmsnorm(y * silu(gate))`` with the statistics taken over each of ``groups`` channel groups, in
    fp32 (HF's ``NemotronHRMSNormGated``)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(gate.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One token's recurrence, in place on ``state``. state (B, H, P, N) fp32; x (B, H, P); dt (B, H) (after
    softplus and clamp); A, D (H,); Bm, Cm (B, H, N) (already expanded from groups to heads); all fp32.
    Returns y (B, H, P)."""
    state.mul_(torch.exp(dt * A)[..., None, None]).add_((dt[..., None] * x)[..., None] * Bm[:, :, None, :])
    return (state @ Cm[..., None])[..., 0] + D[:, None] * x


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
               D: torch.Tensor, state: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD form over whole chunks (prefill); same recurrence as :func:`selective_state_update`.

    x (B, H, T, P); dt (B, H, T); A, D (H,); Bm, Cm (B, H, T, N); state (B, H, P, N); fp32. Returns (y
    (B, H, T, P), the state after the last token).

    In a chunk, with ``a_t = dt_t A`` and ``G_i`` its cumulative sum, the state after token i is
    ``exp(G_i) S0 + sum_{j<=i} exp(G_i - G_j) dt_j x_j Bm_j^T``, so

        y_i = exp(G_i) S0 Cm_i + sum_{j<=i} exp(G_i - G_j) (Cm_i . Bm_j) dt_j x_j + D x_i
        S_n = exp(G_n) S0 + sum_j exp(G_n - G_j) dt_j x_j Bm_j^T

    The sums over j are one masked (c, c) product per chunk (all chunks at once); only the carried state runs
    chunk after chunk.
    """
    Bsz, H, T, P = x.shape
    N = Bm.shape[-1]
    skip = D[:, None, None] * x
    pad = (-T) % chunk
    if pad:  # padded tokens have dt = 0: no decay, no write
        x, Bm, Cm = (F.pad(t, (0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, pad))
    n = (T + pad) // chunk
    xdt = (x * dt[..., None]).reshape(Bsz, H, n, chunk, P)
    Bm, Cm = Bm.reshape(Bsz, H, n, chunk, N), Cm.reshape(Bsz, H, n, chunk, N)
    G = (dt * A[:, None]).reshape(Bsz, H, n, chunk).cumsum(-1)  # (B, H, n, c)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    y = (Cm @ Bm.transpose(-1, -2) * decay) @ xdt  # (B, H, n, c, P) within-chunk part
    c_decayed = Cm * G[..., None].exp()  # reads S0 through the decay from the chunk start
    b_to_end = Bm * (G[..., -1:] - G).exp()[..., None]  # Bm_j carried to the chunk end
    for c in range(n):
        y[:, :, c] += c_decayed[:, :, c] @ state.transpose(-1, -2)
        state = state * G[:, :, c, -1, None, None].exp() + xdt[:, :, c].transpose(-1, -2) @ b_to_end[:, :, c]
    return y.reshape(Bsz, H, n * chunk, P)[:, :, :T] + skip, state


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer of a Nemotron-H layer (HF name ``mixer``; parameters named as in the checkpoints).

    State per sequence (:mod:`ember.cache`, kind ``recurrent``): the conv window (H P + 2 G N, K - 1) and the SSM
    state (H, P, N), both fp32.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        m = self.dims = mamba_dims(cfg)
        self.layer = layer
        H = cfg.hidden_size
        self.in_proj = Linear(H, m.inner + m.conv_dim + m.heads, bias=m.proj_bias)  # gate | x B C | dt
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.kernel, groups=m.conv_dim, bias=m.conv_bias,
                                padding=m.kernel - 1)  # its weight (C, 1, K) and bias are used
        self.dt_bias = nn.Parameter(torch.ones(m.heads))
        self.A_log = nn.Parameter(torch.zeros(m.heads))
        self.D = nn.Parameter(torch.ones(m.heads))
        self.norm = GroupedGatedRMSNorm(m.inner, m.groups, cfg.rms_norm_eps)
        self.out_proj = Linear(m.inner, H, bias=m.proj_bias)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sequence state: the conv window and the SSM state."""
        m = self.dims
        return (m.conv_dim, m.kernel - 1), (m.heads, m.head_dim, m.state)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, cache) -> torch.Tensor:
        """x (B, T, hidden); valid (B, T) bool, False at left-padding columns, or None; cache: a store with
        ``recurrent_state(layer)`` / ``set_recurrent_state(layer, states)`` (:mod:`ember.cache`) or None."""
        m = self.dims
        Bsz, T, _ = x.shape
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)  # padding must not reach the state
        gate, xbc, dt = torch.split(self.in_proj(x), [m.inner, m.conv_dim, m.heads], dim=-1)
        conv_state, state = cache.recurrent_state(self.layer) if cache is not None else (None, None)
        pad = None if valid is None else (T - valid.sum(-1)).tolist()
        xbc, conv_state = causal_conv1d(xbc.transpose(1, 2), self.conv1d.weight[:, 0], conv_state, pad,
                                        self.conv1d.bias)
        xs, Bm, Cm = torch.split(xbc.transpose(1, 2).float(), [m.inner, m.groups * m.state, m.groups * m.state], -1)
        xs = xs.reshape(Bsz, T, m.heads, m.head_dim).transpose(1, 2)  # (B, H, T, P)
        Bm, Cm = (t.reshape(Bsz, T, m.groups, m.state) for t in (Bm, Cm))  # per group
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*m.dt_limit)
        if valid is not None:
            dt = dt * valid[..., None]  # padding columns keep the state as it is (x = 0 there too)
        dt = dt.transpose(1, 2)  # (B, H, T)
        A, D = -self.A_log.float().exp(), self.D.float()
        if state is None:
            state = x.new_zeros(Bsz, m.heads, m.head_dim, m.state, dtype=torch.float32)
        state = state.float()  # the cache's own fp32 tensor: one decode step updates it in place
        step = accel.mamba2_step if T == 1 else None
        y = step(state, xs[:, :, 0], dt[:, :, 0], A, Bm[:, 0], Cm[:, 0], D) if step is not None else None
        if y is not None:
            y = y[:, :, None]
        else:
            rep = m.heads // m.groups
            Bm, Cm = (t.repeat_interleave(rep, dim=2).transpose(1, 2).contiguous() for t in (Bm, Cm))  # (B, H, T, N)
            if T == 1:
                y = selective_state_update(state, xs[:, :, 0], dt[:, :, 0], A, Bm[:, :, 0], Cm[:, :, 0], D)[:, :, None]
            else:
                y, state = chunk_scan(xs, dt, A, Bm, Cm, D, state, m.chunk)
        if cache is not None:
            cache.set_recurrent_state(self.layer, (conv_state, state))
        y = self.norm(y.transpose(1, 2).reshape(Bsz, T, m.inner), gate)  # fp32 y: normed in fp32
        return self.out_proj(y.to(x.dtype))
