"""The decoder-only language model: embedding, decoder layers, final norm, LM head (HF's ``LlamaForCausalLM``).

Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE are this module with different :class:`ModelConfig`
fields. Submodule names equal HF's (``model.layers.3.self_attn.q_proj``) so checkpoints and PEFT adapters
load with no name map. Every projection, each expert's included, is a :class:`~ember.models.linear.Linear`:
quantization, LoRA and streaming swap that module and nothing here branches on them (docs/design.md).

Shapes: B batch, T new tokens, S cached+new key slots, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.models import accel
from ember.models.attention import KVStore, build_mask
from ember.models.decoder import attention_types, family_class, layer_class, mlp_types
from ember.models.linear import Linear
from ember.models.norms import RMSNorm
from ember.models.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq, rope_local_inv_freq


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm; named ``model`` inside :class:`Transformer` as in HF."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        embedding = family_class(cfg, "embedding", None)  # a family's own (Gemma: scaled), else nn.Embedding
        # On the meta device (a loader's build) the table is not initialised: torch runs a meta tensor's
        # normal_ through torch._refs, whose first call imports torch._dynamo (~70 MB resident).
        table = torch.empty(cfg.vocab_size, cfg.hidden_size) if embedding is None and _on_meta() else None
        self.embed_tokens = embedding(cfg) if embedding else nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        kinds = zip(attention_types(cfg), mlp_types(cfg))
        layer = family_class(cfg, "layer", layer_class(cfg))
        self.layers = nn.ModuleList(layer(cfg, i, a, m) for i, (a, m) in enumerate(kinds))
        self.norm = family_class(cfg, "norm", getattr(layer, "final_norm", RMSNorm))(cfg.hidden_size, cfg.rms_norm_eps)
        setup = family_class(cfg, "backbone", None)  # a family's model-level extras (Gemma 4's per-layer inputs)
        if setup is not None:
            setup(self, cfg)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` runs T new tokens per row against an optional cache."""

    # an object whose ``last`` receives each forward's (B, T, H) hidden states before the final norm, whichever
    # path ran (the MTP proposer reads them, :mod:`ember.speculative.mtp`); None: not kept
    hidden_tap = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE frequencies are derived, not stored in checkpoints; (re)made by reset_rope().
        self.register_buffer("inv_freq", rope_inv_freq(cfg, "cpu" if _on_meta() else None), persistent=False)
        self.rope_scale = rope_attention_factor(cfg)  # YaRN scales cos/sin; 1.0 otherwise
        # Gemma 3: the sliding layers' own RoPE base (None: every layer uses inv_freq)
        self.register_buffer("local_inv_freq", rope_local_inv_freq(cfg, "cpu" if _on_meta() else None),
                             persistent=False)
        self._windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: (w is not None, w or 0))

    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads per sequence, from the tensors this model holds.

        Counts every parameter and persistent buffer at its stored size (a quantized Linear's packed
        weights and scales as they are), except: the embedding table contributes one row (all of it
        when tied to the LM head, which reads it whole), and each MoE layer contributes
        ``num_experts_per_tok`` of its experts (k/E of their bytes). KV-cache reads are excluded.
        For an unquantized model this equals ``config.decode_bytes_per_token(element size)``.
        """
        cfg = self.config
        seen: set[int] = set()
        total = 0.0
        for name, t in self.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            if ".mlp.experts." in name:
                nbytes *= cfg.num_experts_per_tok / cfg.num_local_experts
            elif name.startswith("model.embed_tokens.") and not cfg.tie_word_embeddings:  # .weight, or GGUF blocks
                nbytes /= cfg.vocab_size
            total += nbytes
        return round(total)

    def reset_rope(self) -> None:
        """Recompute RoPE frequencies on the device of the weights (after a meta-device build)."""
        self.inv_freq = rope_inv_freq(self.config, self.model.norm.weight.device)
        self.local_inv_freq = rope_local_inv_freq(self.config, self.model.norm.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVStore | None = None,
        start: int = 0,
        k_valid: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        session: object | None = None,
    ) -> torch.Tensor:
        """Run new tokens through the model.

        Args:
            input_ids: (B, T) token ids.
            positions: (B, T) RoPE positions; default ``start + arange(T)`` for every row.
            cache: the per-layer cache (:mod:`ember.cache`) written at slots ``start .. start+T-1``; None for a
                cache-free pass.
            start: first cache slot of the new tokens (the number of slots already filled).
            k_valid: (B, S_max) bool, False at left-padding slots; None when no row is padded.
            last_only: return logits for the last position only (B, 1, V): prefill for generation.
            hidden_only: return the final normed hidden states (B, T, H) instead of logits.
            session: any object standing for one generation, the same at each of its calls, handed to the
                runtime (see :func:`ember.runtime.decode.forward`): the caller promises that between those calls
                no module, parameter, buffer or hook of the model is added, replaced or moved. None: no promise.
        Returns:
            logits (B, T or 1, V) in the model dtype.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype, self.rope_scale)  # (B, T, hd)
        local = None
        if self.local_inv_freq is not None:
            lc, ls = rope_cos_sin(self.local_inv_freq, positions, x.dtype)
            local = (lc[:, None], ls[:, None])
        fast = accel.model_forward
        # The runtime's whole-step path (None where it does not apply: the modules run, their projections still
        # on the runtime's kernels).
        if fast is not None:
            out = fast(self, x, cos, sin, cache, start, k_valid, last_only, hidden_only, session, local)
            if out is not None:
                return out
        return self.finish(self.run_layers(x, cos[:, None], sin[:, None], cache, start, k_valid, local), last_only,
                           hidden_only)

    def layer_masks(self, T: int, start: int, k_valid: torch.Tensor | None, cached: bool,
                    device: torch.device) -> dict[int | None, torch.Tensor | None]:
        """One attention mask per distinct sliding window (None for full attention); a mask of None lets SDPA
        take its fastest path (plain causal prefill from slot 0, or a single decode token that sees every key)."""
        n_keys = start + T if cached else T
        masks: dict[int | None, torch.Tensor | None] = {}
        q_slots = torch.arange(start, start + T, device=device)
        for w in self._windows:
            if k_valid is None and (w is None or n_keys <= w) and (T == 1 or start == 0):
                masks[w] = None
            else:
                masks[w] = build_mask(q_slots, k_valid, n_keys, w)
        return masks

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVStore | None, start: int,
                   k_valid: torch.Tensor | None,
                   local: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every layer as its modules: x (B, T, H), cos/sin (B, 1, T, rotary dim) -> (B, T, H) before the final
        norm; ``local`` the sliding layers' own cos/sin where the model has them (Gemma 3)."""
        layers = self.model.layers
        T = x.shape[1]
        masks = self.layer_masks(T, start, k_valid, cache is not None, x.device)
        for layer in layers:
            c, s = local if local is not None and layer.attention_type == "sliding_attention" else (cos, sin)
            x = layer(x, c, s, masks[layer.window], cache, T > 1)
        return x

    def finish(self, x: torch.Tensor, last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        """Final norm (on the last position only with ``last_only``), then the LM head unless ``hidden_only``."""
        if self.hidden_tap is not None:  # every position's state before the final norm (an MTP proposer's input)
            self.hidden_tap.last = x
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if hidden_only:
            return x
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"
