"""Swapping a model's Linear layers for quantized ones: in memory, on load, and into a checkpoint folder.

Which layers: every ``nn.Linear`` (attention, MLP, every MoE expert) except

* ``lm_head``, which has its own format (``QuantSpec.lm_head``): kept in float by
  :func:`quantize_model` (as bitsandbytes does), int8 when loading with ``--quant`` or writing with
  ``ember quantize`` (:data:`DEFAULT_LM_HEAD`, as llama.cpp keeps its output matrix at 6-8 bits
  under 4-bit types). The head is one matrix that sets every logit: per-channel int8 costs it
  next to nothing (the bench's trained demo model with its head untied into int8: corpus
  ppl x1.0001) and halves its bytes, which for a 1.1B
  model in int4 is a fifth of what a decode step reads. A tied head *is* the embedding table and
  is never quantized;
* MoE routers (``*.mlp.gate``): E x H, a rounding error there changes which experts run; likewise the hybrid
  models' small control projections (``STATE_CONTROLS``: Gated DeltaNet's a/b, the shared expert's gate); the
  state-space parameters (conv, ``A_log``, ``dt_bias``, ``D``) are not Linears and stay float anyway;
* names passed in ``skip``.

Embeddings and norms stay in the compute dtype (decode reads one embedding row per token).

A quantized checkpoint is an HF folder whose safetensors hold each quantized module's portable
tensors (``<module>.weight`` codes, ``.scales``/``.zeros`` or ``.absmax``...) and whose config.json
has a ``quantization`` section (:meth:`QuantSpec.section`).
:func:`ember.loading.quantized.load_quantized_weights` reads either kind: float checkpoints are quantized layer by layer as each weight is read (row chunks read
with ``pread``, never the whole model in 16 bits), quantized ones are loaded as stored.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ember.errors import CheckpointError, QuantizationError
from ember.quant.base import QuantizedLinear, RowSource, tensor_rows
from ember.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Linear
from ember.quant.int8 import Int8Linear
from ember.quant.nf4 import BLOCK_SIZE as NF4_BLOCK_SIZE
from ember.quant.nf4 import DOUBLE_QUANT_BLOCK_SIZE, NF4Linear
from ember.quant.mxfp4 import BLOCK as MXFP4_BLOCK
from ember.quant.mxfp4 import Mxfp4Linear

MODES = ("int8", "int4", "nf4", "mxfp4")
CLASSES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear,
                                             "mxfp4": Mxfp4Linear}
SECTION = "quantization"  # config.json key
FORMAT_VERSION = 2  # 2: the LM head may have its own format (section key ``lm_head``)
DEFAULT_LM_HEAD = "int8"  # the head's format under --quant / ember quantize unless told otherwise
LM_HEAD_CHOICES = ("int8", "int4", "nf4", "mxfp4", "same", "none")  # what --lm-head takes


def section_lm_head(section: dict[str, Any]) -> str:
    """The head's format a config.json ``quantization`` section states ("none" or a mode, unchecked);
    a version 1 section says it with ``quantize_lm_head`` (the same mode as the rest, or none)."""
    return section.get("lm_head", section.get("method") if section.get("quantize_lm_head", False) else "none")
ROUTER = re.compile(r"(^|\.)(mlp\.(gate|router)|router\.proj)$")  # Mixtral/Qwen3-MoE's, gpt-oss's, Gemma 4's routers
# Hybrid models' small control projections, kept in float like the routers: Qwen3-Next/3.5's per-head decay and
# write-strength inputs (a, b) and the shared expert's gate (one output).
STATE_CONTROLS = re.compile(r"(^|\.)(linear_attn\.in_proj_(a|b|ba)|mlp\.shared_expert_gate)$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to.

    Attributes:
        mode: "int8", "int4" or "nf4".
        group_size: int4 group along ``in_features`` (32, 64, 128; default 128). Ignored otherwise.
        double_quant: NF4 absmax double quantization (bitsandbytes ``compress_statistics``).
        lm_head: the format of an untied ``lm_head``: None keeps it in the compute dtype, else one of
            the modes (an int4 head takes ``group_size`` when ``mode`` is int4, else 128).
    """

    mode: str
    group_size: int | None = None
    double_quant: bool = True
    lm_head: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizationError(f"unknown quantization {self.mode!r}; use one of {', '.join(MODES)} (or none)")
        if self.lm_head is not None and self.lm_head not in MODES:
            raise QuantizationError(f"unknown LM head format {self.lm_head!r}; use one of {', '.join(MODES)}, "
                                    "same or none")
        if self.mode == "int4":
            g = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if g not in GROUP_SIZES:
                raise QuantizationError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {g}")
            object.__setattr__(self, "group_size", g)
        else:
            object.__setattr__(self, "group_size", None)

    def for_module(self, name: str) -> "QuantSpec":
        """The spec of one chosen module: the head's own for an ``lm_head`` unlike the rest, else this one."""
        if name != "lm_head" or self.lm_head in (None, self.mode):
            return self
        return QuantSpec(self.lm_head, None, self.double_quant)

    def params(self) -> dict[str, Any]:
        """Keyword arguments of the module class's constructors."""
        if self.mode == "int4":
            return {"group_size": self.group_size}
        if self.mode == "nf4":
            return {"double_quant": self.double_quant}
        return {}

    def section(self, not_quantized: Iterable[str], scale_dtype: torch.dtype) -> dict[str, Any]:
        """The config.json ``quantization`` section describing a model quantized with this spec."""
        # Version 1 readers know no per-head format: a checkpoint whose head differs from the rest says 2,
        # so they refuse it with "upgrade Ember" instead of misreading the head.
        version = 2 if self.lm_head not in (None, self.mode) else 1
        out: dict[str, Any] = {"method": self.mode, "bits": CLASSES[self.mode].bits, "format": "ember",
                               "format_version": version}
        if self.mode == "int8":
            out.update(granularity="per_output_channel", symmetric=True)
        elif self.mode == "int4":
            out.update(group_size=self.group_size, symmetric=False,
                       formula="w = (q - 8) * scale + zero, q in 0..15, per group of group_size inputs")
        elif self.mode == "mxfp4":
            out.update(block_size=MXFP4_BLOCK, code="fp4 e2m1 (OCP MX)", scale="e8m0 per block",
                       tensors="<module>.weight_blocks (out, in/32, 16) uint8, <module>.weight_scales (out, in/32) uint8")
        else:
            out.update(block_size=NF4_BLOCK_SIZE, code="nf4 (bitsandbytes)", double_quant=self.double_quant,
                       double_quant_block_size=DOUBLE_QUANT_BLOCK_SIZE if self.double_quant else None)
        kept = sorted(not_quantized)
        head = None if "lm_head" in kept else self.lm_head
        out.update(scale_dtype=_DTYPE_NAMES.get(scale_dtype, str(scale_dtype)), quantize_lm_head=head is not None,
                   lm_head=head or "none", modules="every nn.Linear except not_quantized", not_quantized=kept)
        return out

    @classmethod
    def from_section(cls, section: Any, source: str) -> "QuantSpec":
        """Parse a config.json ``quantization`` section; errors name ``source`` and the field."""
        if not isinstance(section, dict):
            raise QuantizationError(f"{source}: 'quantization' must be an object, got {type(section).__name__}")
        if section.get("format", "ember") != "ember":
            raise QuantizationError(f"{source}: quantization format {section.get('format')!r} is not Ember's; "
                                    "re-quantize the float model with `ember quantize`")
        version = section.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise QuantizationError(f"{source}: quantization.format_version {version!r} is newer than this Ember "
                                    f"reads ({FORMAT_VERSION}); upgrade Ember")
        method = section.get("method")
        if method not in MODES:
            raise QuantizationError(f"{source}: quantization.method {method!r} is not one of {', '.join(MODES)}")
        if not isinstance(section.get("not_quantized", []), list):
            raise QuantizationError(f"{source}: quantization.not_quantized must be a list of module names")
        head = section_lm_head(section)
        if head != "none" and head not in MODES:
            raise QuantizationError(f"{source}: quantization.lm_head {head!r} is not none or one of {', '.join(MODES)}")
        try:
            return cls(method, section.get("group_size"), bool(section.get("double_quant", True)),
                       None if head == "none" else head)
        except QuantizationError as e:
            raise QuantizationError(f"{source}: {e}") from None


