"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

from ember.models import accel


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled in the model dtype (HF's ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = accel.rms_norm
        if f is not None:
            y = f(self, x)
            if y is not None:
                return y
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class UnitOffsetRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight`` in fp32, rounded to the input dtype at the end (HF's ``Gemma3RMSNorm``);
    its weight starts at zero. Another class than :class:`RMSNorm`, so no runtime mistakes it for one."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)
