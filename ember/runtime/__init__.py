"""The CPU decode runtime: Ember's kernels composed with the model definitions, piece by piece.

Importing this package fills the slots of :mod:`ember.models.accel`: single pieces (Linear products, RMSNorm,
q/k/v and gate/up in one call, RoPE, one-token attention) run on the CPU kernels (:mod:`ember.runtime.ops`),
and one-sequence decode runs whole layers as fused kernel blocks (:mod:`ember.runtime.decode`, recognising
pieces in :mod:`ember.runtime.blocks`). Whatever the runtime does not know runs as its PyTorch module.
:mod:`ember.engine` and :mod:`ember.scheduler` import it; so should any other code that times a model.
"""

from __future__ import annotations

from ember.models import accel
from ember.runtime import decode, ops, recurrent
from ember.runtime.blocks import head_block, layer_blocks
from ember.runtime.decode import DecodeBlocks


def install() -> None:
    """Put the runtime's kernels into the definitions' slots (done on import; idempotent)."""
    accel.linear = ops.linear
    accel.linear_kernel = ops.linear_kernel
    accel.rms_norm = ops.rms_norm
    accel.project = ops.project
    accel.rope_ = ops.rope_
    accel.attention_decode = ops.attention_decode
    accel.attention_rows = ops.attention_rows
    accel.model_forward = decode.forward
    accel.gated_delta_step = recurrent.gated_delta_step
    accel.mamba2_step = recurrent.mamba2_step


def uninstall() -> None:
    """Empty the slots: every model runs as plain PyTorch modules (tests compare the two)."""
    for name in ("linear", "linear_kernel", "rms_norm", "project", "rope_", "attention_decode", "attention_rows", "model_forward",
                 "gated_delta_step", "mamba2_step"):
        setattr(accel, name, None)


install()

__all__ = ["DecodeBlocks", "head_block", "install", "layer_blocks", "uninstall"]
