"""What every weight-only quantized Linear shares: the module contract, row sources, chunked fallback.

A quantized Linear replaces ``nn.Linear`` one for one (docs/design.md, principle 3): same ``in_features``,
``out_features``, optional ``bias``, ``forward(x)`` on (..., in) -> (..., out). It adds
``dequantize()`` (the float weight the kernel effectively multiplies by) and a *portable*
``state_dict``: the tensors a checkpoint stores are the same on every device and CPU ISA, and a
module re-packs them into whatever layout its kernel wants when it is built or loaded.

The fallback path, used where PyTorch has no fused kernel for a (format, device, dtype), is
"dequantize then matmul", done in row chunks so the float copy of the weight is never whole:
on CPU a chunk is small enough to stay in L2 (the matmul then reads it from cache, not DRAM).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels

# (first_row, end_row) -> that row range of a weight (end-first, in) in any float dtype on any device.
RowSource = Callable[[int, int], torch.Tensor]

# Elements of a quantization chunk (fp32 temporaries of ~4 bytes each): bounds load-time peak memory.
QUANT_CHUNK_ELEMENTS = 1 << 24
# Fallback matmul chunks: ~1 MiB of fp32 dequantized weight on CPU (L2-resident), 32M elements on GPUs.
_CPU_CHUNK_ELEMENTS = 1 << 18
_GPU_CHUNK_ELEMENTS = 1 << 25


def tensor_rows(w: torch.Tensor) -> RowSource:
    """A :data:`RowSource` over an in-memory (out, in) tensor."""
    return lambda a, b: w[a:b]


def row_chunks(n_rows: int, n_cols: int, elements: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split ``n_rows`` into ranges of about ``elements`` elements, each a multiple of ``multiple`` rows."""
    step = max(multiple, (elements // max(n_cols, 1)) // multiple * multiple)
    return [(a, min(n_rows, a + step)) for a in range(0, n_rows, step)]


class QuantizedLinear(nn.Module):
    """Base of :class:`Int8Linear`, :class:`Int4Linear` and :class:`NF4Linear`.

    Subclasses set ``mode``/``bits``, register their buffers, and implement
    ``dequantize_rows``, ``canonical_state`` and ``from_canonical``; ``forward`` picks a kernel.

    Attributes:
        in_features, out_features: as ``nn.Linear``.
        bias: (out,) buffer in the compute dtype, or None.
    """

    mode: str = ""
    bits: int = 0
    # canonical tensor names a checkpoint holds for one module (``bias`` comes on top when present)
    state_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)

    # -------------------------------------------------------------- to implement
    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of the dequantized weight, (end-start, in) fp32, on the module's device."""
        raise NotImplementedError

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """The portable tensors a checkpoint stores for this module (bias excluded)."""
        raise NotImplementedError

    @classmethod
    def from_canonical(cls, state: dict[str, torch.Tensor], in_features: int, out_features: int,
                       bias: torch.Tensor | None, dtype: torch.dtype, **params) -> "QuantizedLinear":
        """Rebuild a module from :meth:`canonical_state` tensors (already on the target device)."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective float weight (out, in): what ``forward`` multiplies by, before output rounding."""
        return self.dequantize_rows(0, self.out_features).to(dtype)

    @property
    def device(self) -> torch.device:
        return self.scale_tensor().device

    def scale_tensor(self) -> torch.Tensor:
        """A float buffer of the module (its dtype is the compute dtype the module was built for)."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the stored weight, scales included (bias excluded)."""
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "bias")

    def _chunk_rows(self) -> int:
        """Rows per fallback chunk: a multiple the subclass's row blocks allow."""
        per = _GPU_CHUNK_ELEMENTS if self.device.type != "cpu" else _CPU_CHUNK_ELEMENTS
        return max(1, per // self.in_features)

    def _dequant_linear(self, x2: torch.Tensor) -> torch.Tensor:
        """Fallback ``x2 (M, in) @ W^T -> (M, out)``: dequantize a row chunk, multiply, next chunk."""
        n = self.out_features
        step = self._chunk_rows()
        if step >= n:
            return F.linear(x2, self.dequantize_rows(0, n).to(x2.dtype))
        out = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
        single = x2.shape[0] == 1 and x2.device.type == "cpu"
        for a in range(0, n, step):
            b = min(n, a + step)
            w = self.dequantize_rows(a, b).to(x2.dtype)  # (b-a, in), cache-resident on CPU
            if single:
                torch.mv(w, x2[0], out=out[0, a:b])  # the same mv path ember.models.Linear uses
            else:
                out[:, a:b] = torch.mm(x2, w.t())
        return out

    def cpu_kernel(self) -> "kernels.LinearKernel | None":
        """This module's weights bound to Ember's CPU kernel for few-row products (made once, remade when a
        buffer's storage changes), or None (off the CPU, no kernel for this layout)."""
        w = self._buffers.get("weight")
        if w is None or w.device.type != "cpu":
            return None
        # every buffer (None where an optional one is absent): a new storage for any of them remakes the kernel
        return kernels.cached_kernel(self, tuple(self._buffers.values()), self._build_cpu_kernel)

    def _build_cpu_kernel(self) -> "kernels.LinearKernel | None":
        return None

    def _kernel_forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """The prepared CPU kernel's product (bias included) shaped like the output, or None where it does not
        apply (autograd, too many rows: the caller's own paths run)."""
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return None
        k = self.cpu_kernel()
        y = k(x2) if k is not None else None
        return None if y is None else y.view(*x.shape[:-1], self.out_features)

    def _finish(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    # state_dict holds canonical tensors whatever the runtime layout; loading re-packs them.
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D102 - nn.Module hook
        for name, t in self.canonical_state().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D102 - nn.Module hook
        names = list(self.state_names) + (["bias"] if self.bias is not None else [])
        got = {}
        for name in names:
            key = prefix + name
            if key in state_dict:
                got[name] = state_dict[key]
            else:
                missing_keys.append(key)
        if len(got) != len(names):
            return
        device = self.device if self.device.type != "meta" else got[self.state_names[0]].device
        dtype = self.scale_tensor().dtype
        state = {k: v.detach().to(device) for k, v in got.items() if k != "bias"}
        bias = got["bias"].detach().to(device, dtype) if "bias" in got else None
        new = type(self).from_canonical(state, self.in_features, self.out_features, bias, dtype, **self._params())
        self.__dict__.update({k: v for k, v in new.__dict__.items() if k not in ("_buffers", "_parameters")})
        self._buffers = new._buffers

    def _params(self) -> dict:
        """Construction parameters beyond shapes (group size, double quant, ...)."""
        return {}

    def _apply(self, fn, recurse=True):
        # .to(device)/.to(dtype)/.cuda(): move the portable tensors and re-pack them for the new place,
        # so a kernel layout made for one device never lands on another. ``fn`` decides the target
        # (device, compute dtype) through a probe; codes and fp32 statistics keep their own dtypes.
        probe = fn(self.scale_tensor())
        if probe.device.type == "meta" or self.scale_tensor().device.type == "meta":
            return super()._apply(fn, recurse)
        state = {k: v.to(probe.device) for k, v in self.canonical_state().items()}
        bias = fn(self.bias) if self.bias is not None else None
        new = type(self).from_canonical(state, self.in_features, self.out_features, bias, probe.dtype,
                                        **self._params())
        self.__dict__.update({k: v for k, v in new.__dict__.items() if k not in ("_buffers", "_parameters")})
        self._buffers = new._buffers
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)
