"""``ember plan`` and ``ember hw``: what fits and how fast, before allocating a byte.

Wire into :mod:`ember.cli` with ``add_parser(sub)`` on its subparsers; each verb's function is
``args.func``. Examples::

    ember plan llama-3.1-70b --on dgx-spark --task tune --method qlora
    ember plan ~/models/Qwen3-8B --context 32768 --batch 4
    ember plan model.gguf --json
    ember hw --measure
"""

from __future__ import annotations

import argparse
import json
import sys

from ember.commands.common import memory_size
from ember.errors import ConfigError
from ember.hardware import GB, GiB, TB, Hardware
from ember.planner import ResolvedModel, resolve_model

QUANT_CHOICES = ("none", "int8", "int4", "nf4", "mxfp4", "mxfp4+int8", "all")
METHOD_CHOICES = ("lora", "qlora", "full", "all")


# ====================================================================== ember plan


def _hardware(args) -> Hardware:
    from ember import hardware

    if args.on:
        try:
            return hardware.profile(args.on)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
    return hardware.detect(args.device)


def _default_dtype(hw: Hardware) -> str:
    import torch

    from ember.loading import device_supports_bf16

    if hw.device != "cpu":
        return "bf16"
    return "bf16" if device_supports_bf16(torch.device("cpu")) else "fp32"


def cmd_plan(args) -> int:
    """Print the options table (or JSON) for MODEL on the chosen machine."""
    from ember import planner as P

    rm = resolve_model(args.model)
    cfg = rm.config
    hw = _hardware(args)
    dtype = args.dtype or _default_dtype(hw)
    context = args.context or min(cfg.max_position_embeddings, 8192 if args.task == "infer" else 2048)
    quant = args.quant if args.quant not in (None, "all") else "none"
    if quant == P.MIXED and cfg.model_type != "gpt_oss":
        raise ConfigError(f"--quant {P.MIXED} is gpt-oss's layout (MXFP4 experts, int8 elsewhere); "
                          f"{args.model} is {cfg.model_type}: use int8 or mxfp4")
    method = args.method if args.method not in (None, "all") else "lora"
    wl = P.Workload(task=args.task, context=context, batch=args.batch, prompt=args.prompt, dtype=dtype,
                    quant=quant, method=method, lora_rank=args.rank, prefill_chunk=args.prefill_chunk)
    cap = args.max_memory * GiB if args.max_memory else None
    quants = None if args.quant in (None, "all") else (args.quant,)
    methods = None if args.method in (None, "all") else (args.method,)
    plans = P.options(cfg, hw, wl, rm.name, cap, rm.checkpoint_dtype, quants=quants, methods=methods)
    best = P.recommend(plans)
    if best is None and (quants or methods):  # the asked-for option does not fit: look wider for advice
        best = P.recommend(P.options(cfg, hw, wl, rm.name, cap, rm.checkpoint_dtype))
    if args.json:
        out = {"model": rm.name, "notes": rm.notes, "hardware": _hw_json(hw), "options": [p.to_json() for p in plans],
               "recommended": best.label if best else None}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(_plan_header(rm, hw, wl, cap))
    print()
    print(_plan_table(plans, wl))
    print()
    if best is not None:
        print(f"recommended: {P.explain(best)}")
    elif any(p.runnable for p in plans):
        off = max((p for p in plans if p.runnable), key=lambda p: p.offload.decode_tok_s)
        print(f"recommended: nothing fits in memory; {off.label} runs with offload "
              f"({off.offload.mode} read from disk, ~{off.offload.decode_tok_s:.2g} tok/s); `ember generate` and the "
              "other verbs choose it by themselves")
    else:
        print("recommended: nothing fits. " + _nothing_fits_hint(plans))
    notes = list(dict.fromkeys(rm.notes + [n for p in plans for n in p.notes]))
    for n in notes:
        print(f"note: {n}")
    return 0


