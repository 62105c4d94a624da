"""The projection every piece of a model uses: ``nn.Linear``, and the swap point for quantization and LoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models import accel


class Linear(nn.Linear):
    """``nn.Linear`` whose product a runtime may compute faster (:mod:`ember.models.accel`).

    Decode multiplies a few activation rows by each weight, so its time is the weight streaming from DRAM;
    :mod:`ember.runtime` streams bf16/fp32 weights with its own CPU kernels there. Quantization and LoRA
    replace this module (``Int4Linear``, ``LoRALinear``); nothing in the definitions branches on which it is.
    """

    def cpu_kernel(self):
        """This weight (and bias) bound to the runtime's CPU kernel for few-row products, made once; None under
        autograd, off the CPU, or where no runtime offers one."""
        f = accel.linear_kernel
        return f(self) if f is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = accel.linear
        if f is not None:
            y = f(self, x)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


def project(x: torch.Tensor, modules) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``: the projections that read the same activations (q/k/v, gate/up), which a
    runtime may compute in one call."""
    f = accel.project
    if f is not None:
        ys = f(x, modules)
        if ys is not None:
            return ys
    return [m(x) for m in modules]
