"""Quantized weights from checkpoint folders: quantizing a float checkpoint as it is read, loading
one written by ``ember quantize`` as stored, and writing one (:func:`quantize_checkpoint`).

The quantized Linear classes and the choice of layers (:class:`~ember.quant.quantize.QuantSpec`)
live in :mod:`ember.quant`, which knows nothing of files; this module joins them to the readers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.checkpoint_io import remove_stale_checkpoint_temps, save_hf_checkpoint, side_files
from ember.config import ModelConfig
from ember.errors import CheckpointError, OutputExistsError, QuantizationError
from ember.loading import mxfp4
from ember.loading.dtypes import DTYPE_NAMES
from ember.loading.moe import expert_layout_view
from ember.loading.names import renamed_text_model
from ember.loading.safetensors import Checkpoint, check_layers, load_weights
from ember.loading.wrappers import text_model_view
from ember.models import Transformer
from ember.quant.base import QuantizedLinear
from ember.quant.int4 import Int4Linear
from ember.quant.quantize import (
    CLASSES, DEFAULT_LM_HEAD, SECTION, QuantSpec, _check_shapes, _expected_state, _FileReader, _kind_ok,
    _release_freed_heap, resolve_spec, select_linears,
)


def load_quantized_weights(model: nn.Module, ckpt, dtype: torch.dtype, device: torch.device | str,
                           quant: str | QuantSpec | None = None, group_size: int | None = None,
                           layout: str = "auto", lm_head: str | None = DEFAULT_LM_HEAD, defer=None) -> QuantSpec:
    """Fill a meta-device :class:`~ember.models.Transformer` from ``ckpt``, quantizing on the way.

    Float checkpoint + ``quant``: each chosen Linear is quantized from its weight, read in row chunks
    straight from the file onto ``device``; peak memory ~ the quantized model + one chunk.
    Quantized checkpoint (config.json has a ``quantization`` section): modules are built from the
    stored tensors with no re-quantization (``quant``, if given, must agree with it).
    Everything else (embeddings, norms, routers, a kept lm_head) goes through the normal loader; so do the
    experts of an MXFP4 gpt-oss folder, as stored (:mod:`ember.loading.mxfp4`).

    Args:
        ckpt: :class:`~ember.loading.safetensors.Checkpoint` (or a view with ``names/info/get``).
        dtype: compute dtype (scales, biases, float tensors).
        layout: "auto" (kernel layouts) or "plain" (portable codes; for export).
        lm_head: an untied head's format when quantizing a float checkpoint (see :func:`resolve_spec`);
            a quantized checkpoint's head is loaded as stored.
        defer: a predicate on checkpoint names: those tensors (and the Linears whose weight they are) are left
            on the meta device, for :mod:`ember.offload` to read on demand.
    Returns:
        The :class:`QuantSpec` the model now holds.
    Raises:
        QuantizationError: bad mode/group size/section, or the request contradicts the checkpoint.
        CheckpointError: missing, mis-shaped or mis-typed quantized tensors (naming file and tensor).
    """
    device = torch.device(device)
    cfg = model.config
    config_json = f"{ckpt.folder / 'config.json'}"
    section = cfg.extra.get(SECTION)
    requested = resolve_spec(quant, group_size, lm_head=lm_head)
    if section is not None:
        spec = QuantSpec.from_section(section, config_json)
        if requested is not None and (requested.mode, requested.group_size) != (spec.mode, spec.group_size):
            stored = spec.mode + (f" (group size {spec.group_size})" if spec.group_size else "")
            raise QuantizationError(f"{ckpt.folder}: checkpoint is already quantized as {stored}; load it without "
                                    f"--quant (or with --quant {spec.mode}), or quantize the float model instead")
        kept = list(section.get("not_quantized", []))
        chosen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in kept]
    elif requested is not None:
        spec = requested
        chosen, kept = select_linears(model, spec)
    else:
        raise QuantizationError("load_quantized_weights needs quant= or a quantized checkpoint")
    if defer is not None:
        chosen = [n for n in chosen if not defer(f"{n}.weight")]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in chosen}
    _check_shapes(spec, shapes)

    if mxfp4.is_mxfp4_checkpoint(cfg.extra):
        mxfp4.swap_stored_experts(model, ckpt, dtype)
    names = set(ckpt.names())
    prefixes = tuple(f"{n}." for n in chosen)
    ignore = {k for k in names if k.startswith(prefixes)} | {f"{n}.{p}" for n in chosen for p in ("weight", "bias")}
    if cfg.tie_word_embeddings:
        ignore.add("lm_head.weight")
    if defer is not None:
        ignore |= {k for k in names if defer(k)}
    load_weights(model, ckpt, dtype, device, ignore=tuple(sorted(ignore)))

    reader = _FileReader()
    try:
        for name in chosen:
            out_f, in_f = shapes[name]
            mod_spec = spec.for_module(name)
            cls = CLASSES[mod_spec.mode]
            has_bias = getattr(model.get_submodule(name), "bias", None) is not None
            bias = None
            if has_bias:
                if f"{name}.bias" not in names:
                    raise CheckpointError(f"{ckpt.folder}: missing tensor {name}.bias")
                bias = ckpt.get(f"{name}.bias").to(device=device, dtype=dtype)
            if section is not None:
                q = _load_stored(cls, mod_spec, ckpt, names, reader, name, out_f, in_f, bias, dtype, device, layout)
            else:
                q = _quantize_stored(cls, mod_spec, ckpt, names, reader, name, out_f, in_f, bias, dtype, device,
                                     layout)
            model.set_submodule(name, q)
            _release_freed_heap()
    finally:
        reader.close()
    cfg.extra[SECTION] = spec.section(kept, dtype)
    return spec


def _quantize_stored(cls, spec, ckpt, names, reader, name, out_f, in_f, bias, dtype, device, layout) -> QuantizedLinear:
    key = f"{name}.weight"
    if key not in names:
        raise CheckpointError(f"{ckpt.folder}: weights do not match config.json: missing tensor {key}")
    info = ckpt.info(key)
    if tuple(info.shape) != (out_f, in_f):
        raise CheckpointError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, "
                              f"config.json implies {[out_f, in_f]}")
    if not info.dtype.is_floating_point:
        raise CheckpointError(f"{info.file}: tensor {key!r} is {info.dtype}, not a float weight; is this folder "
                              "already quantized without a 'quantization' section in config.json?")
    kw = dict(spec.params(), layout=layout) if cls is Int4Linear else spec.params()
    return cls.from_rows(reader.rows(info), out_f, in_f, bias, dtype, device, name=key, **kw)


def _load_stored(cls, spec, ckpt, names, reader, name, out_f, in_f, bias, dtype, device, layout) -> QuantizedLinear:
    state = {}
    for part, (shape, kind) in _expected_state(cls, spec, out_f, in_f).items():
        key = f"{name}.{part}"
        if key not in names:
            raise CheckpointError(f"{ckpt.folder}: quantized ({spec.mode}) checkpoint lacks tensor {key!r}; "
                                  "the folder is incomplete or corrupt: re-run `ember quantize`")
        info = ckpt.info(key)
        if tuple(info.shape) != shape or not _kind_ok(info.dtype, kind):
            raise CheckpointError(f"{info.file}: tensor {key!r} is {info.dtype} {list(info.shape)}, a {spec.mode} "
                                  f"layer of shape {[out_f, in_f]} needs {kind} {list(shape)}; the checkpoint is "
                                  "corrupt or was written by another tool")
        read = getattr(ckpt, "read_part", None)  # a tensor-parallel shard's view: its slices of the stored tensors
        state[part] = (read(key) if read else reader.tensor(info)).to(device)
    kw = dict(spec.params(), layout=layout) if cls is Int4Linear else spec.params()
    try:
        return cls.from_canonical(state, in_f, out_f, bias, dtype, **kw)
    except QuantizationError as e:
        raise CheckpointError(f"{ckpt.folder}: {name}: {e}") from None


# ============================================================================== export
def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, mode: str, group_size: int | None = None, *,
                        double_quant: bool = True, quantize_lm_head: bool = False, device: str = "cpu",
                        max_shard_bytes: int = 4 << 30, overwrite: bool = False,
                        lm_head: str | None = DEFAULT_LM_HEAD) -> tuple[Path, dict[str, Any]]:
    """Quantize an HF checkpoint folder into a new folder that :func:`ember.loading.load_model` loads as is.

    Layer by layer (peak memory ~ the quantized model). Scales are kept in the checkpoint's own dtype.
    An untied LM head is written as ``lm_head`` says (default int8; "same", a mode, or None for float).
    The folder is written atomically (temp folder, fsync, rename: see :mod:`ember.checkpoint_io`)
    with the tokenizer and other small files copied along.

    Returns:
        (output folder, summary dict: bytes before/after, layers quantized/kept, the section, and
        ``stale_removed``: temp folders of an earlier killed run to the same output, now removed).
    """
    folder, dest = Path(src), Path(out)
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if raw.get("model_type") == "gpt_oss" and (mode in ("mxfp4", mxfp4.MIXED) or mxfp4.is_mxfp4_checkpoint(raw)):
        # gpt-oss: MXFP4 experts as the hub publishes them, the rest float or (mxfp4+int8, or int8/int4/nf4 on an
        # MXFP4 folder) quantized beside them
        if dest.resolve() == folder.resolve():
            raise QuantizationError(f"{dest}: output folder must differ from the input folder")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
            raise OutputExistsError(f"{dest}: exists and is not an empty folder; choose another -o or pass --overwrite")
        return quantize_gpt_oss_checkpoint(folder, dest, mode, group_size, lm_head=lm_head, device=device,
                                           max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    spec = resolve_spec(mode, group_size, double_quant=double_quant, lm_head=lm_head, quantize_lm_head=quantize_lm_head)
    if spec is None:
        raise QuantizationError("--to must be int8, int4, nf4, mxfp4 or mxfp4+int8 (gpt-oss)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (expected a directory with config.json and *.safetensors)")
    if dest.resolve() == folder.resolve():
        raise QuantizationError(f"{dest}: output folder must differ from the input folder")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:  # fail before the slow part
        raise OutputExistsError(f"{dest}: exists and is not an empty folder; choose another -o or pass --overwrite")
    stale = remove_stale_checkpoint_temps(dest)  # left by a killed earlier run to the same output
    cfg = ModelConfig.from_file(folder)
    if SECTION in cfg.extra:
        raise QuantizationError(f"{folder}: already quantized ({cfg.extra[SECTION].get('method')}); "
                                "quantize the float checkpoint instead")
    # the text model of a multimodal wrapper, Nemotron-H's backbone.* names; mtp.* heads written as they are
    raw_ckpt, mtp = text_model_view(renamed_text_model(Checkpoint(folder), cfg), cfg)
    check_layers(cfg, raw_ckpt)
    ckpt = expert_layout_view(raw_ckpt, cfg)
    dtype = DTYPE_NAMES.get(str(cfg.torch_dtype).lower()) if cfg.torch_dtype else None
    dtype = dtype or ckpt.dtype()
    with torch.device("meta"):
        model = Transformer(cfg)
    load_quantized_weights(model, ckpt, dtype, torch.device(device), spec, layout="plain")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.extra_weights = mtp  # saved beside the model, float, under the names they had (model_state_for_saving)
    before = sum(ckpt.info(n).end - ckpt.info(n).begin for n in ckpt.names()) + \
        sum(t.numel() * t.element_size() for t in mtp.values())
    # config.json: the source's own, byte for byte in meaning, plus the section (regenerating it from
    # ModelConfig could drop keys Ember does not model). Passed as an extra file, it replaces the one
    # save_hf_checkpoint writes, inside the same atomic folder write.
    raw = json.loads((folder / "config.json").read_text())
    raw[SECTION] = cfg.extra[SECTION]
    config = (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode()
    save_hf_checkpoint(dest, model, tokenizer_files=side_files(folder), max_shard_bytes=max_shard_bytes,
                       overwrite=overwrite, extra_files={"config.json": config})
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    after = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    return dest, {"stale_removed": stale, "bytes_before": before, "bytes_after": after, "quantized": len(quantized),
                  "kept": list(cfg.extra[SECTION]["not_quantized"]), "section": cfg.extra[SECTION]}


def quantize_gpt_oss_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, mode: str = "mxfp4",
                                group_size: int | None = None, lm_head: str | None = DEFAULT_LM_HEAD,
                                device: str = "cpu", max_shard_bytes: int = 4 << 30,
                                overwrite: bool = False) -> tuple[Path, dict]:
    """Write a gpt-oss folder with MXFP4 experts as the hub publishes them (``quantization_config``), from a float
    folder (``mode`` mxfp4 or mxfp4+int8) or an MXFP4 one (``mode`` int8/int4/nf4/mxfp4+int8: its experts copied
    as stored). The other Linears stay float (mxfp4) or are quantized (Ember's ``quantization`` section beside).
    Atomic folder write; tokenizer and chat template copied. Returns (folder, summary) as
    :func:`quantize_checkpoint`."""
    folder = Path(src)
    raw = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_file(folder)
    stale = remove_stale_checkpoint_temps(Path(dest))  # left by a killed earlier run to the same output
    stored = mxfp4.is_mxfp4_checkpoint(raw)
    rest = mxfp4.rest_mode(cfg, mode)
    if stored and rest is None:
        raise QuantizationError(f"{folder}: already MXFP4; quantize the float checkpoint instead, or give --to "
                                f"{mxfp4.MIXED} to put the Linears beside its experts in int8")
    if SECTION in raw:
        raise QuantizationError(f"{folder}: already quantized ({raw[SECTION].get('method')}); "
                                "quantize the float checkpoint instead")
    ckpt = expert_layout_view(Checkpoint(folder), cfg)
    dtype = DTYPE_NAMES.get(str(cfg.torch_dtype).lower()) if cfg.torch_dtype else None
    dtype = dtype or ckpt.dtype()
    with torch.device("meta"):
        model = Transformer(cfg)
    if rest is not None:  # experts of an MXFP4 folder swapped in as stored there
        load_quantized_weights(model, ckpt, dtype, torch.device(device), rest, group_size, layout="plain",
                               lm_head=lm_head)
    elif stored:
        mxfp4.load_mxfp4_weights(model, ckpt, dtype, torch.device(device))
    else:
        load_weights(model, ckpt, dtype, torch.device(device),
                     ignore=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    layers = mxfp4.quantize_experts(model)  # float experts -> MXFP4 (stored ones are kept)
    if not layers:
        raise QuantizationError(f"{folder}: model_type {raw.get('model_type')!r} has no gpt-oss experts")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    raw[mxfp4.HF_SECTION] = mxfp4.hf_quantization_config()
    if rest is not None:
        raw[SECTION] = cfg.extra[SECTION]
    config = (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode()
    before = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    dest = save_hf_checkpoint(dest, model, tokenizer_files=side_files(folder), max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite, extra_files={"config.json": config})
    after = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    linears = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    section = dict(cfg.extra[SECTION]) if rest is not None else {"lm_head": "none", "not_quantized": []}
    section["method"] = mxfp4.MIXED if rest == "int8" else f"mxfp4+{rest}" if rest else "mxfp4"
    kept = list(mxfp4.NOT_CONVERTED) if rest is None else section["not_quantized"]
    return dest, {"stale_removed": stale, "bytes_before": before, "bytes_after": after, "quantized": layers + linears,
                  "kept": kept, "section": section}
