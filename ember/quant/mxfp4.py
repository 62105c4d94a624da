"""MXFP4 (OCP Microscaling, FP4 E2M1 elements, E8M0 scale per block of 32) as gpt-oss publishes it.

Format (OCP MX spec v1.0; the layout of the gpt-oss hub checkpoints and HF ``integrations/mxfp4.py``):

* a weight (out, in) in the ``nn.Linear`` orientation is cut into blocks of 32 consecutive inputs of a row;
* ``*_blocks`` (..., out, in/32, 16) uint8: two E2M1 codes per byte, element 2j in the *low* nibble, 2j+1 in the
  high one; code bits ``s e1 e0 m``: :data:`FP4_VALUES` = +-{0, 0.5, 1, 1.5, 2, 3, 4, 6};
* ``*_scales`` (..., out, in/32) uint8: E8M0, the block's scale is ``2 ** (code - 127)`` (255 is NaN);
* value = ``FP4_VALUES[code] * 2 ** (scale - 127)``.

Quantization (spec section 6.3): the block's shared exponent is ``floor(log2(max |v|)) - 2`` (2 = emax of
E2M1), each ``v / 2**exp`` rounds to the nearest E2M1 value (ties to the even code), saturating at +-6.

gpt-oss stores its experts this way (``mlp.experts.gate_up_proj_blocks`` (E, 2I, H/32, 16) with gate/up rows
interleaved, ``down_proj_blocks`` (E, H, I/32, 16)) under ``quantization_config.quant_method: mxfp4``;
:class:`Mxfp4Experts` holds them as stored. :class:`Mxfp4Linear` is the same format for any ``nn.Linear``
(``--quant mxfp4``), stored as ``<module>.weight_blocks``/``weight_scales``.

Kernels: on CPU, :func:`ember.kernels.mxfp4` (``ember/kernels/mxfp4.cpp``) multiplies the bytes as stored for up
to ``MAX_ROWS["mxfp4"]`` activation rows: fp32 activations exactly against the dequantized weight, bf16 ones as
int8 per block of 32 with AVX2 or VNNI where the build has it (E2M1 x 2 are small integers, so the codes are exact
bytes); on CPUs without native bf16 GEMMs bf16 prefill takes that path too. Other batches, CUDA and kernel-less
CPUs dequantize a row tile at a time and multiply it; the float copy of a weight is never whole.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ember import kernels
from ember.errors import QuantizationError
from ember.models.gpt_oss import GptOssExperts
from ember.quant.base import QUANT_CHUNK_ELEMENTS, QuantizedLinear, RowSource, row_chunks, tensor_rows

BLOCK = 32  # values per scale
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
# E8M0 code -> 2 ** (code - 127) in fp32 (code 0 is a subnormal 2**-127; 255 is NaN by the spec)
E8M0_VALUES = torch.tensor([2.0 ** (e - 127) for e in range(255)] + [float("nan")], dtype=torch.float32)
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between consecutive E2M1 magnitudes
_CPU_TILE_ELEMENTS = 1 << 18  # fallback tile: ~1 MiB of fp32, L2-resident
_GPU_TILE_ELEMENTS = 1 << 25


# ============================================================================ the codec
def quantize_mxfp4(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantize w (..., in) float -> blocks (..., in/32, 16) uint8, scales (..., in/32) uint8 (E8M0).

    Raises:
        QuantizationError: ``in`` not a multiple of 32, or inf/NaN values.
    """
    if w.shape[-1] % BLOCK:
        raise QuantizationError(f"{name}: MXFP4 needs in_features divisible by {BLOCK}, got {w.shape[-1]}")
    v = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    if not torch.isfinite(v).all():
        raise QuantizationError(f"{name}: weight has inf/NaN values; cannot quantize it")
    amax = v.abs().amax(dim=-1)
    exp = torch.floor(torch.log2(amax.clamp_min(2.0 ** -127))) - 2  # shared exponent: emax(E2M1) = 2
    exp = exp.clamp(-127, 127)
    scaled = v / torch.exp2(exp)[..., None]
    mag = scaled.abs().contiguous()  # bucketize copies a strided input (transposed experts) anyway
    mids = _MIDPOINTS.to(mag.device)
    lo = torch.bucketize(mag, mids, right=False)  # ties -> the smaller magnitude
    hi = torch.bucketize(mag, mids, right=True)   # ties -> the larger one
    code = torch.where((lo == hi) | (lo % 2 == 0), lo, hi)  # ties to the even code (spec: round half to even)
    code = code + 8 * ((scaled < 0) & (code > 0))
    code = code.to(torch.uint8).reshape(*code.shape[:-1], BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)  # element 2j in the low nibble
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256,) int64: byte -> its two fp32 values (low nibble's first), bit-cast for one index_select."""
    b = torch.arange(256)
    pairs = torch.stack((FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]), dim=-1).contiguous()
    return pairs.view(torch.int64).view(256).to(device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks (..., G, 16) uint8, scales (..., G) uint8 -> (..., G * 32) in ``dtype`` (computed in fp32: exact)."""
    vals = torch.index_select(_pair_table(blocks.device), 0, blocks.reshape(-1).to(torch.int32)).view(torch.float32)
    vals = vals.view(*scales.shape, BLOCK) * E8M0_VALUES.to(blocks.device)[scales.long()][..., None]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).to(dtype)


def mxfp4_matmul(x2: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 (M, in) @ W^T for W (out, in) stored as blocks (out, in/32, 16), scales (out, in/32) -> (M, out).

    The CPU kernel where it takes the call (module docstring), else tile by tile: dequantize ~1 MiB of rows (CPU)
    or 32M elements (GPU), multiply, next tile.
    """
    out_f, G = scales.shape
    in_f = G * BLOCK
    if x2.device.type == "cpu":
        y = kernels.mxfp4(x2, blocks.reshape(out_f, G, BLOCK // 2), scales)
        if y is not None:
            return y
    per = _GPU_TILE_ELEMENTS if x2.device.type != "cpu" else _CPU_TILE_ELEMENTS
    step = max(1, per // in_f)
    if step >= out_f:
        return F.linear(x2, dequantize_mxfp4(blocks, scales, x2.dtype))
    out = torch.empty(x2.shape[0], out_f, dtype=x2.dtype, device=x2.device)
    for a in range(0, out_f, step):
        b = min(out_f, a + step)
        out[:, a:b] = F.linear(x2, dequantize_mxfp4(blocks[a:b], scales[a:b], x2.dtype))
    return out


# ============================================================================ Linear
class Mxfp4Linear(QuantizedLinear):
    """Weight-only MXFP4 Linear (``--quant mxfp4`` for any family). Buffers (also the checkpoint tensors):
    ``weight_blocks`` (out, in/32, 16) uint8, ``weight_scales`` (out, in/32) uint8, optional ``bias``."""

    mode, bits = "mxfp4", 4
    state_names = ("weight_blocks", "weight_scales")

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        out_f, G = scales.shape
        if blocks.shape != (out_f, G, BLOCK // 2) or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise QuantizationError(f"MXFP4 tensors are {blocks.dtype} {list(blocks.shape)} / {scales.dtype} "
                                    f"{list(scales.shape)}; expected uint8 {[out_f, G, BLOCK // 2]} / uint8 {[out_f, G]}")
        super().__init__(G * BLOCK, out_f, bias)
        self.register_buffer("weight_blocks", blocks.contiguous())
        self.register_buffer("weight_scales", scales.contiguous())
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=blocks.device), persistent=False)

    @classmethod
    def from_rows(cls, rows: RowSource, out_features: int, in_features: int, bias: torch.Tensor | None,
                  dtype: torch.dtype, device: torch.device | str, name: str = "weight", **_) -> "Mxfp4Linear":
        if in_features % BLOCK:
            raise QuantizationError(f"{name}: MXFP4 needs in_features divisible by {BLOCK}, got {in_features}")
        G = in_features // BLOCK
        blocks = torch.empty(out_features, G, BLOCK // 2, dtype=torch.uint8, device=device)
        scales = torch.empty(out_features, G, dtype=torch.uint8, device=device)
        for a, b in row_chunks(out_features, in_features, QUANT_CHUNK_ELEMENTS):
            blocks[a:b], scales[a:b] = quantize_mxfp4(rows(a, b).to(device), f"{name} rows {a}..{b - 1}")
        return cls(blocks, scales, bias, dtype)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, dtype: torch.dtype | None = None) -> "Mxfp4Linear":
        w = linear.weight.detach()
        bias = linear.bias.detach().to(dtype or w.dtype) if linear.bias is not None else None
        return cls.from_rows(tensor_rows(w), w.shape[0], w.shape[1], bias, dtype or w.dtype, w.device)

    @classmethod
    def from_canonical(cls, state, in_features, out_features, bias, dtype, **_) -> "Mxfp4Linear":
        return cls(state["weight_blocks"], state["weight_scales"], bias, dtype)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"weight_blocks": self.weight_blocks, "weight_scales": self.weight_scales}

    def scale_tensor(self) -> torch.Tensor:
        return self._dtype_probe

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        return dequantize_mxfp4(self.weight_blocks[start:end], self.weight_scales[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = mxfp4_matmul(x.reshape(-1, self.in_features), self.weight_blocks, self.weight_scales)
        return self._finish(y, shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={BLOCK}, format=mxfp4 (e2m1 + e8m0)"


# ============================================================================ gpt-oss experts
class Mxfp4Experts(GptOssExperts):
    """:class:`~ember.models.gpt_oss.GptOssExperts` with the experts as the hub stores them (module docstring):
    buffers ``gate_up_proj_blocks`` (E, 2I, H/32, 16), ``gate_up_proj_scales`` (E, 2I, H/32), ``down_proj_blocks``
    (E, H, I/32, 16), ``down_proj_scales`` (E, H, I/32) uint8, and the float biases. Only the two products differ:
    each multiplies one expert's blocks as stored (:func:`mxfp4_matmul`)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, alpha: float, limit: float,
                 tensors: dict[str, torch.Tensor]) -> None:
        torch.nn.Module.__init__(self)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.alpha, self.limit = alpha, limit
        E, H, inter = num_experts, hidden_size, intermediate_size
        want = expected_expert_shapes(E, H, inter)
        for name, (shape, kind) in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape or (kind == "uint8") != (t.dtype == torch.uint8):
                raise QuantizationError(f"{name}: {t.dtype} {list(t.shape)}, expected {kind} {list(shape)}")
            if kind == "uint8":
                self.register_buffer(name, t.contiguous())
            else:
                self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    @classmethod
    def from_float(cls, experts: GptOssExperts, dtype: torch.dtype | None = None) -> "Mxfp4Experts":
        """Quantize float experts (HF's (E, H, 2I)/(E, I, H) x @ W layout) expert by expert."""
        E = experts.num_experts
        tensors: dict[str, torch.Tensor] = {}
        for kind in ("gate_up_proj", "down_proj"):
            w = getattr(experts, kind).detach()  # (E, in, out)
            parts = [quantize_mxfp4(w[e].t(), f"{kind}[{e}]") for e in range(E)]  # each (out, in/32, 16)
            tensors[f"{kind}_blocks"] = torch.stack([p[0] for p in parts])
            tensors[f"{kind}_scales"] = torch.stack([p[1] for p in parts])
            bias = getattr(experts, f"{kind}_bias").detach()
            tensors[f"{kind}_bias"] = bias.to(dtype or bias.dtype)
        return cls(E, experts.hidden_size, experts.intermediate_size, experts.alpha, experts.limit, tensors)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = mxfp4_matmul(x, self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e])
        return y + self.gate_up_proj_bias[e].to(y.dtype)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        y = mxfp4_matmul(h, self.down_proj_blocks[e], self.down_proj_scales[e])
        return y + self.down_proj_bias[e].to(y.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF's float tensors (``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H)): what the products multiply by."""
        return {kind: dequantize_mxfp4(getattr(self, f"{kind}_blocks"), getattr(self, f"{kind}_scales"),
                                       dtype).transpose(1, 2).contiguous() for kind in ("gate_up_proj", "down_proj")}

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, mxfp4"


def expected_expert_shapes(E: int, H: int, inter: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, "uint8" or "float") of one layer's MXFP4 expert tensors, as the hub stores them."""
    return {
        "gate_up_proj_blocks": ((E, 2 * inter, H // BLOCK, BLOCK // 2), "uint8"),
        "gate_up_proj_scales": ((E, 2 * inter, H // BLOCK), "uint8"),
        "gate_up_proj_bias": ((E, 2 * inter), "float"),
        "down_proj_blocks": ((E, H, inter // BLOCK, BLOCK // 2), "uint8"),
        "down_proj_scales": ((E, H, inter // BLOCK), "uint8"),
        "down_proj_bias": ((E, H), "float"),
    }
