"""``ember hw --measure``: time this machine with Ember's own kernels and store a calibration for the planner.

:func:`measure` is the harness; what it stores is a :class:`ember.hardware.Calibration` (the facts
:func:`ember.hardware.detect` attaches on later runs). It measures, per dtype: streaming bandwidth of
one-row (``mv``) and four-row (``mm``) products over weight matrices past every cache, plain and
decoder-shaped; a large matmul's FLOP/s; the per-layer, per-expert and per-step dispatch time of a
decode step; the quantized kernels' rates and their share of a real quantized decode step; the
fraction of the matmul rate real LoRA/QLoRA training steps reach; the RSS of a fresh process; and the disk's
read rate with ``O_DIRECT`` (what offloaded experts and streamed layers are read at).

It runs models, the trainer and the planner's FLOP count, so it sits above them all (beside the CLI):
nothing below imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ember.hardware import Calibration, cache_dir, device_key, fingerprint, save_calibration
from ember.offload.disk import disk_read_rate


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int, min_seconds: float = 0.25, max_repeats: int = 200) -> float:
    """Fastest of at least ``repeats`` calls (and at least ``min_seconds`` of calls): on a shared
    machine other processes only ever slow a call down, so the minimum is the machine's own speed."""
    fn()
    _sync(device)
    best = float("inf")
    n, start = 0, time.perf_counter()
    while n < repeats or (time.perf_counter() - start < min_seconds and n < max_repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def _ember_linear(x2, w):
    """What :class:`ember.models.Linear` runs for ``x2 (M, in) @ w.T``: Ember's CPU kernel where it applies."""
    import torch.nn.functional as F

    from ember import kernels

    y = kernels.dense(x2, w) if x2.device.type == "cpu" else None
    return y if y is not None else F.linear(x2, w)


def _stream_curve(device, dtype, rows: int, sizes: list[int], repeats: int,
                  min_seconds: float = 0.25, chunk: int = 4 << 20, cols: int = 4096) -> list[tuple[int, float]]:
    """Bytes/s of ``rows`` activation rows times weights totalling each working-set size.

    Like a decode step, the working set is many matrices (``chunk`` bytes each, 4096 wide) touched in
    turn, so a set larger than the cache this process actually gets (shared with other tenants) is
    streamed from memory, and each call pays what ember.models.Linear pays (:func:`_ember_linear`).
    """
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    pts = []
    for size in sizes:
        n_mats = max(1, size // chunk)
        n_rows = max(1, min(size, chunk) // (cols * elem))
        ws = [torch.full((n_rows, cols), 0.01, dtype=dtype, device=device) for _ in range(n_mats)]
        x = torch.full((rows, cols), 0.5, dtype=dtype, device=device)

        def fn(ws=ws, x=x):
            for w in ws:
                _ember_linear(x, w)
        t = _best_time(fn, device, repeats, min_seconds)
        nbytes = n_mats * n_rows * cols * elem
        pts.append((nbytes, nbytes / t))
        del ws, x
    return pts


def _decoder_shapes(hidden: int) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's seven matrices: q, k, v, o, gate, up, down (kv = H/4, MLP = 2.75 H)."""
    kv = max(64, hidden // 4)
    inter = max(64, int(2.75 * hidden) // 64 * 64)
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def _decoder_stream(device, dtype, rows: int, hidden: int, sizes: list[int], repeats: int,
                    min_seconds: float) -> list[tuple[int, float]]:
    """Bytes/s streaming whole decoder layers of ``hidden`` (as many as fill each working-set size)."""
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    shapes = _decoder_shapes(hidden)
    layer = sum(o * i for o, i in shapes) * elem
    pts = []
    for n in sorted({max(1, round(size / layer)) for size in sizes}):
        ws = [torch.full(s, 0.01, dtype=dtype, device=device) for _ in range(n) for s in shapes]
        xs = {i: torch.full((rows, i), 0.5, dtype=dtype, device=device) for _, i in shapes}

        def fn(ws=ws, xs=xs):
            for w in ws:
                _ember_linear(xs[w.shape[1]], w)
        t = _best_time(fn, device, repeats, min_seconds)
        pts.append((n * layer, n * layer / t))
        del ws, xs
    return sorted(pts)


def _quant_decoder_stream(device, dtype, mode: str, rows: int, hidden: int, sizes: list[int], repeats: int,
                          min_seconds: float) -> list[tuple[int, float]]:
    """Like :func:`_decoder_stream` for layers quantized with ``ember.quant`` (``mode`` int8/int4/nf4):
    bytes/s of the *stored* (quantized) weights through the quant package's own kernels."""
    import copy

    import torch

    from ember.quant import quantize_linear

    g = torch.Generator().manual_seed(0)
    layer_mods = []
    for o, i in _decoder_shapes(hidden):
        lin = torch.nn.Linear(i, o, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) * 0.02)
        layer_mods.append(quantize_linear(lin.to(device=device, dtype=dtype), mode))
    layer = sum(m.weight_bytes() for m in layer_mods)
    xs = {i: torch.full((rows, i), 0.5, dtype=dtype, device=device) for _, i in _decoder_shapes(hidden)}
    pts = []
    with torch.inference_mode():
        for n in sorted({max(1, round(size / layer)) for size in sizes}):
            mods = layer_mods + [copy.deepcopy(m) for _ in range(n - 1) for m in layer_mods]

            def fn(mods=mods):
                for m in mods:
                    m(xs[m.in_features])
            t = _best_time(fn, device, repeats, min_seconds)
            pts.append((n * layer, n * layer / t))
            del mods
    return pts


def _stream_efficiency(device, dtype, name: str, stream: dict, step_s: float, layer_s: float,
                       quant: str | None = None) -> float:
    """Fraction of the streaming rate a real decode step gets: a synthetic model (hidden 1536, six
    layers, vocab 16384, ~400 MB in bf16) decoded for 20 steps, its dispatch overhead subtracted.

    With ``quant`` (int8/int4/nf4) the model's projections are quantized as ``--quant`` does, and the
    prediction it is compared with streams them at the ``mv-{quant}`` rate and the rest (the 16-bit head
    and norms) at the ``mv-{name}`` rate, as :func:`ember.planner.decode_step_seconds` does."""
    import torch

    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=16384, hidden_size=1536, intermediate_size=4096,
                                     num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4))
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.reset_rope()
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.01) if quant is None else p.uniform_(-0.02, 0.02)  # quantizers want a range to scale
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters()) - cfg.vocab_size * cfg.hidden_size * \
        torch.empty(0, dtype=dtype).element_size()
    qbytes = 0
    if quant is not None:
        from ember.quant import QuantizedLinear, quantize_model

        float_proj = sum(mod.weight.numel() * mod.weight.element_size() for n, mod in m.named_modules()
                         if isinstance(mod, torch.nn.Linear) and not n.endswith("lm_head"))
        quantize_model(m, quant)
        qbytes = sum(mod.weight_bytes() for mod in m.modules() if isinstance(mod, QuantizedLinear))
        nbytes -= float_proj
    times = []
    with torch.inference_mode():
        cache = StaticKVCache(cfg, 1, 96, dtype, device)
        m(torch.zeros(1, 64, dtype=torch.long, device=device), None, cache, 0, last_only=True)
        cache.advance(64)
        for _ in range(24):
            t = time.perf_counter()
            m(torch.zeros(1, 1, dtype=torch.long, device=device), None, cache, cache.pos)
            _sync(device)
            times.append(time.perf_counter() - t)
            cache.advance(1)
    times = sorted(times[4:])
    measured = times[len(times) // 10]
    probe = Calibration(device="", fingerprint="", stream=stream, copy_bandwidth=0.0, matmul_flops={},
                        layer_overhead_s={}, expert_overhead_s={}, step_overhead_s={}, runtime_bytes=0)

    bw = probe.bandwidth(f"mv-{name}", nbytes + qbytes, cfg.hidden_size)
    qbw = probe.bandwidth(f"mv-{quant}", nbytes + qbytes, cfg.hidden_size) if quant else None
    streaming = measured - step_s - cfg.num_hidden_layers * layer_s
    del m
    if bw is None or streaming <= 0 or (quant and qbw is None):
        return 1.0
    predicted = nbytes / bw + (qbytes / qbw if quant else 0.0)
    return min(1.5, max(0.3, predicted / streaming))


def _train_step_efficiency(device, name: str, matmul_flops: float, hidden: int, layers: int, seq: int,
                           steps: int = 5, method: str = "lora") -> float:
    """Fraction of ``matmul_flops`` that real LoRA training steps reach on a synthetic Llama of
    ``hidden`` (MLP 2.75x, kv heads 1/4, vocab 8192; ``ember tune``'s settings: r=16 on every
    projection, dropout 0.05, AdamW, clipping; one sequence of ``seq`` tokens, loss on all):
    :func:`ember.planner.train_flops_per_token` x tokens / the median of ``steps`` steps after a
    warm-up (the median, like the tok/s ``ember tune`` shows: the fastest step is ~20% faster than
    a typical one on a shared 2-core machine). ``method="qlora"``: the base projections are NF4, as
    ``ember tune --method qlora`` loads them (the FLOPs counted are the same; the dequantization is
    what makes the steps slower).

    """
    import statistics

    import torch

    from ember.config import ModelConfig
    from ember.models import Transformer
    from ember.planner import Workload, train_flops_per_token
    from ember.train.data import BatchPlan, Example
    from ember.train.trainer import TrainConfig, Trainer
    from ember.train.tune import prepare_model

    heads = max(1, hidden // 64)
    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=8192, hidden_size=hidden,
                                     intermediate_size=max(64, int(2.75 * hidden) // 64 * 64), num_hidden_layers=layers,
                                     num_attention_heads=heads, num_key_value_heads=max(1, heads // 4)))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.reset_rope()
    with torch.no_grad():
        for prm in m.parameters():
            prm.fill_(0.01)
    m.eval().requires_grad_(False)
    if method == "qlora":
        from ember.quant import quantize_model

        quantize_model(m, "nf4")
    tc = TrainConfig(method=method, rank=16, alpha=32, dropout=0.05, steps=steps + 1, lr=2e-4, batch=1, seq_len=seq,
                     grad_checkpoint=False, dtype=name, loss_on="all")
    prepare_model(m, tc)
    examples = [Example([3 + (7 * i + 13 * j) % (cfg.vocab_size - 3) for i in range(seq)], [True] * seq)
                for j in range(steps + 1)]
    tr = Trainer(m, BatchPlan(examples, 1, seq, shuffle=False), tc, None, progress=False)
    times = []
    for _ in range(steps + 1):  # the step reads its loss on the host: the device's work is done when it returns
        t = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t)
    wl = Workload(task="tune", method=method, context=seq, batch=1, dtype=name, lora_rank=16, grad_checkpointing=False)
    flops = train_flops_per_token(cfg, wl) * seq
    del tr, m
    return min(1.0, max(0.01, flops / statistics.median(times[1:]) / matmul_flops))


def _tiny_layer_mv_seconds(device, dtype) -> float:
    """Seconds of the seven matrix-vector calls of one hidden-64 layer (the overhead models' own layers)."""
    import torch

    ws = [torch.full((o, i), 0.01, dtype=dtype, device=device) for o, i in
          [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]]
    xs = {i: torch.full((1, i), 0.5, dtype=dtype, device=device) for i in (64, 128)}

    def fn():
        for w in ws:
            _ember_linear(xs[w.shape[1]], w)
    return _best_time(fn, device, 20, 0.05)


def _matmul_flops(device, dtype, n: int, repeats: int = 3, min_seconds: float = 0.25) -> float:
    import torch

    a = torch.full((n, n), 0.01, dtype=dtype, device=device)
    b = torch.full((n, n), 0.01, dtype=dtype, device=device)
    t = _best_time(lambda: a @ b, device, repeats, min_seconds)
    return 2 * n**3 / t


def _decode_step_time(device, dtype, layers: int, experts_per_tok: int = 0, steps: int = 40) -> float:
    """Median-ish seconds of one decode step of a tiny model (all dispatch, no bandwidth)."""
    import torch

    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    raw = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2)
    if experts_per_tok:
        raw.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=experts_per_tok, moe_intermediate_size=64)
    cfg = ModelConfig.from_dict(raw)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    times = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up round, then the timed one
            cache = StaticKVCache(cfg, 1, 32 + steps, dtype, device)
            model(torch.zeros(1, 32, dtype=torch.long, device=device), None, cache, 0)
            cache.advance(32)
            tok = torch.zeros(1, 1, dtype=torch.long, device=device)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                logits = model(tok, torch.full((1, 1), cache.pos, device=device), cache, cache.pos)[:, -1]
                cache.advance(1)
                tok = logits.argmax(-1, keepdim=True)
                tok.item()  # the engine reads the token on the host every step
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 10]  # 10th percentile: other processes on a shared machine only add time