def resolve_spec(quant: str | QuantSpec | None, group_size: int | None = None, *, double_quant: bool = True,
                 lm_head: str | None = None, quantize_lm_head: bool = False) -> QuantSpec | None:
    """``None``/"none" -> None; a mode name -> :class:`QuantSpec`; a spec is returned unchanged.

    ``lm_head``: the untied head's format: None/"none" (compute dtype), "same" (as ``quant``) or a mode;
    ``quantize_lm_head=True`` (older spelling) means "same".
    """
    if quant is None or isinstance(quant, QuantSpec):
        return quant
    if not isinstance(quant, str):
        raise QuantizationError(f"quant must be a string (int8, int4, nf4 or none), got {type(quant).__name__}")
    if quant.lower() == "none":
        return None
    if group_size is not None and quant.lower() != "int4":
        raise QuantizationError(f"--group-size applies to int4 only (int8 is per output channel, nf4 uses blocks of "
                                f"{NF4_BLOCK_SIZE}); drop it or use int4")
    head = lm_head.lower() if isinstance(lm_head, str) else lm_head
    if quantize_lm_head or head == "same":
        head = quant.lower()
    return QuantSpec(quant.lower(), group_size, double_quant, None if head in (None, "none") else head)


def select_linears(model: nn.Module, spec: QuantSpec, skip: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Names of the ``nn.Linear`` modules to quantize, and of those kept in float (see module docstring)."""
    skip = tuple(skip)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    chosen, kept = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if (name == "lm_head" and (tied or spec.lm_head is None)) or ROUTER.search(name) or STATE_CONTROLS.search(name) \
                or any(name == s or name.endswith("." + s) for s in skip):
            kept.append(name)
        else:
            chosen.append(name)
    return chosen, kept


def _check_shapes(spec: QuantSpec, shapes: dict[str, tuple[int, int]]) -> None:
    """Fail before anything is swapped: every chosen layer must suit its mode."""
    for name, (out_f, in_f) in shapes.items():
        s = spec.for_module(name)
        mode = s.mode
        if mode == "int4" and in_f % s.group_size:
            fits = [g for g in GROUP_SIZES if in_f % g == 0]
            hint = f"use group size {fits[-1]}" if fits else f"skip it (skip=('{name.rsplit('.', 1)[-1]}',))"
            raise QuantizationError(f"{name}.weight: in_features {in_f} is not a multiple of the int4 group size "
                                    f"{s.group_size}; {hint}")
        if mode == "mxfp4" and in_f % MXFP4_BLOCK:
            raise QuantizationError(f"{name}.weight: MXFP4 scales blocks of {MXFP4_BLOCK} inputs; in_features {in_f} "
                                    f"is not a multiple of {MXFP4_BLOCK}; use int8 or skip it")
        if mode == "nf4" and in_f % 2:
            raise QuantizationError(f"{name}.weight: NF4 packs two values per byte; in_features {in_f} is odd")


def quantize_linear(linear: nn.Linear, spec: QuantSpec | str, name: str = "linear",
                    dtype: torch.dtype | None = None) -> QuantizedLinear:
    """One ``nn.Linear`` -> its quantized replacement (scales/bias in ``dtype``, default the weight's)."""
    spec = resolve_spec(spec) if isinstance(spec, str) else spec
    w = linear.weight.detach()
    dtype = dtype or w.dtype
    bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
    return CLASSES[spec.mode].from_rows(tensor_rows(w), w.shape[0], w.shape[1], bias, dtype, w.device,
                                        name=f"{name}.weight", **spec.params())


def quantize_model(model: nn.Module, mode: str | QuantSpec = "int4", group_size: int | None = None, *,
                   skip: Iterable[str] = (), quantize_lm_head: bool = False, double_quant: bool = True,
                   lm_head: str | None = None) -> nn.Module:
    """Swap the model's Linear layers for quantized ones, in place (layer by layer: each float weight
    is released as soon as its replacement exists, unless something else holds it).

    Args:
        model: an :class:`ember.models.Transformer` (or any module tree of ``nn.Linear``).
        mode: "int8", "int4" or "nf4" (or a :class:`QuantSpec`).
        group_size: int4 group size (32, 64, 128; default 128).
        skip: module names (or dotted suffixes, e.g. "down_proj") to keep in float.
        quantize_lm_head: also quantize an untied ``lm_head`` (same mode).
        double_quant: NF4 double quantization of the block absmax.
        lm_head: the untied head's format instead: "int8", "int4", "nf4", "same" or None (kept float).
    Returns:
        ``model``; its ``config.extra["quantization"]`` describes the result when it has a config.
    Raises:
        QuantizationError: unknown mode, bad group size, or a layer whose shape the mode cannot take
            (nothing is swapped then).
    """
    spec = mode if isinstance(mode, QuantSpec) else resolve_spec(mode, group_size, double_quant=double_quant,
                                                                  lm_head=lm_head, quantize_lm_head=quantize_lm_head)
    if spec is None:
        return model
    chosen, kept = select_linears(model, spec, skip)
    _check_shapes(spec, {n: tuple(model.get_submodule(n).weight.shape) for n in chosen})
    dtype = None
    for name in chosen:
        lin = model.get_submodule(name)
        q = quantize_linear(lin, spec.for_module(name), name)
        dtype = dtype or q.scale_tensor().dtype
        model.set_submodule(name, q)
    _record(model, spec, kept, dtype)
    return model


quantize = quantize_model  # the short name ember.train.tune looks for


def _record(model: nn.Module, spec: QuantSpec, kept: list[str], dtype: torch.dtype | None) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "extra", None), dict):
        cfg.extra[SECTION] = spec.section(kept, dtype or torch.float32)


