"""The recurrent layers' per-token state updates on the CPU kernels (``ember/kernels/recurrent.cpp``).

:func:`gated_delta_step` and :func:`mamba2_step` fill the slots of the same names in :mod:`ember.models.accel`:
the decode step of :mod:`ember.models.gated_deltanet` and :mod:`ember.models.mamba2` calls them, and runs its
own PyTorch code where they return None (kernels off or not built, another device, autograd, a state that is
not fp32). Each updates the fp32 state in place, as the PyTorch code's result would replace it.
"""

from __future__ import annotations

import ctypes

import torch

from ember import kernels

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's two functions declared (once per loaded library)."""
    lib = kernels.load()
    if lib is None:
        return None
    if not lib.__dict__.get("_ember_recurrent_declared"):
        lib.ember_gated_delta_step.restype = None
        lib.ember_gated_delta_step.argtypes = [_P] * 7 + [_I64] * 3 + [_INT]
        lib.ember_mamba2_step.restype = None
        lib.ember_mamba2_step.argtypes = [_P] * 8 + [_I64] * 5 + [_INT]
        lib._ember_recurrent_declared = True
    return lib


def _usable(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype is torch.float32 and not t.requires_grad for t in ts)


def gated_delta_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor) -> torch.Tensor | None:
    """One token of the gated delta rule: state (B, H, dk, dv) updated in place; q, k (B, H, dk); v (B, H, dv);
    g, beta (B, H); all fp32. Returns the outputs (B, H, dv), or None where the kernel does not apply."""
    lib = _lib()
    if lib is None or not state.is_contiguous() or not _usable(state, q, k, v, g, beta):
        return None
    B, H, dk, dv = state.shape
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    out = torch.empty(B, H, dv)
    lib.ember_gated_delta_step(state.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(),
                               beta.data_ptr(), out.data_ptr(), B * H, dk, dv, torch.get_num_threads())
    return out


def mamba2_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                Cm: torch.Tensor, D: torch.Tensor) -> torch.Tensor | None:
    """One token of Mamba-2's selective state update: state (B, H, P, N) updated in place; x (B, H, P); dt (B, H);
    A, D (H,); Bm, Cm (B, G, N) per group; all fp32. Returns y (B, H, P), or None where the kernel does not apply."""
    lib = _lib()
    if lib is None or not state.is_contiguous() or not _usable(state, x, dt, A, Bm, Cm, D):
        return None
    B, H, P, N = state.shape
    x, dt, A, Bm, Cm, D = (t.contiguous() for t in (x, dt, A, Bm, Cm, D))
    y = torch.empty(B, H, P)
    lib.ember_mamba2_step(state.data_ptr(), x.data_ptr(), dt.data_ptr(), A.data_ptr(), Bm.data_ptr(), Cm.data_ptr(),
                          D.data_ptr(), y.data_ptr(), B, H, P, N, Bm.shape[1], torch.get_num_threads())
    return y
