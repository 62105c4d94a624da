"""llama.cpp GGUF files: metadata -> ModelConfig, tensors -> weights, vocabulary -> tokenizer.

The package follows the file's concerns, as llama.cpp's own ``gguf-py`` does:

- :mod:`~ember.loading.gguf.reader`: the bounds-checked header/metadata/tensor-table reader (:class:`GGUFFile`);
- :mod:`~ember.loading.gguf.dequant`: ggml block types decoded to floats, or kept exactly quantized;
- :mod:`~ember.loading.gguf.config`: ``{arch}.*`` metadata -> :class:`~ember.config.ModelConfig`;
- :mod:`~ember.loading.gguf.hybrid`: the same (and the tensors' layouts) for Qwen3-Next / Qwen3.5 / Nemotron-H;
- :mod:`~ember.loading.gguf.tokenizer`: ``tokenizer.ggml.*`` -> :class:`~ember.tokenizer.Tokenizer`;
- :mod:`~ember.loading.gguf.weights`: tensors -> a :class:`~ember.models.Transformer`;
- :mod:`~ember.loading.gguf.families` / :mod:`~ember.loading.gguf.family_weights`: the same for ``gpt-oss``,
  ``gemma3``, ``glm4moe``, ``deepseek2`` and ``minimax-m2``; :mod:`~ember.loading.gguf.family_writer` writes
  gpt-oss and Gemma 3 back (beside :mod:`~ember.loading.gguf.writer`).

Tensor types: F32, F16, BF16 are read in place (zero-copy when already in the compute dtype on CPU);
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and MXFP4 stay in their blocks
(:mod:`ember.quant.gguf_linear`, multiplied by ember/kernels/gguf.cpp). Any other type raises
:class:`~ember.errors.UnsupportedGGUFTypeError` naming the tensor, before anything is loaded.
"""

from ember.loading.gguf.config import ARCHITECTURES, config_from_gguf
from ember.loading.gguf.dequant import DEQUANTIZERS, check_tensor_types, dequantize, unpermute_rope_rows
from ember.loading.gguf.reader import GGUF_MAGIC, GGUFFile, is_gguf_file
from ember.loading.gguf.tokenizer import GGUFTokenizerSpec, load_gguf_tokenizer, tokenizer_spec
from ember.loading.gguf.weights import gguf_tensor_name_map, load_gguf, load_gguf_model

__all__ = [
    "ARCHITECTURES", "DEQUANTIZERS", "GGUFFile", "GGUFTokenizerSpec", "GGUF_MAGIC",
    "check_tensor_types", "config_from_gguf", "dequantize", "gguf_tensor_name_map", "is_gguf_file", "load_gguf", "load_gguf_model",
    "load_gguf_tokenizer", "tokenizer_spec", "unpermute_rope_rows",
]