# ============================================================================== loading
class _FileReader:
    """Reads tensor row ranges from checkpoint files with positioned reads (no memory map, so the
    bytes read for quantization never count towards resident memory once they are dropped)."""

    def __init__(self) -> None:
        self.handles: dict[Path, Any] = {}

    def rows(self, info) -> RowSource:
        cols = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        row_bytes = cols * info.dtype.itemsize

        def read(a: int, b: int) -> torch.Tensor:
            f = self.handles.get(info.file)
            if f is None:
                f = self.handles[info.file] = open(info.file, "rb", buffering=0)
            buf = torch.empty((b - a) * row_bytes, dtype=torch.uint8)
            f.seek(info.begin + a * row_bytes)
            got = f.readinto(buf.numpy()) if buf.numel() else 0
            if got != buf.numel():
                raise CheckpointError(f"{info.file}: tensor {info.name!r} is truncated (short read at row {a})")
            return buf.view(info.dtype).view(b - a, *info.shape[1:]) if info.shape else buf.view(info.dtype)

        return read

    def tensor(self, info) -> torch.Tensor:
        if not info.shape:  # a scalar: read it as one row of one element
            return self.rows(dataclasses.replace(info, shape=(1,)))(0, 1).reshape(())
        return self.rows(info)(0, info.shape[0])

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def _expected_state(cls: type[QuantizedLinear], spec: QuantSpec, out_f: int, in_f: int) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, kind) of the tensors a checkpoint must hold for one quantized module."""
    if cls is Int8Linear:
        return {"weight": ((out_f, in_f), "int8"), "scales": ((out_f,), "float")}
    if cls is Int4Linear:
        g = (out_f, in_f // spec.group_size)
        return {"weight": ((out_f, in_f // 2), "uint8"), "scales": (g, "float"), "zeros": (g, "float")}
    if cls is Mxfp4Linear:
        g = (out_f, in_f // MXFP4_BLOCK)
        return {"weight_blocks": ((*g, MXFP4_BLOCK // 2), "uint8"), "weight_scales": (g, "uint8")}
    blocks = -(-out_f * in_f // NF4_BLOCK_SIZE)
    if not spec.double_quant:
        return {"weight": ((out_f, in_f // 2), "uint8"), "absmax": ((blocks,), "float")}
    return {"weight": ((out_f, in_f // 2), "uint8"), "absmax": ((blocks,), "uint8"),
            "absmax_scale": ((-(-blocks // DOUBLE_QUANT_BLOCK_SIZE),), "float"), "absmax_offset": ((), "float")}


_MALLOC_TRIM: Any = None   # glibc's malloc_trim, or False where there is none (looked up once)


def _release_freed_heap() -> None:
    """Give the pages of freed heap blocks back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantizing a layer frees its fp32 row-chunk temporaries between small long-lived code/scale
    tensors, so glibc's heap cannot shrink and keeps the holes resident: measured on a 125M model,
    35-200 MiB more peak RSS, varying from run to run. Trimming after each layer (well under 1 ms)
    keeps the load's peak at the quantized model plus one chunk, every time.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):   # musl and others: no malloc_trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _kind_ok(dtype: torch.dtype, kind: str) -> bool:
    return {"int8": dtype == torch.int8, "uint8": dtype == torch.uint8}.get(kind, dtype.is_floating_point)
