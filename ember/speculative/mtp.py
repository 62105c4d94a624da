"""Multi-token prediction (MTP) heads as a proposer: the checkpoint's own extra layer drafts the next tokens.

Qwen3-Next / Qwen3.5 ship ``mtp.*`` and DeepSeek-V3-family checkpoints ``model.layers.{num_hidden_layers}.*``
(their ``num_nextn_predict_layers`` trailing layers); the loaders keep those tensors apart in
``model.extra_weights``. Both are the same module under two sets of names:

===========================  ==================================  ================================
:class:`MTPHead`             Qwen3-Next / Qwen3.5                DeepSeek-V3 layer N
===========================  ==================================  ================================
``enorm`` (embedding norm)   ``mtp.pre_fc_norm_embedding``       ``enorm``
``hnorm`` (hidden norm)      ``mtp.pre_fc_norm_hidden``          ``hnorm``
``fc`` (2H -> H, no bias)    ``mtp.fc``                          ``eh_proj``
``layer`` (one decoder       ``mtp.layers.0.*`` (full gated      the layer's ``self_attn``/``mlp``/
layer, its own KV cache)     attention; MoE in MoE variants)     norms (MLA, routed MoE)
``norm`` (before the head)   ``mtp.norm``                        ``shared_head.norm``
===========================  ==================================  ================================

The embedding and the LM head are the main model's (DeepSeek's copies ``embed_tokens`` / ``shared_head.head``
are not read). The norms are the family's (Qwen's scale by ``1 + w``). At position ``j`` the head takes the
main model's final hidden state ``h_j`` (after its final norm: the vector its LM head scores, as the reference
modeling code and vLLM/SGLang feed it) and the embedding of the next token ``t_{j+1}``::

    x = fc(cat(enorm(embed(t_{j+1})), hnorm(h_j)))      # embedding first, then the hidden state
    logits(t_{j+2}) = lm_head(norm(layer(x at position j)))

A chain of ``k`` proposals feeds the head's own normed output in place of the main model's next hidden state
(which does not exist yet); those chained slots of the head's cache are overwritten on the next pass, whose
first rows feed every newly confirmed position with the main model's own hidden states.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import torch
from torch import nn

from ember.cache import StaticKVCache
from ember.errors import CheckpointError, GenerationError
from ember.models.attention import build_mask
from ember.models.decoder import layer_class
from ember.models.linear import Linear
from ember.models.norms import RMSNorm
from ember.models.rope import rope_cos_sin
from ember.sampling import SamplingParams
from ember.speculative.proposers import pick, proposal_sampler

QWEN = {"mtp.fc.weight": "fc.weight", "mtp.pre_fc_norm_embedding.weight": "enorm.weight",
        "mtp.pre_fc_norm_hidden.weight": "hnorm.weight", "mtp.norm.weight": "norm.weight"}
DEEPSEEK = {"eh_proj.weight": "fc.weight", "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "shared_head.norm.weight": "norm.weight"}
DEEPSEEK_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's
_FUSED = re.compile(r"^(?P<prefix>layer\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def head_tensors(model) -> dict[str, torch.Tensor]:
    """The checkpoint's first MTP head under :class:`MTPHead`'s names ({} when it ships none); transformers 5's
    fused expert tensors are sliced per expert (views)."""
    extra = getattr(model, "extra_weights", None) or {}
    deepseek = f"model.layers.{model.config.num_hidden_layers}."
    out: dict[str, torch.Tensor] = {}
    for name, t in extra.items():
        if name in QWEN:
            out[QWEN[name]] = t
        elif name.startswith("mtp.layers.0."):
            out["layer." + name[len("mtp.layers.0."):]] = t
        elif name.startswith(deepseek):
            rest = name[len(deepseek):]
            if rest in DEEPSEEK:
                out[DEEPSEEK[rest]] = t
            elif rest not in DEEPSEEK_SHARED:
                out["layer." + rest] = t
    for name in [n for n in out if _FUSED.match(n)]:
        m, t = _FUSED.match(name), out.pop(name)
        for e in range(t.shape[0]):
            p = f"{m['prefix']}.{e}"
            if m["kind"] == "down_proj":  # (E, H, I)
                out[f"{p}.down_proj.weight"] = t[e]
            else:  # (E, 2I, H): each expert's gate rows, then its up rows
                half = t.shape[1] // 2
                out[f"{p}.gate_proj.weight"], out[f"{p}.up_proj.weight"] = t[e, :half], t[e, half:]
    return out


class MTPHead(nn.Module):
    """One MTP module (see the module docstring); shares the main model's embedding and LM head.

    Args:
        cfg: the main model's config.
        moe: whether its layer has a mixture of experts (the MoE variants' heads do).
    """

    def __init__(self, cfg, moe: bool) -> None:
        super().__init__()
        types = ["full_attention"] if cfg.layer_types else None
        # a one-layer model: the head's layer is layer 0 of its own cache
        self.config = dataclasses.replace(cfg, num_hidden_layers=1, layer_types=types)
        cls = layer_class(cfg)
        norm = getattr(cls, "final_norm", RMSNorm)
        H = cfg.hidden_size
        self.enorm, self.hnorm, self.norm = (norm(H, cfg.rms_norm_eps) for _ in range(3))
        self.fc = Linear(2 * H, H, bias=False)
        self.layer = cls(self.config, 0, "full_attention", "moe" if moe else "dense")

    @classmethod
    def from_model(cls, model) -> "MTPHead":
        """The head of ``model``'s checkpoint, loaded in the model's dtype.

        Raises:
            GenerationError: the checkpoint ships no MTP tensors.
            CheckpointError: they do not match the head the config implies (naming the tensors).
        """
        tensors = head_tensors(model)
        if not tensors:
            raise GenerationError("this checkpoint ships no mtp.* heads (nor DeepSeek's num_nextn_predict_layers); "
                                  "use --speculate ngram or --draft MODEL")
        with torch.device("meta"):
            head = cls(model.config, moe=any(".mlp.experts." in n or n == "layer.mlp.gate.weight" for n in tensors))
        from ember.loading.safetensors import load_weights

        p = model.model.norm.weight
        load_weights(head, _Tensors(tensors, getattr(model.config, "name_or_path", "the checkpoint")), p.dtype,
                     p.device)
        return head.eval().requires_grad_(False)

    def forward(self, model, ids: list[int], hidden: torch.Tensor, cache: StaticKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for positions ``cache.pos .. + T - 1``: ``ids`` (T) the tokens after them, ``hidden`` (T, H) the main
        model's normed hidden states there. Returns logits (T, V) for the tokens after ``ids`` and the head's
        normed output (T, H); the cache advances by T."""
        T, start = len(ids), cache.pos
        dev = hidden.device
        e = model.model.embed_tokens(torch.tensor([ids], device=dev))
        x = self.fc(torch.cat([self.enorm(e), self.hnorm(hidden[None].to(e.dtype))], -1))  # (1, T, H)
        positions = torch.arange(start, start + T, device=dev)
        cos, sin = rope_cos_sin(model.inv_freq, positions[None], x.dtype, model.rope_scale)
        mask = None if T == 1 or start == 0 else build_mask(positions, None, start + T, None)
        x = self.norm(self.layer(x, cos[:, None], sin[:, None], mask, cache, T > 1))
        cache.advance(T)
        return model.lm_head(x)[0], x[0]


class _Tensors:
    """A dict of tensors seen as a checkpoint by :func:`ember.loading.safetensors.load_weights`."""

    def __init__(self, tensors: dict[str, torch.Tensor], folder) -> None:
        self.tensors, self.folder = tensors, folder

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> SimpleNamespace:
        t = self.tensors[name]
        return SimpleNamespace(shape=tuple(t.shape), dtype=t.dtype, file=f"{self.folder} (MTP head)")

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class HiddenTap:
    """Set as ``model.hidden_tap``: ``last`` holds the latest forward's hidden states before the final norm."""

    last: torch.Tensor | None = None


class MTPProposer:
    """Proposes with the checkpoint's MTP head, chained ``k`` times; fed the main model's hidden states.

    The speculative decoder calls :meth:`observe` after every forward of the main model (the prompt's prefill
    included) with the normed hidden states of the positions it ran; rows of rejected proposals are overwritten
    before they are read (only positions whose input token is confirmed are fed to the head).
    """

    def __init__(self, model, head: MTPHead, params: SamplingParams, max_len: int,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.head = model, head
        p = model.model.norm.weight
        self.sampler = proposal_sampler(params, p.device)
        self.generator = generator
        self.max_len = max_len
        self.cache = StaticKVCache(head.config, 1, max_len, p.dtype, p.device)
        self.hidden = torch.zeros(max_len, model.config.hidden_size, dtype=p.dtype, device=p.device)
        self.fed = 0  # head cache slots 0..fed-1 hold confirmed inputs (the rest are the last chain's)

    def reset(self) -> None:
        self.fed = 0

    def observe(self, start: int, hidden: torch.Tensor) -> None:
        """The main model's normed hidden states (T, H) at positions ``start .. start + T - 1``."""
        self.hidden[start:start + hidden.shape[0]] = hidden

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        L = len(ids)
        k = min(k, self.max_len - L)
        if k < 1 or L < 2:
            return [], None
        self.fed = min(self.fed, L - 2)  # at least the last confirmed position is fed, for its logits
        self.cache.pos = self.fed
        logits, out_h = self.head(self.model, ids[self.fed + 1:L], self.hidden[self.fed:L - 1], self.cache)
        self.fed = L - 1
        out: list[int] = []
        dists = []
        for i in range(k):
            tok = pick(logits[-1], self.sampler, self.generator, dists)
            out.append(tok)
            if i + 1 < k:
                logits, out_h = self.head(self.model, [tok], out_h[-1:], self.cache)
        return out, (torch.stack(dists) if dists else None)


def check_mtp_target(model) -> MTPHead:
    """The MTP head of ``model`` (see :meth:`MTPHead.from_model`), refused with a message on a model whose
    forward this proposer cannot read hidden states from."""
    if not hasattr(type(model), "hidden_tap"):
        raise GenerationError(f"MTP speculation needs an Ember Transformer, not {type(model).__name__}")
    try:
        return MTPHead.from_model(model)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the checkpoint's MTP head; run without --speculate mtp)") from e