def runtime_probe(device: str = "cpu") -> tuple[int, int]:
    """Do in *this* process what every Ember process does before its model, and report its memory.

    Imports the engine, builds a model on the meta device (which pulls in ~800 more torch modules),
    and runs a prefill and decode steps in fp32 and bf16 so the kernels' code pages are resident.
    Returns (peak RSS so far, CUDA context bytes). Call it in a fresh process
    (:func:`measure_runtime_bytes`) for a clean number.
    """
    import torch

    import ember.engine  # noqa: F401
    import ember.loading  # noqa: F401
    import ember.sampling  # noqa: F401
    import ember.tokenizer  # noqa: F401
    from ember.config import ModelConfig
    import ember.runtime  # noqa: F401  (the CPU kernels the engine decodes with)
    from ember.cache import StaticKVCache
    from ember.models import Transformer

    dev = torch.device(device)
    free0 = 0
    if dev.type == "cuda":
        torch.cuda.init()
        free0, _ = torch.cuda.mem_get_info(dev)
    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=dev)
    m.reset_rope()
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.01)
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            m = m.to(dt)
            c = StaticKVCache(cfg, 2, 72, dt, dev)
            m(torch.zeros(2, 64, dtype=torch.long, device=dev), None, c, 0, last_only=True)
            c.advance(64)
            for _ in range(3):
                m(torch.zeros(2, 1, dtype=torch.long, device=dev), None, c, c.pos)
                c.advance(1)
                m(torch.zeros(1, 1, dtype=torch.long, device=dev), None, None, 0)
    ctx = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        free1, _ = torch.cuda.mem_get_info(dev)
        ctx = max(0, free0 - free1 - torch.cuda.memory_reserved(dev))
    del m
    return peak_rss_bytes(), ctx