def _nothing_fits_hint(plans) -> str:
    from ember.hardware import PROFILES

    smallest = min(plans, key=lambda p: p.memory.total)
    hw = smallest.hardware
    usable = smallest.available / hw.nodes
    hint = (f"The smallest option ({smallest.label}) needs {smallest.memory.total / GiB:.1f} GiB; "
            f"{usable / GiB:.1f} GiB usable per node. Try a shorter --context or a smaller --batch")
    base = hw.name.split("x", 1)[-1] if hw.nodes > 1 else hw.name
    if base in PROFILES:
        k = max(hw.nodes + 1, -(-int(smallest.memory.total) // max(1, int(PROFILES[base].usable_bytes))))
        hint += f", or --on {k}x{base}"
    return hint + "."


def _plan_header(rm: ResolvedModel, hw: Hardware, wl, cap) -> str:
    cfg = rm.config
    params = cfg.num_parameters()
    active = cfg.active_parameters()
    moe = f", {active / 1e9:.1f}B active ({cfg.num_experts_per_tok} of {cfg.num_local_experts} experts)" \
        if cfg.num_local_experts else ""
    usable = hw.usable_bytes if cap is None else min(hw.usable_bytes, cap)
    nodes = f"{hw.nodes} x " if hw.nodes > 1 else ""
    lines = [
        f"model    {rm.name}: {cfg.model_type}, {params / 1e9:.2f}B parameters{moe}, {cfg.num_hidden_layers} layers, "
        f"max context {cfg.max_position_embeddings:,}",
        f"machine  {hw.name}: {nodes}{usable / GiB:.1f} GiB usable"
        + (f" (of {hw.memory_bytes / GiB:.1f})" if hw.available_bytes is None else " (free now)")
        + f", {hw.bandwidth / GB:.0f} GB/s, {hw.peak_flops(wl.dtype) / TB:.1f} TFLOP/s {wl.dtype}"
        + (" [measured]" if hw.measured else ""),
    ]
    if wl.task == "infer":
        lines.append(f"workload infer, context {wl.context:,} x batch {wl.batch}, prompt {wl.prompt_tokens:,} tokens"
                     + (f" in chunks of {wl.prefill_chunk}" if wl.prefill_chunk else " in one forward")
                     + f", compute {wl.dtype}")
    else:
        lines.append(f"workload tune, sequences of {wl.context:,} x micro-batch {wl.batch}, LoRA rank {wl.lora_rank}, "
                     f"gradient checkpointing {'on' if wl.grad_checkpointing else 'off'}, compute {wl.dtype}")
    return "\n".join(lines)


def _plan_table(plans, wl) -> str:
    g = lambda x: f"{x / GiB:.1f}"  # noqa: E731
    if wl.task == "infer":
        head = ["option", "weights", "KV cache", "activations", "runtime", "total GiB", "fits", "max context",
                "max batch", "decode tok/s", "prefill tok/s"]
    else:
        head = ["option", "weights", "LoRA+grads+optim", "activations", "runtime", "total GiB", "fits",
                "max seq len", "max batch", "train tok/s"]
    rows = []
    for p in plans:
        m = p.memory
        fits = "yes" if p.fits else "NO"
        if wl.task == "infer":
            rows.append([p.label, g(m.weights), g(m.kv_cache), g(m.activations), g(m.runtime), g(m.total), fits,
                         f"{p.max_context:,}", f"{p.max_batch:,}",
                         f"{p.decode_tok_s_start:.1f} → {p.decode_tok_s:.1f}", f"{p.prefill_tok_s:,.0f}"])
        else:
            rows.append([p.label, g(m.weights), g(m.training), g(m.activations), g(m.runtime), g(m.total), fits,
                         f"{p.max_context:,}", f"{p.max_batch:,}", f"{p.train_tok_s:,.0f}"])
    for p in plans:  # the options that do not fit but run with weights read from disk
        o = p.offload
        if o is not None and o.fits:
            m = p.memory
            rows.append([f"{p.label} + offload" + (" *" if o.needs_quantize else ""), g(o.resident + o.cache), g(m.kv_cache), g(m.activations),
                         g(m.runtime), g(o.budget), "offload", "-", "-", f"{o.decode_tok_s:.2g}", "-"])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |"
    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(r) for r in rows]
    if wl.task == "infer":
        out.append("decode tok/s: per sequence, empty cache → full context; memory in GiB (2^30 bytes)")
        out += [_offload_line(p) for p in plans if p.offload is not None and p.offload.fits]
    return "\n".join(out)


def _offload_line(p) -> str:
    o = p.offload
    what = (f"experts read from disk into a {o.cache / GiB:.1f} GiB cache, expected hit rate {100 * o.hit_rate:.0f}% "
            "(uniform routing; skewed real routing does better)" if o.mode == "experts"
            else f"layers past {o.resident / GiB:.1f} GiB streamed from disk with read-ahead")
    src = "measured" if o.disk_measured else "assumed: run `ember hw --measure`"
    if o.needs_quantize:
        what += f"; * reads an `ember quantize --to {p.workload.quant}` folder: make it once, then run that folder"
    return (f"{p.label} + offload: {what}; {o.disk_bytes_per_token / 1e9:.2f} GB read per token at "
            f"{o.disk_bandwidth / 1e9:.1f} GB/s ({src}): disk-bound ~{o.disk_roofline_tok_s:.2g} tok/s")


def _hw_json(hw: Hardware) -> dict:
    return {"name": hw.name, "device": hw.device, "nodes": hw.nodes, "unified": hw.unified,
            "memory_bytes": hw.memory_bytes, "usable_bytes": hw.usable_bytes, "bandwidth_bytes_s": hw.bandwidth,
            "flops": hw.flops, "decode_efficiency": hw.decode_efficiency, "compute_efficiency": hw.compute_efficiency,
            "measured": hw.measured, "source": hw.source}


# ====================================================================== ember hw


def cmd_hw(args) -> int:
    """Print this machine (or a profile); ``--measure`` times it first and stores the result."""
    from ember import calibrate, hardware

    if args.on:
        try:
            hw = hardware.profile(args.on)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if args.json:
            json.dump(_hw_json(hw), sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        print(hw.describe())
        print(f"usable per node: {hw.usable_bytes / GiB:.1f} GiB; flops: "
              + ", ".join(f"{k} {v / TB:.1f} TFLOP/s" for k, v in hw.flops.items()))
        print(f"source: {hw.source}")
        for n in hw.notes:
            print(f"note: {n}")
        return 0
    device = args.device
    if args.measure:
        dev = device or ("cuda" if _cuda() else "cpu")
        print(f"[ember hw] measuring {dev} (about half a minute; other processes slow it down)...", file=sys.stderr)
        cal = calibrate.measure(dev, progress=lambda s: print(f"[ember hw]   {s}", file=sys.stderr))
        print(f"[ember hw] stored in {hardware.calibration_path()} ({cal.seconds:.0f} s)", file=sys.stderr)
    hw = hardware.detect(device)
    if args.json:
        out = _hw_json(hw)
        out["calibration"] = hw.calibration.to_json() if hw.calibration else None
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = hardware.describe_machine(hw)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")
    print(f"\nprofiles for --on: {', '.join(hardware.PROFILES)} (or 2x<profile>)")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``plan`` and ``hw`` on the ``ember`` command's subparsers."""
    from ember import hardware

    p = sub.add_parser("plan", help="what fits and how fast: memory breakdown, max context, tok/s, recommendation",
                       description="Plan MODEL (HF folder, GGUF file or catalog name) on this machine or a named one: "
                                   "memory breakdown per option, whether it fits, max context x batch, predicted "
                                   "decode/prefill/training speed, and a recommendation.")
    p.add_argument("model", help="HF model folder, .gguf file, or a catalog name (e.g. llama-3.1-70b, qwen3-235b-a22b)")
    p.add_argument("--on", metavar="PROFILE", default=None,
                   help=f"plan for a named machine instead of this one: {', '.join(hardware.PROFILES)}, or NxPROFILE")
    p.add_argument("--device", default=None, help="this machine's device to plan for: cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--task", choices=["infer", "tune"], default="infer")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (prompt + output; tune: sequence length). Default min(max, 8192) / 2048")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (tune: micro-batch)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: the whole context, the worst case)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of N tokens (the server's setting)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="compute dtype (default bf16 where native)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=None, help="weight format to show (default: all)")
    p.add_argument("--method", choices=METHOD_CHOICES, default=None, help="tune method to show (default: all)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="use at most this much memory per node: 12GiB, 800MB, or a number of GiB")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("hw", help="this machine's memory, bandwidth and FLOP/s (--measure to time it)",
                       description="Show what the planner knows about this machine. --measure times memory bandwidth, "
                                   "matmul FLOP/s and decode overheads with Ember's own kernels and stores them under "
                                   "~/.cache/ember/ for `ember plan`.")
    p.add_argument("--measure", action="store_true", help="measure now and store the result")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--on", metavar="PROFILE", default=None, help="show a named profile instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hw)
