"""How fast: decode steps, prefill and training tokens/s from bytes streamed and FLOPs (docs/planner.md)."""

from __future__ import annotations

import math

from ember.config import ModelConfig
from ember.hardware import Hardware
from ember.planner.memory import kv_cache_bytes, linears, lora_parameters, weight_bytes
from ember.planner.workload import DTYPE_BYTES, Workload


def _kernel(wl: Workload, rows: int) -> str:
    path = "mv" if rows == 1 else "mm"
    q = wl.weight_quant
    return f"{path}-{wl.dtype}" if q == "none" else f"{path}-{q}"


def decode_step_seconds(cfg: ModelConfig, hw: Hardware, wl: Workload, kv_len: int) -> tuple[float, float]:
    """(seconds per decode step for ``wl.batch`` sequences with ``kv_len`` cached tokens each, bytes read)."""
    B = wl.batch
    b = DTYPE_BYTES[wl.dtype]
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    w_read = wb.read_per_step(B, cfg.hidden_size * b)
    kv_read = kv_cache_bytes(cfg, max(kv_len, 1), B, wl.kv_dtype or wl.dtype)
    working_set = wb.total + kv_read
    bw = hw.stream_bandwidth(_kernel(wl, B), working_set, fallback=f"{'mv' if B == 1 else 'mm'}-{wl.dtype}",
                             hidden=cfg.hidden_size)
    kv_bw = hw.stream_bandwidth(f"mv-{wl.kv_dtype or wl.dtype}", working_set)
    t_w = w_read / bw
    if wl.weight_quant != "none":
        # The quantized kernels stream the projections; the head (unless quantized), the embedding row
        # and the norms stay in the compute dtype and stream at its rate (for a small model the 16-bit
        # head can be half of what a step reads); a head in another format streams at that kernel's rate.
        path = "mv" if B == 1 else "mm"
        head = wb.lm_head if wb.lm_head else wb.embedding
        head_q = wb.head_quant if wb.lm_head else "none"
        float_read = wb.other + (head if head_q == "none" else 0.0)
        float_read += min(wb.embedding, B * cfg.hidden_size * b) if wb.lm_head else 0.0
        float_read = min(float_read, w_read)
        head_read = head if head_q not in ("none", wl.weight_quant) else 0.0
        bw_float = hw.stream_bandwidth(f"{path}-{wl.dtype}", working_set, hidden=cfg.hidden_size)
        bw_head = hw.stream_bandwidth(f"{path}-{head_q}", working_set, fallback=f"{path}-{wl.dtype}",
                                      hidden=cfg.hidden_size) if head_read else bw
        t_w = (w_read - float_read - head_read) / bw + float_read / bw_float + head_read / bw_head
    t_mem = t_w + kv_read / kv_bw
    flops = 2 * wb.linear_params_active * B + 4 * B * kv_len * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    t_flop = flops / (hw.peak_flops(wl.dtype) * hw.compute_efficiency)
    step, layer, expert = hw.overheads(wl.dtype)
    calls = wb.moe_layers * (cfg.num_experts_per_tok if B == 1 else wb.experts_touched(B))
    t_disp = step + cfg.num_hidden_layers * layer + calls * expert
    hops = (hw.nodes - 1) * (hw.interconnect_latency_s + (B * cfg.hidden_size * b / hw.interconnect_bandwidth
                                                           if hw.interconnect_bandwidth else 0.0))
    if hw.device == "cpu":
        t = max(t_mem, t_flop) + t_disp
    else:
        t = max(t_mem, t_flop, t_disp)
    return t + hops, w_read + kv_read


def prefill_seconds(cfg: ModelConfig, hw: Hardware, wl: Workload, tokens: int | None = None) -> float:
    """Seconds to prefill ``tokens`` prompt tokens per sequence for the batch (one forward, or chunks)."""
    T = tokens if tokens is not None else wl.prompt_tokens
    B = wl.batch
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant, wl.head_quant)
    flops = 2 * wb.linear_params_active * B * T + 2 * B * T * T * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    flops -= 2 * B * (T - 1) * cfg.vocab_size * cfg.hidden_size  # the LM head runs on the last token only
    t_flop = flops / (hw.peak_flops(wl.dtype) * hw.compute_efficiency)
    chunks = 1 if wl.prefill_chunk is None else math.ceil(T / wl.prefill_chunk)
    w_read = wb.read_per_step(B * min(T, wl.prefill_chunk or T), cfg.hidden_size * DTYPE_BYTES[wl.dtype]) * chunks
    t_mem = w_read / hw.stream_bandwidth(_kernel(wl, 4), wb.total, fallback=f"mm-{wl.dtype}", hidden=cfg.hidden_size)
    step, layer, expert = hw.overheads(wl.dtype)
    t_disp = chunks * (step + cfg.num_hidden_layers * layer + wb.moe_layers * wb.experts_touched(B * T) * expert)
    return max(t_flop, t_mem) + (t_disp if hw.device == "cpu" else 0.0)


def train_flops_per_token(cfg: ModelConfig, wl: Workload) -> float:
    """FLOPs of one training token (forward, backward, optimizer-free), as ember.train runs them.

    Per token, with P the active Linear parameters (LM head included), ``attn = 2*T*q*L`` the
    causal attention products of the forward and n the LoRA parameters:

        LoRA/QLoRA   forward 2P + attn, backward 2P (input gradients through the frozen base;
                     the fused loss forms d/dh with one more (V, H) product) + 2 attn, adapters
                     6n (forward 2, backward 4: A's and B's gradients and the input's)
        full         3 (2P + attn): backward for activations and weights
        checkpoint   + the layers' forward again: 2 (P - head) + attn (+ 2n), for LoRA less the
                     o_proj/down_proj base products (the recompute stops at the last saved
                     tensor, their adapters' input)
    """
    wb = weight_bytes(cfg, wl.dtype, wl.weight_quant)
    p = wb.linear_params_active
    head = cfg.vocab_size * cfg.hidden_size
    attn = 2 * wl.context * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    if wl.method == "full":
        per_token = 3 * (2 * p + attn)
        recompute = 2 * (p - head) + attn
    else:
        n = lora_parameters(cfg, wl.lora_rank, wl.lora_targets)
        per_token = 4 * p + 3 * attn + 6 * n
        skipped = sum(lin.count * lin.out_f * lin.in_f for lin in linears(cfg) if lin.name in wl.lora_targets
                      and (lin.name == "o_proj" or (lin.kind == "mlp" and lin.name == "down_proj")))
        recompute = 2 * (p - head - skipped) + attn + 2 * n
    return per_token + (recompute if wl.grad_checkpointing else 0)


def train_tokens_per_second(cfg: ModelConfig, hw: Hardware, wl: Workload) -> float:
    """Training tokens/s: ``peak FLOP/s x training efficiency / FLOPs per token``.

    The efficiency is the fraction of the matmul rate that real LoRA (for QLoRA: QLoRA) steps reached
    when ``ember hw --measure`` timed them (at this model's hidden size, interpolated), else
    ``compute_efficiency``.
    """
    eff = hw.train_efficiency(wl.dtype, cfg.hidden_size, "qlora" if wl.method == "qlora" else "lora")
    return hw.peak_flops(wl.dtype) * eff / train_flops_per_token(cfg, wl)
