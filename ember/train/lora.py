"""LoRA: low-rank adapters around any Linear, in the file format HF PEFT reads and writes.

``LoRALinear`` wraps a frozen base projection (``nn.Linear``, Ember's ``Linear``, or a quantized
``Int8Linear``/``Int4Linear``/``NF4Linear``: QLoRA is LoRA over ``NF4Linear``) and adds
``scaling * B @ A`` to it::

    y = base(x) + scaling * (dropout(x) @ A^T) @ B^T        A: (r, in)  B: (out, r)

with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), A initialised as PEFT does
(Kaiming-uniform, a=sqrt(5)) and B zero, so a fresh adapter changes nothing.

Training uses two small autograd functions per projection (:func:`lora_linear_train`) instead of
PEFT's chain of modules: the LoRA product is added into the base output in place, A and B (fp32
masters) are cast to the activation dtype per call (they are tiny), only ``x`` (shared with the
sibling projections that read the same input), the (N, r) product and, with dropout, a 1-byte
mask are kept for backward, and the base contributes only ``grad_x = grad_y @ W`` (its weights
are frozen, so no weight gradient is formed). For a quantized base the weight is dequantized
transiently (or the layer's own ``input_grad`` is used). PEFT instead casts the input to fp32,
applies dropout to a copy, and adds fp32 (N, out) products to the base output per projection.

Module names are HF's (``model.layers.3.self_attn.q_proj``). The adapter files in PEFT's format are
:mod:`ember.train.adapter_files`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ember.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# The names PEFT users write for "every projection" of a Llama-family block.
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters; field names are PEFT's ``LoraConfig`` names.

    Attributes:
        r: rank.
        lora_alpha: scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout on the adapter's input during training.
        target_modules: ``"all-linear"`` (every Linear except ``lm_head``), a list of module-name
            suffixes (``["q_proj", "v_proj"]``) or full names, or a regex string matched against
            whole module names (PEFT's rule).
        use_rslora: rank-stabilised scaling.
        rank_pattern / alpha_pattern: per-module overrides, PEFT's ``{regex: value}`` form.
        layers_to_transform: only these layer indices (PEFT's field), or None for all.
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None

    def to_peft_dict(self, base_model_name_or_path: str | None, targets: list[str]) -> dict[str, Any]:
        """The ``adapter_config.json`` object (PEFT 0.17+ field set, LoRA defaults elsewhere)."""
        return {
            "alpha_pattern": dict(self.alpha_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": self.lora_alpha,
            "lora_bias": False,
            "lora_dropout": self.lora_dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, raw: dict[str, Any], source: str = ADAPTER_CONFIG) -> "LoRAConfig":
        """Read a PEFT ``adapter_config.json`` object; refuse features Ember does not implement."""
        if raw.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: peft_type is {raw.get('peft_type')!r}; Ember loads LORA adapters only")
        unsupported = [
            ("use_dora", True, "DoRA adapters"),
            ("fan_in_fan_out", True, "fan_in_fan_out (GPT-2 Conv1D layout)"),
            ("lora_bias", True, "LoRA bias terms"),
        ]
        for key, bad, what in unsupported:
            if raw.get(key) == bad:
                raise AdapterError(f"{source}: {key}={bad!r}: {what} are not supported by Ember")
        if raw.get("bias", "none") != "none":
            raise AdapterError(f"{source}: bias={raw['bias']!r}: only bias='none' adapters are supported")
        if raw.get("modules_to_save"):
            raise AdapterError(f"{source}: modules_to_save={raw['modules_to_save']!r}: adapters that also train "
                               "whole modules are not supported; retrain without modules_to_save")
        if raw.get("layer_replication"):
            raise AdapterError(f"{source}: layer_replication is not supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if raw.get(key) is None:
                raise AdapterError(f"{source}: missing field {key!r}")
        targets = raw["target_modules"]
        if not isinstance(targets, str):
            targets = sorted(targets)
        layers = raw.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        return cls(
            r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), lora_dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=targets, use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            layers_to_transform=layers,
        )


# ---------------------------------------------------------------------------------------- the module
def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor: the parameter itself, or dequantized.

    Quantized layers provide ``dequantize()`` (Ember's quant modules) or ``dequantized_weight()``.
    """
    for name in ("dequantize", "dequantized_weight"):
        fn = getattr(base, name, None)
        if callable(fn):
            return fn()
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    raise AdapterError(f"{type(base).__name__}: cannot get a dense weight (no dequantize() and no float weight)")