def peak_rss_bytes() -> int:
    """This process's own peak RSS: VmHWM (ru_maxrss would inherit a parent's peak across fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure_runtime_bytes(device: str = "cpu") -> tuple[int, int]:
    """(peak RSS, CUDA context bytes) of a fresh process after :func:`runtime_probe` (a subprocess, so
    the number is not polluted by what this process already holds)."""
    code = f"from ember.calibrate import runtime_probe; print(*runtime_probe({device!r}))"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"measuring the runtime baseline failed: {out.stderr.strip().splitlines()[-1:]}")
    rss, ctx = out.stdout.split()[-2:]
    return int(rss), int(ctx)


def measure(device: str = "cpu", quick: bool = False, save: bool = True, progress=None,
            threads: int | None = None, runtime: bool = True) -> Calibration:
    """Time this machine with Ember's own kernels and store the result for the planner.

    Measures, on ``device``: streaming bandwidth of one-row (``mv``) and four-row (``mm``) products
    over weight matrices of 16 MiB .. 1 GiB (past every cache; CPU) or 64 MiB .. 2 GiB (GPU), in fp32
    and bf16 (fp16 too on CUDA); a large matmul's FLOP/s; the per-layer, per-expert and per-step
    dispatch time of a decode step (tiny models of 2 and 6 layers, and MoE with 1 and 4 experts per
    token); the quantized kernels' streaming rates and (CPU) their share of a real quantized decode step;
    the fraction of the matmul rate real LoRA and QLoRA training steps reach (synthetic models of two
    hidden sizes); and the RSS of a fresh Ember process. Takes ~60 s on 2 CPU cores (``quick``: ~5 s).

    Args:
        device: ``cpu`` or ``cuda[:N]``.
        quick: fewer sizes and repeats (tests).
        save: write the result to :func:`calibration_path` (atomically).
        progress: optional callable(str) told what is being measured.
        threads: CPU threads to measure with (default: torch's current setting, what Ember will use).
        runtime: also measure a fresh process's memory (a subprocess); else ``runtime_bytes`` is 0.
    Returns:
        the :class:`Calibration`.
    """
    import torch

    from ember.loading import device_supports_bf16
    from ember.quant import MODES as QUANT_MODES

    if threads is not None and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure(device, quick, save, progress, None, runtime)
        finally:
            torch.set_num_threads(before)
    t_start = time.perf_counter()
    dev = torch.device(device)
    say = progress or (lambda s: None)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        sizes = [64 << 20, 256 << 20, 1 << 30] if quick else [64 << 20, 256 << 20, 1 << 30, 2 << 30]
        shaped_sizes = [256 << 20, 1 << 30]
        hiddens = (1024, 4096) if quick else (1024, 2048, 4096, 8192)
        mm_n = 4096 if quick else 8192
    else:
        sizes = [16 << 20, 128 << 20, 512 << 20] if quick else [16 << 20, 64 << 20, 256 << 20, 1 << 30]
        shaped_sizes = [64 << 20, 256 << 20] if quick else [64 << 20, 128 << 20, 512 << 20]
        hiddens = (512, 2048) if quick else (512, 1024, 2048, 4096)
        mm_n = 1024 if quick else 2048
    repeats = 3 if quick else 5
    min_s = 0.02 if quick else 0.25
    dtypes = {"fp32": torch.float32}
    if device_supports_bf16(dev):
        dtypes["bf16"] = torch.bfloat16
    if on_gpu:
        dtypes["fp16"] = torch.float16

    stream: dict[str, list[tuple[int, float]]] = {}
    flops: dict[str, float] = {}
    layer_s: dict[str, float] = {}
    expert_s: dict[str, float] = {}
    step_s: dict[str, float] = {}
    efficiency: dict[str, float] = {}
    for name, dt in dtypes.items():
        say(f"streaming bandwidth, {name}")
        for kind, rows in (("mv", 1), ("mm", 4)):
            stream[f"{kind}-{name}"] = _stream_curve(dev, dt, rows, sizes, repeats, min_s)
            for h in hiddens:
                stream[f"{kind}-{name}@{h}"] = _decoder_stream(dev, dt, rows, h, shaped_sizes, repeats, min_s)
        say(f"matmul FLOP/s, {name}")
        flops[name] = _matmul_flops(dev, dt, mm_n, min_seconds=min_s)
        say(f"decode-step overheads, {name}")
        steps, tries = (10, 1) if quick else (40, 3)
        # Best of three: other processes on a shared machine only ever make a step slower.
        best = lambda *a: min(_decode_step_time(dev, dt, *a, steps=steps) for _ in range(tries))  # noqa: E731
        a, b = best(2), best(6)
        # The tiny layers' seven matrix-vector calls are already in the decoder-shaped curves.
        per_layer = max(0.0, (b - a) / 4 - _tiny_layer_mv_seconds(dev, dt))
        m1, m4 = best(2, 1), best(2, 4)
        layer_s[name] = per_layer
        expert_s[name] = max(0.0, (m4 - m1) / (2 * 3))
        step_s[name] = max(0.0, a - 2 * per_layer)
        if dev.type == "cpu":  # on a GPU the dispatch overlaps the streaming; nothing to take out
            say(f"decode-step streaming efficiency, {name}")
            efficiency[name] = _stream_efficiency(dev, dt, name, stream, step_s[name], per_layer)

    # Training: LoRA steps of synthetic models in the dtype `ember tune` trains in here (bf16 where the
    # device runs it, else fp32), at two hidden sizes (the planner interpolates between them).
    train_eff: dict[str, list[tuple[int, float]]] = {}
    train_dt = "bf16" if "bf16" in dtypes else "fp32"
    if quick:
        shapes, seq = [(512, 2)], 128
    elif on_gpu:
        shapes, seq = [(2048, 4), (4096, 2)], 1024
    else:
        shapes, seq = [(768, 4), (2048, 2)], 512
    pts = []
    for h, layers in shapes:
        say(f"LoRA training steps, {train_dt}, hidden {h}")
        pts.append((h, _train_step_efficiency(dev, train_dt, flops[train_dt], h, layers, seq,
                                              steps=2 if quick else 5)))
    train_eff[train_dt] = sorted(pts)
    if not quick:  # QLoRA: the same steps over NF4 base weights, dequantized in every pass
        pts = []
        for h, layers in shapes:
            say(f"QLoRA training steps, {train_dt}, hidden {h}")
            pts.append((h, _train_step_efficiency(dev, train_dt, flops[train_dt], h, layers, seq, steps=5,
                                                  method="qlora")))
        train_eff[f"{train_dt}-qlora"] = sorted(pts)

    # quantized kernels: their speed is theirs, not the bytes'
    qdtype = torch.bfloat16 if "bf16" in dtypes else torch.float32
    for mode in QUANT_MODES:
        say(f"quantized streaming, {mode}")
        for kind, rows in (("mv", 1), ("mm", 4)):
            for h in (hiddens[0], hiddens[-2] if len(hiddens) > 2 else hiddens[-1]):
                stream[f"{kind}-{mode}@{h}"] = _quant_decoder_stream(dev, qdtype, mode, rows, h,
                                                                     [64 << 20, 256 << 20],
                                                                     max(2, repeats - 2), min_s)
        qname = "bf16" if qdtype == torch.bfloat16 else "fp32"
        if dev.type == "cpu" and not quick:  # a real quantized decode: its kernels' share of the step
            say(f"decode-step streaming efficiency, {mode}")
            efficiency[mode] = _stream_efficiency(dev, qdtype, qname, stream, step_s[qname], layer_s[qname],
                                                  quant=mode)

    copy_n = (sizes[-1] // 4)
    src = torch.full((copy_n,), 1.0, device=dev)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), dev, repeats)
    copy_bw = 2 * copy_n * 4 / t
    del src, dst
    say(f"disk read rate (O_DIRECT) in {cache_dir()}")
    disk_bw, disk_direct = disk_read_rate(cache_dir(), (64 << 20) if quick else (512 << 20))
    rss = ctx = 0
    if runtime:
        say("runtime memory of a fresh process")
        rss, ctx = measure_runtime_bytes(str(dev))
    lat = link_bw = 0.0
    if runtime and dev.type == "cpu":
        from ember.distributed.link import measure_loopback

        say("loopback link between two processes (gloo)")
        lat, link_bw = measure_loopback(20 if quick else 200)
    key = device_key(str(dev))
    cal = Calibration(
        device=key, fingerprint=fingerprint(key), stream=stream,
        copy_bandwidth=copy_bw, matmul_flops=flops, layer_overhead_s=layer_s, expert_overhead_s=expert_s,
        step_overhead_s=step_s, stream_efficiency=efficiency, runtime_bytes=rss, context_bytes=ctx,
        train_efficiency=train_eff, disk_read_bandwidth=disk_bw, disk_direct=disk_direct,
        loopback_latency_s=lat, loopback_bandwidth=link_bw,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__, measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - t_start,
    )
    if save:
        save_calibration(cal)
    return cal

