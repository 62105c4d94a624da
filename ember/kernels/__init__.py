"""Native CPU kernels for decode and small batches (``cpu_base.h`` lists the units and what each computes).

Decode is memory-bandwidth bound: every weight is read once per step. These kernels stream bf16/fp32
weights close to the machine's read bandwidth and decode int8/int4/NF4 weights in registers on the way.

* :mod:`ember.kernels.loader`: compiling the kernel sources for this CPU, loading it, :func:`status`;
* :mod:`ember.kernels.matmul`: weight x activation products (:func:`dense`, :func:`int8`, :func:`q4`, :func:`mxfp4`) and
  weights bound to their kernel once (:class:`LinearKernel`);
* :mod:`ember.kernels.blocks`: RMSNorm, RoPE, single-query attention and the fused decoder blocks.

Every entry point returns None (False for :func:`rope_`) where the kernels are off or do not take the
input, and the caller falls back to PyTorch. Which model pieces use which kernel is the runtime's business
(:mod:`ember.runtime`); nothing here knows the model classes.
"""

from __future__ import annotations

from ember.kernels.blocks import (BlockKernel, LayerSteps, attn_block_kernel, attn_decode, attn_runs, layer_steps,
                                  gptoss_moe_block_kernel, mla_block_kernel, mlp_block_kernel, moe_block_kernel, rms_norm, rope_,
                                  run_attn_block, sink_attn_block_kernel,
                                  run_decode_layers, run_decode_rows, run_mlp_block)
from ember.kernels.loader import (AMX_BF16, AMX_MIN_ROWS, INT8_ACTIVATIONS, MAX_ROWS, SOURCE, TILE_BYTES, _compiler, sources,
                                 _cpu_has, _flag_sets, _mode, build, cache_dir, library, load, reset, status)
from ember.kernels.matmul import (LinearKernel, cached, cached_kernel, dense, dense_kernel, gguf_dequant, gguf_kernel, gguf_supports,
                                  gguf_tiled, int8, int8_kernel, linear_many, linear_rows, mxfp4, native_bf16_gemm, q4, q4_kernel,
                                  wide_linear)

__all__ = ["AMX_BF16", "AMX_MIN_ROWS", "INT8_ACTIVATIONS", "MAX_ROWS", "SOURCE", "TILE_BYTES", "sources", "BlockKernel",
           "LayerSteps", "LinearKernel", "attn_block_kernel", "attn_decode", "attn_runs", "build", "cache_dir", "cached",
           "cached_kernel", "dense", "dense_kernel", "gguf_dequant", "gguf_kernel", "gguf_supports", "gguf_tiled", "int8", "int8_kernel",
           "gptoss_moe_block_kernel", "layer_steps", "mla_block_kernel", "library", "linear_many", "linear_rows", "load", "mlp_block_kernel", "moe_block_kernel", "mxfp4", "native_bf16_gemm",
           "q4", "q4_kernel", "reset",
           "rms_norm", "rope_", "run_attn_block", "sink_attn_block_kernel", "run_decode_layers", "run_decode_rows", "run_mlp_block", "status", "wide_linear"]