def _input_grad(base: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """grad_x of ``y = base(x)`` with frozen weights: g (N, out) @ W (out, in) -> (N, in).

    A quantized base (``dequantize_rows``) is dequantized a block of output rows at a time, so the
    full float weight never exists: grad_x = sum over blocks of g[:, a:b] @ W[a:b].
    """
    fn = getattr(base, "input_grad", None)  # a quantized layer may fuse dequantize + matmul
    if callable(fn):
        return fn(g)
    rows = getattr(base, "dequantize_rows", None)
    if callable(rows):
        n = base.out_features
        step = max(1, min(n, (1 << 22) // max(1, base.in_features)))  # ~4M weights per block
        out = torch.mm(g[:, :step], rows(0, min(n, step)).to(g.dtype))  # (N, in)
        for a in range(step, n, step):
            b = min(n, a + step)
            out.addmm_(g[:, a:b], rows(a, b).to(g.dtype))
        return out
    w = base_weight(base)
    return torch.mm(g, w.to(g.dtype))


def dropped_positions(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Flat indices of the elements dropout removes from ``n`` elements, each with probability ``p``.

    Exactly i.i.d. Bernoulli(p) per element, drawn as geometric gaps between drops (inverse CDF
    of uniforms), so the cost is O(p * n) random numbers instead of O(n) -- for LoRA's usual
    p = 0.05 that is 20x fewer, and no (N, in) mask or masked copy of the input is ever formed.
    """
    if p <= 0.0 or n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    inv_log_keep = 1.0 / math.log1p(-p)
    expect = n * p
    chunks: list[torch.Tensor] = []
    last = -1
    while last < n - 1:
        m = int(expect + 6.0 * math.sqrt(expect) + 16)
        u = torch.rand(m, device=device)
        gaps = torch.log1p(-u).mul_(inv_log_keep).to(torch.int64).add_(1)  # Geometric(p) on {1, 2, ...}
        pos = gaps.cumsum_(0).add_(last)  # increasing
        chunks.append(pos)
        last = int(pos[-1])
    pos = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return pos[:int(torch.searchsorted(pos, n))]


def _drop(x2: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """A copy of x2 with the ``drop`` positions zeroed (the unscaled dropout output)."""
    xd = x2.clone(memory_format=torch.contiguous_format)  # x2 may be a strided view
    xd.view(-1).index_fill_(0, drop, 0)
    return xd


class _LoRADown(torch.autograd.Function):
    """xa = drop(x) @ A^T / (1 - p): the (N, r) projection; saves x and the dropped positions.

    Dropout draws only the positions it zeroes (:func:`dropped_positions`) and applies them with
    an ``index_fill`` on a copy of x; the 1/(1-p) rescale is applied to the small (N, r) product.

    Split from :class:`_LoRAUp` on purpose: this is the last op of a projection to save
    activations, so under non-reentrant checkpointing the recompute stops right after it when it
    is the last saver of a checkpointed block, and the base matmul that follows is skipped.
    """

    @staticmethod
    def forward(ctx, x2, lora_a, a, p):  # noqa: D102 - autograd plumbing
        # a: lora_a in x2's dtype (r, in), cast once per optimizer step by LoRALinear
        drop = None
        if p > 0.0:
            drop = dropped_positions(x2.numel(), p, x2.device)
            xa = torch.mm(_drop(x2, drop), a.t()).mul_(1.0 / (1.0 - p))  # (N, r)
        else:
            xa = torch.mm(x2, a.t())  # (N, r)
        ctx.lora_a, ctx.a, ctx.p = lora_a, a, p
        ctx.save_for_backward(x2, drop)
        return xa

    @staticmethod
    def backward(ctx, gxa):  # noqa: D102
        x2, drop = ctx.saved_tensors
        lora_a, a, p = ctx.lora_a, ctx.a, ctx.p
        gxa = gxa.to(x2.dtype)
        if p > 0.0:
            gxa = gxa * (1.0 / (1.0 - p))
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            xd = x2 if drop is None else _drop(x2, drop)
            grad_a = torch.mm(gxa.t(), xd).to(lora_a.dtype)  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(gxa, a)  # (N, in)
            if drop is not None:
                grad_x.view(-1).index_fill_(0, drop, 0)
        return grad_x, grad_a, None, None


class _LoRAUp(torch.autograd.Function):
    """y = base(x) + s * xa @ B^T with a frozen base; saves nothing recomputable.

    Backward needs only the frozen weight (grad_x = g @ W) and the tiny (N, r) ``xa`` and B,
    which are kept on ``ctx`` (r/in of the input's size), so a checkpoint recompute can skip it.
    """

    @staticmethod
    def forward(ctx, x, xa, lora_b, b, base, scaling):  # noqa: D102
        # b: lora_b in the activation dtype (out, r)
        y = base(x)  # (..., out); grad mode is off inside Function.forward
        y2 = y.view(-1, y.shape[-1])  # (N, out)
        if y2.dtype == xa.dtype:
            y2.addmm_(xa, b.t(), alpha=scaling)
        else:
            y2.add_(torch.mm(xa, b.t()), alpha=scaling)
        ctx.base, ctx.scaling, ctx.xa, ctx.lora_b, ctx.b, ctx.shape = base, scaling, xa.detach(), lora_b, b, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        s, xa, lora_b, b = ctx.scaling, ctx.xa, ctx.lora_b, ctx.b
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        if g.dtype != xa.dtype:
            g = g.to(xa.dtype)
        grad_x = grad_xa = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), xa).mul_(s).to(lora_b.dtype)  # (out, r)
        if ctx.needs_input_grad[1]:
            grad_xa = torch.mm(g, b).mul_(s)  # (N, r)
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(ctx.base, g).view(ctx.shape)  # (..., in)
        return grad_x, grad_xa, grad_b, None, None, None


def lora_linear_train(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: nn.Module,
                      scaling: float, p: float, a: torch.Tensor | None = None,
                      b: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``base(x) + s * (drop(x) @ A^T) @ B^T`` for a frozen ``base`` (x: (..., in)).

    ``a``/``b`` are A and B already cast to x's dtype (default: cast here).
    """
    a = lora_a.detach().to(x.dtype) if a is None else a
    b = lora_b.detach().to(x.dtype) if b is None else b
    xa = _LoRADown.apply(x.reshape(-1, x.shape[-1]), lora_a, a, p)
    return _LoRAUp.apply(x, xa, lora_b, b, base, scaling)


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (see module docstring).

    Args:
        base: any module with ``in_features``/``out_features`` computing ``x @ W^T (+ b)``.
        r: rank.
        alpha: scaling numerator.
        dropout: dropout probability on the adapter input (training only).
        use_rslora: scaling = alpha / sqrt(r) instead of alpha / r.
        dtype: dtype of A and B (fp32 masters for training; the model dtype for inference).

    Attributes:
        lora_A: (r, in) parameter.  lora_B: (out, r) parameter.  merged: whether W holds W + s*B@A.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _module_device(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # = PEFT's default init of lora_A
        self.merged = False
        self.disabled = False
        self._cast_key: tuple | None = None
        self._cast_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (for code that inspects ``proj.weight``: dtype, device, shape)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        a, b = self._cast(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad):
            p = self.dropout if self.training else 0.0
            return lora_linear_train(x, self.lora_A, self.lora_B, self.base_layer, self.scaling, p, a, b)
        # Inference: base output, then the low-rank product added in place.
        y = self.base_layer(x)
        xa = torch.mm(x.reshape(-1, x.shape[-1]), a.t())  # (N, r)
        y2 = y.view(-1, y.shape[-1])
        if y2.dtype == xa.dtype:
            y2.addmm_(xa, b.t(), alpha=self.scaling)
        else:
            y2.add_(torch.mm(xa, b.t()).to(y2.dtype), alpha=self.scaling)
        return y

    def _cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in ``dtype``, detached; cached until the optimizer changes them (tensor versions)."""
        A, B = self.lora_A, self.lora_B
        if A.dtype == dtype:
            return A.detach(), B.detach()
        key = (dtype, A._version, B._version, A.data_ptr(), B.data_ptr(), torch.is_inference_mode_enabled())
        if self._cast_key != key:
            with torch.no_grad():
                self._cast_cache = (A.detach().to(dtype), B.detach().to(dtype))
            self._cast_key = key
        return self._cast_cache

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (W += s*B@A, computed in fp32); forward then skips LoRA."""
        if self.merged:
            return
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise AdapterError(f"cannot merge into a quantized {type(self.base_layer).__name__}; "
                               "load the base model unquantized to merge")
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------- injection
def is_linear_like(m: nn.Module) -> bool:
    """A leaf projection LoRA can wrap: ``nn.Linear`` or a quantized Linear (has in/out_features)."""
    if isinstance(m, LoRALinear):
        return False
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
            and not any(True for _ in m.children()))


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def target_module_names(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the modules ``cfg.target_modules`` selects, in model order (PEFT's matching rules)."""
    targets = cfg.target_modules
    names: list[str] = []
    for name, m in model.named_modules():
        if not name or not is_linear_like(m):
            continue
        if isinstance(targets, str):
            if targets == ALL_LINEAR:
                ok = name != "lm_head" and not name.endswith(".lm_head")
            else:
                ok = re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok and cfg.layers_to_transform is not None:
            mm = _LAYER_RE.search(name)
            ok = mm is not None and int(mm.group(1)) in cfg.layers_to_transform
        if ok:
            names.append(name)
    return names


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def inject_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> list[str]:
    """Replace every targeted projection of ``model`` with a :class:`LoRALinear`; freeze everything else.

    Args:
        model: an Ember :class:`~ember.models.Transformer` (or any module with HF-named Linears).
        cfg: rank, alpha, dropout, targets.
        dtype: dtype of the adapter weights (fp32 masters for training).
        seed: seed for the A initialisation (None: the global RNG).
    Returns:
        The wrapped module names.
    Raises:
        AdapterError: no module matched ``cfg.target_modules``.
    """
    names = target_module_names(model, cfg)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear_like(m)})
        raise AdapterError(f"target_modules {cfg.target_modules!r} matched no Linear module; "
                           f"this model's projections are: {', '.join(linear)}")
    model.requires_grad_(False)
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        for name in names:
            parent, attr = _parent(model, name)
            base = getattr(parent, attr)
            r = int(_pattern_value(cfg.rank_pattern, name, cfg.r))
            alpha = float(_pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha))
            setattr(parent, attr, LoRALinear(base, r, alpha, cfg.lora_dropout, cfg.use_rslora, dtype=dtype))
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module, unwrap: bool = True) -> None:
    """Fold every adapter into its base weight; with ``unwrap`` put the plain base modules back."""
    for name, m in list(lora_modules(model).items()):
        m.merge()
        if unwrap:
            parent, attr = _parent(model, name)
            setattr(parent, attr, m.base_layer)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
