"""The seam between the model definitions and a runtime that makes some of their pieces faster.

The definitions in :mod:`ember.models` are plain PyTorch. A runtime (:mod:`ember.runtime` for the CPU) fills
the slots below when it is imported, the way HF's ``ALL_ATTENTION_FUNCTIONS`` and kernel hub let a faster
implementation stand in for a module's forward without the modeling file knowing it. Every slot function
returns None (or False) where it does not apply (another device, autograd, a dtype or shape it does not
take), and the definition then runs its own PyTorch code: a slot may only be faster, never different in
what it computes. With every slot empty (no runtime imported) a model still runs, and gives the same
results.
"""

from __future__ import annotations

from typing import Callable

# Linear.forward: (module, x (..., in)) -> (..., out) or None
linear: Callable | None = None
# Linear.cpu_kernel: (module) -> a kernel object bound to its weight, or None
linear_kernel: Callable | None = None
# RMSNorm.forward: (module, x) -> normed x or None
rms_norm: Callable | None = None
# several modules applied to the same x (q/k/v, gate/up): (x, modules) -> [m(x) for m in modules] or None
project: Callable | None = None
# rotate q (B, T, nh, hd) and k (B, T, nkv, hd), contiguous, in place by cos/sin (B, T, hd): -> bool
rope_: Callable | None = None
# query rows against a cache: (q (B, T, nh, hd), k/v (B, nkv, S, hd), bool mask or None) -> (B, T, nh*hd) or None
# (T > 1 only while rows must round as one-token steps, ember.runtime.ops.exact_rows)
attention_decode: Callable | None = None
# each query row alone over its own visible keys, where rows must round as one-token steps (served batches):
# (attend, qs (B, n, T, *) each, kvs (B, 1, S, *) each, bool mask (B or 1, 1, T, S) or None) -> (B, T, width) or
# None; attend(*q rows (1, n, 1, *), *kv runs (1, 1, s, *), None) -> (1, 1, width) is the module's one-token code
attention_rows: Callable | None = None
# one token of a recurrent layer, fp32 state updated in place (ember.runtime.recurrent):
# gated_delta_step(state (B, H, dk, dv), q, k (B, H, dk), v (B, H, dv), g, beta (B, H)) -> out (B, H, dv) or None
gated_delta_step: Callable | None = None
# mamba2_step(state (B, H, P, N), x (B, H, P), dt (B, H), A, D (H,), Bm, Cm (B, G, N)) -> y (B, H, P) or None
mamba2_step: Callable | None = None
# the whole model's forward for the calls the runtime handles end to end (one-sequence CPU decode):
# (model, x, cos, sin, cache, start, k_valid, last_only, hidden_only, session, local) -> out or None, local the
# sliding layers' own (cos, sin) where the model has them (Gemma 3), else None
model_forward: Callable | None = None
