"""Known model architectures: the facts of each checkpoint's ``config.json``, no weights, no code.

Each entry is ``name -> {"hf_id", "aliases", "published", "config"}``:

- ``config``: the fields of the official ``config.json`` that shape memory and speed (HF names,
  read by :meth:`ember.config.ModelConfig.from_dict`), copied from the Hugging Face repo ``hf_id``.
- ``published``: the parameter counts the publisher states (model card or the Hub's safetensors
  total), in parameters, with where it was read; tests check our count against it within 1%.

Keep it data: a new entry is a copy of a config.json's relevant keys plus its published size.
"""

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}

_GEMMA4_31B = {"model_type": "gemma4_text", "vocab_size": 262144, "hidden_size": 5376, "intermediate_size": 21504,
               "num_hidden_layers": 60, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 256,
               "global_head_dim": 512, "num_global_key_value_heads": 4, "attention_k_eq_v": True,
               "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "sliding_window": 1024,
               "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10, "final_logit_softcapping": 30.0,
               "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                      "rope_theta": 1000000.0}}}

# E2B/E4B: text_config fields as the same in several public loaders' fixtures of google/gemma-4-E2B-it / -E4B-it
# (MLX, Rust and Swift test suites): per-layer input embeddings (256 wide, a 262,144-row table), the last 20 / 18
# layers reusing an earlier layer's keys and values, a double-width MLP in E2B's shared layers, window 512.
_GEMMA4_E = {**_GEMMA4_31B, "attention_k_eq_v": False, "num_global_key_value_heads": None, "sliding_window": 512,
             "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144, "max_position_embeddings": 131072}
_GEMMA4_E2B = {**_GEMMA4_E, "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
               "num_attention_heads": 8, "num_key_value_heads": 1, "num_kv_shared_layers": 20,
               "use_double_wide_mlp": True, "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7}
_GEMMA4_E4B = {**_GEMMA4_E, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 42,
               "num_attention_heads": 8, "num_key_value_heads": 2, "num_kv_shared_layers": 18,
               "use_double_wide_mlp": False, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7}

# Qwen3.5 MoE text configs: what the 35B-A3B and 122B-A10B share (the entries add their sizes).
_QWEN35_MOE = {"model_type": "qwen3_5_moe_text", "vocab_size": 248320, "num_key_value_heads": 2, "head_dim": 256,
               "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
               "linear_conv_kernel_dim": 4, "num_experts": 256, "num_experts_per_tok": 8,
               "max_position_embeddings": 262144,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
               "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

MODELS: dict[str, dict] = {
    # ------------------------------------------------------------------ Llama
    "llama-3.1-8b": {
        "hf_id": "meta-llama/Llama-3.1-8B-Instruct", "aliases": ["llama3.1-8b", "llama-3-8b", "llama-3.1-8b-instruct"],
        "published": {"params": 8.03e9, "source": "huggingface.co/meta-llama/Llama-3.1-8B (Hub: 8.03B params)"},
        "config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "llama-3.1-70b": {
        "hf_id": "meta-llama/Llama-3.1-70B-Instruct",
        "aliases": ["llama3.1-70b", "llama-3-70b", "llama-3.3-70b", "llama-3.1-70b-instruct", "llama-3.3-70b-instruct"],
        "published": {"params": 70.6e9, "source": "huggingface.co/meta-llama/Llama-3.1-70B (Hub: 70.6B params)"},
        "config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "llama-3.1-405b": {
        "hf_id": "meta-llama/Llama-3.1-405B-Instruct", "aliases": ["llama3.1-405b", "llama-3.1-405b-instruct"],
        "published": {"params": 405e9, "source": "Meta Llama 3.1 model card (405B)"},
        "config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
                   "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "llama-3.2-1b": {
        "hf_id": "meta-llama/Llama-3.2-1B-Instruct", "aliases": ["llama3.2-1b", "llama-3.2-1b-instruct"],
        "published": {"params": 1.24e9, "source": "huggingface.co/meta-llama/Llama-3.2-1B (Hub: 1.24B params)"},
        "config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                   "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA32_ROPE,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    },
    "llama-3.2-3b": {
        "hf_id": "meta-llama/Llama-3.2-3B-Instruct", "aliases": ["llama3.2-3b", "llama-3.2-3b-instruct"],
        "published": {"params": 3.21e9, "source": "huggingface.co/meta-llama/Llama-3.2-3B (Hub: 3.21B params)"},
        "config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                   "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA32_ROPE,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    },
    "tinyllama-1.1b": {
        "hf_id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "aliases": ["tinyllama"],
        "published": {"params": 1.1e9, "source": "huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0 (1.1B)"},
        "config": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                   "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ Mistral / Mixtral
    "mistral-7b": {
        "hf_id": "mistralai/Mistral-7B-Instruct-v0.3", "aliases": ["mistral-7b-v0.3", "mistral-7b-instruct"],
        "published": {"params": 7.25e9, "source": "huggingface.co/mistralai/Mistral-7B-Instruct-v0.3 (Hub: 7.25B params)"},
        "config": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "mistral-nemo-12b": {
        "hf_id": "mistralai/Mistral-Nemo-Instruct-2407", "aliases": ["mistral-nemo", "nemo-12b"],
        "published": {"params": 12.2e9, "source": "huggingface.co/mistralai/Mistral-Nemo-Instruct-2407 (Hub: 12.2B params)"},
        "config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
                   "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 1024000, "rope_theta": 1000000.0, "sliding_window": None,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "mixtral-8x7b": {
        "hf_id": "mistralai/Mixtral-8x7B-Instruct-v0.1", "aliases": ["mixtral", "mixtral-8x7b-instruct"],
        "published": {"params": 46.7e9, "active_params": 12.9e9,
                      "source": "mistral.ai/news/mixtral-of-experts (46.7B total, 12.9B per token)"},
        "config": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "sliding_window": None, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "mixtral-8x22b": {
        "hf_id": "mistralai/Mixtral-8x22B-Instruct-v0.1", "aliases": ["mixtral-8x22b-instruct"],
        "published": {"params": 141e9, "active_params": 39e9,
                      "source": "mistral.ai/news/mixtral-8x22b (141B total, 39B active)"},
        "config": {"model_type": "mixtral", "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                   "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                   "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536,
                   "rope_theta": 1000000.0, "sliding_window": None, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ Qwen2.5
    "qwen2.5-3b": {
        "hf_id": "Qwen/Qwen2.5-3B-Instruct", "aliases": ["qwen2.5-3b-instruct"],
        "published": {"params": 3.09e9, "source": "Qwen2.5-3B-Instruct model card (3.09B)"},
        "config": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                   "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                   "max_window_layers": 70, "torch_dtype": "bfloat16"},
    },
    "qwen2.5-7b": {
        "hf_id": "Qwen/Qwen2.5-7B-Instruct", "aliases": ["qwen2.5-7b-instruct"],
        "published": {"params": 7.61e9, "source": "Qwen2.5-7B-Instruct model card (7.61B)"},
        "config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
                   "max_window_layers": 28, "torch_dtype": "bfloat16"},
    },
    "qwen2.5-14b": {
        "hf_id": "Qwen/Qwen2.5-14B-Instruct", "aliases": ["qwen2.5-14b-instruct"],
        "published": {"params": 14.7e9, "source": "Qwen2.5-14B-Instruct model card (14.7B)"},
        "config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16"},
    },
    "qwen2.5-32b": {
        "hf_id": "Qwen/Qwen2.5-32B-Instruct", "aliases": ["qwen2.5-32b-instruct"],
        "published": {"params": 32.5e9, "source": "Qwen2.5-32B-Instruct model card (32.5B)"},
        "config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648,
                   "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16"},
    },
    "qwen2.5-72b": {
        "hf_id": "Qwen/Qwen2.5-72B-Instruct", "aliases": ["qwen2.5-72b-instruct"],
        "published": {"params": 72.7e9, "source": "Qwen2.5-72B-Instruct model card (72.7B)"},
        "config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ Qwen3
    "qwen3-4b": {
        "hf_id": "Qwen/Qwen3-4B", "aliases": [],
        "published": {"params": 4.0e9, "source": "Qwen3-4B model card (4.0B)"},
        "config": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
                   "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    },
    "qwen3-8b": {
        "hf_id": "Qwen/Qwen3-8B", "aliases": [],
        "published": {"params": 8.2e9, "source": "Qwen3-8B model card (8.2B)"},
        "config": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                   "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "qwen3-14b": {
        "hf_id": "Qwen/Qwen3-14B", "aliases": [],
        "published": {"params": 14.8e9, "source": "Qwen3-14B model card (14.8B)"},
        "config": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 17408,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "qwen3-32b": {
        "hf_id": "Qwen/Qwen3-32B", "aliases": [],
        "published": {"params": 32.8e9, "source": "Qwen3-32B model card (32.8B)"},
        "config": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 25600,
                   "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ gpt-oss (OpenAI; experts published in MXFP4)
    "gpt-oss-20b": {
        "hf_id": "openai/gpt-oss-20b", "aliases": ["gpt-oss:20b"],
        "published": {"params": 20.9e9, "active_params": 3.61e9 + 0.579e9,
                      "source": "gpt-oss model card (20.9B; 3.61B active, which leaves out the 0.579B embedding table "
                                "that Ember's active count includes)"},
        "config": {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
                   "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                   "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
                   "layer_types": ["sliding_attention", "full_attention"] * 12,
                   "max_position_embeddings": 131072, "rope_theta": 150000.0, "rope_scaling": _GPT_OSS_ROPE,
                   "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
    },
    "gpt-oss-120b": {
        "hf_id": "openai/gpt-oss-120b", "aliases": ["gpt-oss:120b"],
        "published": {"params": 116.8e9, "active_params": 5.13e9 + 0.579e9,
                      "source": "gpt-oss model card (116.8B; 5.13B active, which leaves out the 0.579B embedding "
                                "table that Ember's active count includes)"},
        "config": {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
                   "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                   "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
                   "layer_types": ["sliding_attention", "full_attention"] * 18,
                   "max_position_embeddings": 131072, "rope_theta": 150000.0, "rope_scaling": _GPT_OSS_ROPE,
                   "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
    },
    "qwen3-30b-a3b": {
        "hf_id": "Qwen/Qwen3-30B-A3B", "aliases": ["qwen3-30b"],
        "published": {"params": 30.5e9, "active_params": 3.3e9, "source": "Qwen3-30B-A3B model card (30.5B, 3.3B activated)"},
        "config": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                   "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                   "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "qwen3-235b-a22b": {
        "hf_id": "Qwen/Qwen3-235B-A22B", "aliases": ["qwen3-235b"],
        "published": {"params": 235e9, "active_params": 22e9, "source": "Qwen3-235B-A22B model card (235B, 22B activated)"},
        "config": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                   "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                   "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ hybrids with recurrent state (docs/hybrid.md)
    "qwen3.5-27b": {
        "hf_id": "Qwen/Qwen3.5-27B", "aliases": ["qwen3.5"],
        "published": {"params": 27e9, "source": "Qwen3.5-27B model card (27B)"},
        "config": {"model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 5120, "intermediate_size": 17408,
                   "num_hidden_layers": 64, "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 256,
                   "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 16,
                   "linear_num_key_heads": 16, "linear_num_value_heads": 48, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "qwen3-next-80b-a3b": {
        "hf_id": "Qwen/Qwen3-Next-80B-A3B-Instruct", "aliases": ["qwen3-next"],
        # the card's "3B activated" leaves the embeddings out, so only the total is checked
        "published": {"params": 80e9, "source": "Qwen3-Next-80B-A3B model card (80B total)"},
        "config": {"model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
                   "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                   "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12,
                   "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                   "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                   "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "norm_topk_prob": True, "max_position_embeddings": 262144,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "qwen3.5-35b-a3b": {
        "hf_id": "Qwen/Qwen3.5-35B-A3B", "aliases": ["qwen3.5-35b", "qwen3.6-35b-a3b"],
        # config: text_config of the Hub snapshot as listed in a public inventory of Qwen3.5/3.6-35B-A3B's
        # config.json (Qwen3.6-35B-A3B has the same text model); the card's "3B activated" leaves the embeddings out
        "published": {"params": 35e9, "source": "Qwen3.5-35B-A3B: 35B total (model name and card)"},
        "config": {**_QWEN35_MOE, "hidden_size": 2048, "intermediate_size": 512, "num_hidden_layers": 40,
                   "num_attention_heads": 16, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 10,
                   "linear_num_value_heads": 32, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
    },
    "qwen3.5-122b-a10b": {
        "hf_id": "Qwen/Qwen3.5-122B-A10B", "aliases": ["qwen3.5-122b"],
        # text_config of Qwen/Qwen3.5-122B-A10B as quoted by public training and inference configs (48 layers,
        # 3 DeltaNet : 1 gated attention, 256 experts top-8 + a shared expert); the card's "10B activated" leaves
        # the embeddings out, so only the total is checked
        "published": {"params": 122e9, "source": "Qwen3.5-122B-A10B: 122B total (model name and card)"},
        "config": {**_QWEN35_MOE, "hidden_size": 3072, "intermediate_size": 1024, "num_hidden_layers": 48,
                   "num_attention_heads": 32, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12,
                   "linear_num_value_heads": 64, "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024},
    },
    "nemotron-3-nano-30b-a3b": {
        "hf_id": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "aliases": ["nemotron-3-nano", "nemotron3-nano"],
        # 23 Mamba-2, 23 MoE (128 relu2 experts top-6 + a shared expert) and 6 attention layers; the config.json
        # as quoted verbatim by several public projects
        "published": {"params": 31.6e9, "source": "Nemotron 3 Nano technical report: 31.6B total parameters "
                      "(3.2B active without embeddings; the name's 30B is nominal)"},
        "config": {"model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688, "intermediate_size": 1856,
                   "num_hidden_layers": 52,
                   "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
                   "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
                   "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128,
                   "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True, "n_routed_experts": 128,
                   "num_experts_per_tok": 6, "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
                   "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                   "max_position_embeddings": 262144, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
    },
    "nemotron-3-super-120b-a12b": {
        "hf_id": "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", "aliases": ["nemotron-3-super", "nemotron3-super"],
        # 40 Mamba-2, 40 latent-MoE (512 relu2 experts top-22 in a 1024-wide latent space + a shared expert) and
        # 8 attention layers; config.json keys as quoted by several public projects. The MTP layers
        # (num_nextn_predict_layers 1, pattern "*E") are not part of the forward pass and not counted.
        "published": {"params": 120.6e9, "active_params": 12.7e9,
                      "source": "Nemotron 3 Super: 120.6B total, 12.7B active (technical report summaries; the "
                      "name's 120B/A12B are nominal)"},
        "config": {"model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 2688,
                   "num_hidden_layers": 88,
                   "hybrid_override_pattern": "MEMEMEM*" + "EMEMEMEM*" * 2 + "EMEMEMEMEM*" * 4 + "EMEMEMEM*"
                                              + "EMEMEMEME",
                   "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
                   "mamba_num_heads": 128, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128,
                   "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True, "n_routed_experts": 512,
                   "num_experts_per_tok": 22, "moe_intermediate_size": 2688, "moe_latent_size": 1024,
                   "moe_shared_expert_intermediate_size": 5376, "routed_scaling_factor": 5.0, "n_group": 1,
                   "topk_group": 1, "norm_topk_prob": True, "max_position_embeddings": 262144,
                   "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ Gemma 3, GLM-4.5, DeepSeek-V3
    "gemma-3-27b": {
        "hf_id": "google/gemma-3-27b-it", "aliases": ["gemma3-27b", "gemma-3-27b-it"],
        "published": {"params": 27.0e9, "source": "Gemma 3 technical report, table 1: 27B = 1,416M embedding + "
                      "25,600M non-embedding (text decoder; the Hub's 27.4B adds the 417M vision encoder, not loaded)"},
        "config": {"model_type": "gemma3", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "text_config": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376,
                                   "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
                                   "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168,
                                   "sliding_window": 1024, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
                                   "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6}},
    },
    "glm-4.5-air": {
        "hf_id": "zai-org/GLM-4.5-Air", "aliases": ["glm4.5-air", "glm-4.5-air-106b"],
        # Zhipu's "12B active" leaves out the embedding and LM head (ours counts them: 13.4B), so it is not checked.
        "published": {"params": 106e9, "source": "GLM-4.5 model card: 106B total parameters, 12B active"},
        "config": {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
                   "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
                   "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
                   "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                   "routed_scaling_factor": 1.0, "norm_topk_prob": True, "partial_rotary_factor": 0.5,
                   "attention_bias": True, "use_qk_norm": False, "max_position_embeddings": 131072,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
    },
    "deepseek-v3": {
        "hf_id": "deepseek-ai/DeepSeek-V3", "aliases": ["deepseek-v3-671b", "deepseek-r1", "deepseek-v3.1"],
        # "37B activated" is stated to the billion (ours: 37.6B with the embedding row and LM head): not checked.
        "published": {"params": 671e9, "source": "DeepSeek-V3 technical report: 671B total (685B on the Hub with "
                      "the 14B multi-token-prediction module, which HF and Ember do not load), 37B activated"},
        "config": {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                   "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                   "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                   "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                   "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 1536, "kv_lora_rank": 512,
                   "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                   "max_position_embeddings": 163840, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                   # config.json's YaRN: 4k trained context stretched 40x to 160k; mscale_all_dim also scales MLA's
                   # softmax (by (0.1 ln 40 + 1)^2)
                   "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    },
    "minimax-m2": {
        "hf_id": "MiniMaxAI/MiniMax-M2", "aliases": ["minimax-m2-229b", "minimax-m2.1"],
        # "10B active" leaves out the embedding and LM head (ours counts them: 11.0B), so it is not checked.
        "published": {"params": 229e9, "source": "huggingface.co/MiniMaxAI/MiniMax-M2 (Hub: 229B params; model "
                      "card: 230B total, 10B active)"},
        "config": {"model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
                   "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                   "num_local_experts": 256, "num_experts_per_tok": 8, "rotary_dim": 64, "rope_theta": 5000000.0,
                   "max_position_embeddings": 196608, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
    },
    # ------------------------------------------------------------------ Gemma 4 (multimodal checkpoints; text model)
    "gemma-4-31b": {
        "hf_id": "google/gemma-4-31B-it", "aliases": ["gemma4-31b", "gemma-4-31b-it"],
        # text_config as copied in public loaders' fixtures of google/gemma-4-31B-it (e.g. a gemma4_tpu test suite);
        # published size: "30.7B dense + ~550M vision encoder" (llmradar.eu, apxml.com model pages)
        "published": {"params": 30.7e9, "source": "Gemma 4 31B: 30.7B parameters (the text decoder; the ~550M vision "
                      "encoder is not loaded), model pages citing Google's card"},
        "config": {"model_type": "gemma4", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "text_config": _GEMMA4_31B},
    },
    "gemma-4-e2b": {
        "hf_id": "google/gemma-4-E2B-it", "aliases": ["gemma4-e2b", "gemma-4-e2b-it"],
        # ours: 4.63B, of which 2.35B the per-layer-input table and 0.40B the embeddings
        "published": {"params": 5.1e9, "not_loaded": 0.45e9, "precision": 0.1e9,
                      "source": "Gemma 4 E2B: 5.1B with embeddings, 2.3B effective (Google's model card, as quoted by "
                      "model pages), of which the ~150M vision and ~300M audio encoders are not loaded"},
        "config": {"model_type": "gemma4", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "text_config": _GEMMA4_E2B},
    },
    "gemma-4-e4b": {
        "hf_id": "google/gemma-4-E4B-it", "aliases": ["gemma4-e4b", "gemma-4-e4b-it"],
        # ours: 7.46B, of which 2.82B the per-layer-input table and 0.67B the embeddings
        "published": {"params": 8.0e9, "not_loaded": 0.45e9, "precision": 1e9,
                      "source": "Gemma 4 E4B: 8B with embeddings, 4.5B effective (Google's model card, as quoted by "
                      "model pages), of which the ~150M vision and ~300M audio encoders are not loaded"},
        "config": {"model_type": "gemma4", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "text_config": _GEMMA4_E4B},
    },
    "gemma-4-26b-a4b": {
        "hf_id": "google/gemma-4-26B-A4B-it", "aliases": ["gemma4-26b", "gemma-4-26b", "gemma-4-26b-a4b-it"],
        # text_config fields agree across two public loaders' fixtures (a Go MLX and a JAX/TPU one); "25.2B total, 3.8B
        # active" (vast.ai and apxml.com model pages); ours: 25.23B total, 3.82B active
        "published": {"params": 25.2e9, "source": "Gemma 4 26B A4B: 25.2B total, 3.8B active (128 experts, top 8, "
                      "beside a dense MLP in every layer)"},
        "config": {"model_type": "gemma4", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "text_config": {**_GEMMA4_31B, "enable_moe_block": True, "hidden_size": 2816,
                                   "intermediate_size": 2112, "moe_intermediate_size": 704, "num_attention_heads": 16,
                                   "num_key_value_heads": 8, "num_global_key_value_heads": 2, "num_hidden_layers": 30,
                                   "num_experts": 128, "top_k_experts": 8,
                                   "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5}},
    },
}
