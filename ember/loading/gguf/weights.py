"""GGUF tensors -> a :class:`~ember.models.Transformer`: names mapped, layouts undone, types decoded.

- tensor names are ``token_embd.weight``, ``blk.N.attn_q.weight``, ... (:data:`LAYER_TENSORS`);
- shapes are stored innermost-first (ggml ``ne``); the reader hands them back in PyTorch order;
- for the ``llama`` architecture (which also carries Mistral and Mixtral) the rows of ``attn_q`` and
  ``attn_k`` (weights and biases) are permuted per head from HF's half-split RoPE layout to ggml's
  interleaved pairs: rows ``(h, 2, hd/2)`` are stored as ``(h, hd/2, 2)``. Qwen2/3 use the NeoX
  (half-split) RoPE in llama.cpp and are stored unpermuted;
- experts (Mixtral as ``llama`` with ``expert_count``, ``qwen3moe``) are stacked per layer into
  ``ffn_{gate,up,down}_exps`` (E, out, in) plus the router ``ffn_gate_inp``; each expert's parameter
  becomes a view of the decoded stack.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from ember.config import ModelConfig
from ember.errors import GGUFError, UnsupportedModelError
from ember.loading.dtypes import DTYPE_NAMES, blocks_dtype, resolve_dtype
from ember.loading.gguf.config import (
    _EXPERT_NAME, _LAYER_NAME, ARCHITECTURES, CONFIG_TENSORS, EXPERT_TENSORS, GLOBAL_TENSORS, LAYER_TENSORS, config_from_gguf,
)
from ember.loading.gguf.dequant import check_tensor_types
from ember.loading.gguf.families import is_family
from ember.loading.gguf.family_weights import family_tensors
from ember.loading.gguf.hybrid import HYBRID_ARCHITECTURES, hybrid_tensor_map, mtp_checkpoint_tensors
from ember.loading.gguf.reader import GGUFFile
from ember.loading.gguf.tokenizer import load_gguf_tokenizer
from ember.models import Transformer
from ember.models.linear import Linear
from ember.quant.gguf_linear import KEPT_TYPES, GGUFEmbedding, GGUFLinear


# Modules whose quantized weight is kept as its ggml blocks (exact classes: a family's own embedding, e.g.
# Gemma's scaled one, gets its table decoded instead).
_BLOCK_MODULES = (Linear, torch.nn.Linear, torch.nn.Embedding)


def gguf_tensor_name_map(gf: GGUFFile, cfg: ModelConfig) -> dict[str, list[str]]:
    """GGUF tensor name -> the Ember/HF parameter name(s) it fills, for every weight tensor in the file.

    A stacked expert tensor (``blk.N.ffn_up_exps.weight``, (E, out, in)) fills one parameter per expert,
    listed in expert order; every other tensor fills exactly one.

    Raises:
        GGUFError: a tensor whose name Ember does not know (naming the first few).
    """
    if gf.architecture in HYBRID_ARCHITECTURES:
        return hybrid_tensor_map(gf, cfg)[0]
    mapping: dict[str, list[str]] = {}
    unknown: list[str] = []
    for name in gf.tensors:
        if name in CONFIG_TENSORS:
            continue
        if name in GLOBAL_TENSORS:
            mapping[name] = [GLOBAL_TENSORS[name]]
            continue
        m = _LAYER_NAME.fullmatch(name)
        e = _EXPERT_NAME.fullmatch(name)
        if m and int(m.group(1)) < cfg.num_hidden_layers and m.group(2) in LAYER_TENSORS:
            mapping[name] = [f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"]
        elif m and int(m.group(1)) < cfg.num_hidden_layers and m.group(2) in EXPERT_TENSORS and m.group(3) == "weight":
            mapping[name] = [f"model.layers.{m.group(1)}.mlp.experts.{i}.{EXPERT_TENSORS[m.group(2)]}.weight"
                             for i in range(cfg.num_local_experts)]
        elif e and int(e.group(1)) < cfg.num_hidden_layers:
            mapping[name] = [f"model.layers.{e.group(1)}.mlp.experts.{e.group(3)}.{e.group(2)}_proj.weight"]
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{gf.path}: {len(unknown)} tensor(s) Ember does not know for {gf.architecture!r}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return mapping


def load_gguf_model(path: str | os.PathLike | GGUFFile, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = "auto", shard=None) -> Transformer:
    """Build a :class:`~ember.models.Transformer` on the meta device and fill it from a GGUF file.

    Float tensors already in ``dtype`` stay zero-copy views over the memory map (CPU). Quantized ones stay
    in their ggml blocks (:class:`~ember.quant.gguf_linear.GGUFLinear` for projections and the LM head,
    :class:`~ember.quant.gguf_linear.GGUFEmbedding` for the token table: a CPU view of the map, one copy
    where q/k rows are un-permuted or on another device); a tied LM head shares the embedding's blocks. A
    family's own embedding class gets its table decoded to ``dtype``. Stacked float expert tensors are
    decoded once and each
    expert's parameter is a view into the result.

    Args:
        path: a ``.gguf`` file (or an open :class:`GGUFFile`).
        device: where the weights go ("cpu", "cuda", "cuda:1").
        dtype: "auto" (F32 file -> fp32, F16 -> fp16, BF16 and quantized -> bf16, each subject to what the
            device runs natively, as for safetensors), "bf16", "fp16", "fp32" or a torch dtype.
        shard: a pipeline stage or tensor shard (:mod:`ember.distributed`): its ``prune(model)`` cuts the
            model, ``local_name(name)`` renames or drops each tensor (other stages' are never read), a tensor
            shard's ``gguf_cut(name, shape)`` gives its part of each tensor (whole rows, or whole blocks of each
            row), and ``finish(model)`` swaps in the communicating modules.
    Raises:
        GGUFError / UnsupportedGGUFTypeError / UnsupportedModelError, naming the file and tensor.
    """
    gf = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    cfg = config_from_gguf(gf)
    device = torch.device(device)
    dt = resolve_dtype(dtype, DTYPE_NAMES.get(cfg.torch_dtype, torch.bfloat16), device)
    if _blocks_kept(gf, QT.BF16):
        # A BF16 file also computes in bf16 under "auto": its matrices stay views of the map (fp32 would hold a
        # second, twice larger copy and read twice the bytes per decoded token); wide products are computed in
        # fp32 where bf16 GEMMs are emulated.
        dt = blocks_dtype(dtype, dt, device)
    hybrid = gf.architecture in HYBRID_ARCHITECTURES
    with torch.device("meta"):
        model = Transformer(cfg)
    if is_family(gf.architecture):  # gpt-oss, gemma3, glm4moe, deepseek2, minimax-m2
        if shard is not None:
            raise UnsupportedModelError(f"{gf.path}: pipeline stages over a {gf.architecture!r} GGUF file are not "
                                        "supported; load it whole, or from its HF checkpoint")
        state, kept, modules = family_tensors(gf, cfg, model, dt, device)
        return _install(model, cfg, state, kept, modules, dt, {"lm_head.weight"} if cfg.tie_word_embeddings else set())
    _, permuted = (HYBRID_ARCHITECTURES if hybrid else ARCHITECTURES)[gf.architecture]
    # fixes: tensors that need more than a rename; mtp: multi-token-prediction blocks, kept apart
    names, fixes, mtp = hybrid_tensor_map(gf, cfg) if hybrid else (gguf_tensor_name_map(gf, cfg), {}, [])
    if shard is not None:
        shard.prune(model)
        local = {g: [shard.local_name(t) for t in targets] for g, targets in names.items()}
        names = {g: targets for g, targets in local.items() if None not in targets}
    ignore = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in ignore}
    source_of = {target: g for g, targets in names.items() for target in targets}
    missing, unexpected = sorted(set(expected) - set(source_of)), sorted(set(source_of) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            shown = list(dict.fromkeys(source_of[u] for u in unexpected))
            parts.append(f"unexpected {len(shown)}: {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}")
        raise GGUFError(f"{gf.path}: tensors do not match the model its metadata describes: {'; '.join(parts)}")

    check_tensor_types(gf, {**names, **{n: [n] for n in mtp}})  # every type refused before a byte is loaded
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[Any, torch.Tensor]] = {}  # module path -> (ggml type, raw block rows on device)
    for gname, targets in names.items():
        m = _LAYER_NAME.fullmatch(gname)
        kind = m.group(2) if m else None
        stacked = kind in EXPERT_TENSORS
        want = tuple(expected[targets[0]].shape)
        want = (len(targets), *want) if stacked else want
        shape = gf.tensor_shape(gname)
        # a tensor-parallel shard's part of the tensor (ember.distributed.tensor.GGUFCut)
        cut = getattr(shard, "gguf_cut", None) and shard.gguf_cut(targets[0], shape[1:] if stacked else shape)
        if cut:
            shape = cut.shape(shape, stacked)
        fix = fixes.get(gname)
        if fix is None and shape != want:
            raise GGUFError(f"{gf.path}: tensor {gname!r} ({targets[0]}{', ...' if stacked else ''}) "
                            f"has shape {list(shape)}, the metadata implies {list(want)}")
        heads = None
        if permuted and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
        qtype = QT(gf.tensors[gname].tensor_type)
        owners = [t.rsplit(".", 1)[0] for t in targets]
        if qtype in KEPT_TYPES and targets[0].endswith(".weight") and (fix is None or fix.value is None) and all(
                type(model.get_submodule(o)) in _BLOCK_MODULES for o in owners):
            raw = gf.raw(gname, heads).to(device)  # CPU: a view of the file's map (one copy where un-permuted)
            if fix is not None:  # each target takes its rows of the file's tensor
                parts = [raw if r is None else raw[r] for r in fix.rows]
                _check_numel(gf, gname, [(t, p.shape[0] * expected[t].shape[-1]) for t, p in zip(targets, parts)],
                             expected)
                kept.update((o, (qtype, p)) for o, p in zip(owners, parts))
                continue
            raw = raw.reshape(len(targets), -1, raw.shape[-1])
            raw = cut.blocks(raw, qtype) if cut else raw
            kept.update((o, (qtype, raw[i])) for i, o in enumerate(owners))
            continue
        w = gf.tensor(gname, dt if fix is None else torch.float32, device, unpermute_heads=heads)
        w = cut.tensor(w, stacked) if cut else w
        if fix is not None:  # values undone in fp32, then rows picked and reshaped per target
            w = fix.value(w) if fix.value is not None else w
            parts = [w if r is None else w[r] for r in fix.rows]
            _check_numel(gf, gname, [(t, p.numel()) for t, p in zip(targets, parts)], expected)
            state.update((t, p.reshape(expected[t].shape).to(dt)) for t, p in zip(targets, parts))
        elif stacked:
            state.update((target, w[i]) for i, target in enumerate(targets))  # views of one decoded stack
        else:
            state[targets[0]] = w
    model = _install(model, cfg, state, kept, {}, dt, ignore, shard)
    model.extra_weights = mtp_checkpoint_tensors(gf, cfg, mtp, dt, device)  # MTP heads, for speculative decoding
    return model


def _install(model: Transformer, cfg: ModelConfig, state: dict[str, torch.Tensor], kept: dict[str, tuple[Any, torch.Tensor]],
             modules: dict[str, torch.nn.Module], dt: torch.dtype, ignore: set[str], shard=None) -> Transformer:
    """Swap in the block-holding modules (``kept``: path -> (ggml type, rows); ``modules``: path -> module),
    assign the float ``state`` and finish the model for inference."""
    for owner, module in modules.items():
        model.set_submodule(owner, module)
    for owner, (qtype, raw) in kept.items():
        if type(model.get_submodule(owner)) is torch.nn.Embedding:
            model.set_submodule(owner, GGUFEmbedding(raw, qtype, dt))
        else:
            model.set_submodule(owner, GGUFLinear(raw, qtype, state.pop(f"{owner}.bias", None), dt))
    emb = kept.get("model.embed_tokens")
    if cfg.tie_word_embeddings and emb is not None:
        model.lm_head = GGUFLinear(emb[1], emb[0], None, dt)  # the same blocks, held once
    swapped = tuple(f"{owner}." for owner in [*kept, *modules]) + (("lm_head.",) if cfg.tie_word_embeddings and emb else ())
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result
    assert all(k in ignore or k.startswith(swapped) for k in result.missing_keys), result
    if cfg.tie_word_embeddings and emb is None and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    if shard is not None:
        shard.finish(model)
    model.reset_rope()
    model.eval().requires_grad_(False)
    return model


def _blocks_kept(gf: GGUFFile, *also: QT) -> bool:
    """Whether any matrix of the file is of a type held as its blocks (a quantized file), or of a type in ``also``."""
    return any(len(t.shape) >= 2 and (QT(t.tensor_type) in KEPT_TYPES or QT(t.tensor_type) in also)
               for t in gf.tensors.values())


def _check_numel(gf: GGUFFile, gname: str, got: list[tuple[str, int]], expected: dict[str, torch.Tensor]) -> None:
    """Each (target, elements the file gives it) must fill the target exactly."""
    for target, n in got:
        if n != expected[target].numel():
            raise GGUFError(f"{gf.path}: tensor {gname!r} gives {target} {n} values, the metadata implies "
                            f"{list(expected[target].shape)}")


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = "auto", shard=None):
    """Model and tokenizer from one GGUF file, parsing its header once.

    Returns:
        ``(Transformer, Tokenizer)``.
    """
    gf = GGUFFile.open(path)
    tokenizer = load_gguf_tokenizer(gf)
    tokenizer.check_fits(config_from_gguf(gf).vocab_size, str(gf.path))  # before the slow part
    return load_gguf_model(gf, device, dtype, shard), tokenizer
