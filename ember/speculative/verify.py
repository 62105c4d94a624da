"""Checking proposed tokens against the target model's distributions (one verification pass's logits).

Greedy: the proposals are kept up to the first one that differs from the target's argmax, and the target's
argmax at that place follows them, so the output is the plain greedy output token for token.

Sampling: the rejection rule of Leviathan et al. / Chen et al. (2023). Proposal ``x_i`` drawn from ``q_i`` is
kept with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the token is drawn from
``norm(max(0, p_i - q_i))``; when every proposal is kept one more token is drawn from ``p_{k}``. Each emitted
token is then distributed exactly as the target's ``p`` (whatever ``q`` is). A proposer without a distribution
(n-gram lookup, a greedy draft) proposes deterministically: ``q_i`` is one-hot at ``x_i``.
"""

from __future__ import annotations

import torch


def accept_greedy(target_tokens: list[int], proposal: list[int]) -> list[int]:
    """The tokens one greedy verification pass emits.

    Args:
        target_tokens: the target's argmax after the last confirmed token and after each proposal (k + 1).
        proposal: the k proposed tokens.
    Returns:
        the kept proposals then the target's own next token: between 1 and k + 1 tokens.
    """
    out = []
    for want, got in zip(target_tokens, proposal):
        if want != got:
            break
        out.append(got)
    out.append(target_tokens[len(out)])
    return out


def accept_sampled(p: torch.Tensor, proposal: list[int], q: torch.Tensor | None,
                   generator: torch.Generator) -> list[int]:
    """The tokens one sampled verification pass emits, by the rejection rule.

    Args:
        p: (k + 1, V) float target probabilities (after temperature / top-k / top-p / min-p) at each place.
        proposal: the k proposed tokens.
        q: (k, V) float proposal probabilities each token was drawn from, or None for deterministic proposals.
        generator: the uniforms' source (seeded by the caller: the same seed gives the same text).
    Returns:
        between 1 and k + 1 tokens, each distributed as ``p`` at its place.
    """
    out: list[int] = []
    k = len(proposal)
    u = torch.rand(k + 1, generator=generator, dtype=torch.float64, device=p.device).tolist()
    for i, x in enumerate(proposal):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        if qx > 0 and u[i] < min(1.0, px / qx):
            out.append(x)
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: p itself is the residual's limit
            residual = p[i]
        out.append(draw(residual, generator))
        return out
    out.append(draw(p[k], generator))
    return out


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One index with probability proportional to ``weights`` (V,) (non-negative, not all zero)."""
    return int(torch.multinomial(weights.double(), 1, generator=generator))
