"""Weight-only quantization: ``Int8Linear``, ``Int4Linear`` (group-wise), ``NF4Linear`` (bitsandbytes).

Each is a drop-in replacement for ``nn.Linear`` (docs/design.md, principle 3): the transformer never
branches on quantization. Quantize a loaded model with :func:`quantize_model`, quantize while
loading with ``ember.loading.load_model(path, quant="int4")``, or write a quantized checkpoint
folder with :func:`ember.loading.quantized.quantize_checkpoint` (``ember quantize``); this package
reads no files (loading sits above it). Kernels per device are described in
each module's docstring (:mod:`ember.quant.int8`, :mod:`ember.quant.int4`, :mod:`ember.quant.nf4`).
"""

from ember.quant.base import QuantizedLinear
from ember.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Linear
from ember.quant.int8 import Int8Linear
from ember.quant.nf4 import BLOCK_SIZE as NF4_BLOCK_SIZE
from ember.quant.nf4 import DOUBLE_QUANT_BLOCK_SIZE, NF4_CODE, NF4Linear
from ember.quant.quantize import (
    DEFAULT_LM_HEAD, LM_HEAD_CHOICES, MODES, SECTION, QuantSpec, quantize, quantize_linear,
    quantize_model, resolve_spec,
)


__all__ = [
    "DEFAULT_GROUP_SIZE", "DEFAULT_LM_HEAD", "DOUBLE_QUANT_BLOCK_SIZE", "GROUP_SIZES", "Int4Linear", "Int8Linear",
    "LM_HEAD_CHOICES", "MODES", "NF4_BLOCK_SIZE", "NF4_CODE", "NF4Linear", "QuantSpec", "QuantizedLinear", "SECTION",
    "quantize", "quantize_linear", "quantize_model", "resolve_spec",
]
