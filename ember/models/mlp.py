"""Feed-forward blocks: the SwiGLU MLP (HF's ``LlamaMLP``), also one expert of a mixture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.models.linear import Linear, project


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or cfg.intermediate_size
        self.gate_proj = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)
