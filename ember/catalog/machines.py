"""Catalog of named machines, for planning one you do not have: ``ember plan MODEL --on dgx-spark``.

Each entry is the keyword arguments of an :class:`ember.hardware.Hardware` (``ember.hardware.PROFILES``
builds them): memory, peak bandwidth, dense FLOP/s per precision, and the source of every figure.
Keep it data: a new machine is a copy of its spec sheet's numbers plus where they come from.

Peak numbers from vendor spec sheets; dense (no 2:4 sparsity), FP32 accumulate. Where a vendor
publishes only a sparse or FP4 figure, the derivation is written next to it.
Efficiencies are assumptions until `ember hw --measure` runs on the machine itself:
  decode_efficiency 0.65 (the default): the achieved weight-streaming fraction of peak bandwidth seen in
    published single-stream decode on the DGX Spark (Llama 3.1 8B: 38.7 tok/s NVFP4 and 20.5 tok/s FP8 on
    273 GB/s are 0.65-0.70 of the bytes/token roofline; NVIDIA, "How DGX Spark Performance Enables
    Intensive AI Tasks", developer.nvidia.com, ISL/OSL 2048/128, BS=1).
  compute_efficiency 0.5: typical large-matmul MFU for prefill/training in PyTorch.
  layer/expert/step overhead: eager PyTorch dispatch, ~5 us per op on the host; CUDA overlaps it with
    the GPU's work.

Units: ``GiB`` = 2**30 bytes, ``GB`` = 1e9 bytes, ``TB`` = 1e12 (bytes/s or FLOP/s).
"""

from __future__ import annotations

GiB = 1 << 30
GB = 10**9
TB = 10**12

_SPARK_SOURCE = ("NVIDIA DGX Spark product page and hardware guide (nvidia.com/en-us/products/workstations/dgx-spark, "
                 "docs.nvidia.com/dgx/dgx-spark): GB10, 128 GB LPDDR5x unified, 273 GB/s, 1 PFLOP FP4 with sparsity, "
                 "ConnectX-7 200 Gb/s. Dense FP4 = 1000/2 = 500 TFLOP/s; FP8 = FP4/2; BF16 = FP4/8 (GeForce-class "
                 "Blackwell ratio, RTX 5070-sized GPU: 6144 CUDA cores) = 62.5, matching ~60 TFLOP/s BF16 measured by "
                 "J. Carmack / A. Hannun (Oct 2025)")

MACHINES: dict[str, dict] = {
    "dgx-spark": dict(
        name="dgx-spark", device="cuda", unified=True, gpu_name="NVIDIA GB10",
        memory_bytes=128 * GB, reserved_bytes=4 * GiB,  # DGX OS + desktop at idle (estimate); MemTotal ~119.7 GiB
        bandwidth=273 * GB, flops={"bf16": 62.5 * TB, "fp16": 62.5 * TB, "fp8": 250 * TB, "fp4": 500 * TB, "fp32": 31 * TB},
        cpu_cores=20, interconnect_bandwidth=25 * GB, interconnect_latency_s=20e-6,
        runtime_bytes=5 * GiB // 2, source=_SPARK_SOURCE),
    "dgx-station": dict(
        name="dgx-station", device="cuda", unified=True, gpu_name="NVIDIA GB300",
        # 288 GB HBM3e at 8 TB/s on the GPU + 496 GB LPDDR5X at 396 GB/s on the CPU, coherent (784 GB).
        # We plan on the HBM alone (what a model streams from at full speed); see notes.
        memory_bytes=288 * GB, reserved_bytes=0, bandwidth=8 * TB,
        flops={"bf16": 2.5e15, "fp16": 2.5e15, "fp8": 5e15, "fp4": 15e15, "fp32": 80 * TB},
        cpu_cores=72, runtime_bytes=3 * GiB,
        source="NVIDIA DGX Station product page (nvidia.com/en-us/products/workstations/dgx-station): GB300 Grace "
               "Blackwell Ultra Desktop Superchip, 288 GB HBM3e 8 TB/s GPU memory, 496 GB LPDDR5X 396 GB/s CPU memory; "
               "dense Blackwell Ultra FLOP/s from NVIDIA's Blackwell Ultra technical blog (NVFP4 15 PFLOP/s dense)",
        notes=("the 496 GB of CPU LPDDR5X (396 GB/s) is not counted: a model spilling into it decodes ~20x slower",)),
    "rtx-4090": dict(
        name="rtx-4090", device="cuda", gpu_name="NVIDIA GeForce RTX 4090",
        memory_bytes=24 * GiB, reserved_bytes=GiB // 2,  # display + driver
        bandwidth=1008 * GB, flops={"bf16": 165.2 * TB, "fp16": 165.2 * TB, "fp8": 330.3 * TB, "fp32": 82.6 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 24 GB GDDR6X, 1008 GB/s; FP16/BF16 tensor "
               "165.2 TFLOP/s dense with FP32 accumulate, FP8 330.3"),
    "rtx-5090": dict(
        name="rtx-5090", device="cuda", gpu_name="NVIDIA GeForce RTX 5090",
        memory_bytes=32 * GiB, reserved_bytes=GiB // 2,
        bandwidth=1792 * GB, flops={"bf16": 209.5 * TB, "fp16": 209.5 * TB, "fp8": 419 * TB, "fp4": 1676 * TB, "fp32": 104.8 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA RTX Blackwell GPU architecture whitepaper / GeForce RTX 5090 page: 32 GB GDDR7, 1792 GB/s; "
               "FP16 tensor 838 TFLOP/s sparse with FP16 accumulate -> 209.5 dense with FP32 accumulate; FP8 419; "
               "FP4 3352 AI TOPS sparse -> 1676 dense"),
    "a100-80g": dict(
        name="a100-80g", device="cuda", gpu_name="NVIDIA A100-SXM4-80GB",
        memory_bytes=80 * GiB, bandwidth=2039 * GB, flops={"bf16": 312 * TB, "fp16": 312 * TB, "fp32": 19.5 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 80 GB HBM2e, 2039 GB/s (SXM), "
               "BF16 312 TFLOP/s dense"),
    "h100-80g": dict(
        name="h100-80g", device="cuda", gpu_name="NVIDIA H100 80GB HBM3",
        memory_bytes=80 * GiB, bandwidth=3350 * GB, flops={"bf16": 989.5 * TB, "fp16": 989.5 * TB, "fp8": 1979 * TB, "fp32": 67 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 80 GB HBM3, 3.35 TB/s, BF16 1979 "
               "TFLOP/s with sparsity -> 989.5 dense, FP8 3958 -> 1979 dense"),
    "h200": dict(
        name="h200", device="cuda", gpu_name="NVIDIA H200",
        memory_bytes=141 * GB, bandwidth=4800 * GB, flops={"bf16": 989.5 * TB, "fp16": 989.5 * TB, "fp8": 1979 * TB, "fp32": 67 * TB},
        runtime_bytes=GiB // 2,
        source="NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 141 GB HBM3e, 4.8 TB/s, BF16 989.5 "
               "TFLOP/s dense, FP8 1979 dense"),
    "mac-m3-ultra-512": dict(
        name="mac-m3-ultra-512", device="mps", unified=True, gpu_name="Apple M3 Ultra (80-core GPU)",
        # macOS wires at most ~75% of RAM for the GPU by default (iogpu.wired_limit_mb raises it).
        memory_bytes=512 * GiB, reserved_bytes=128 * GiB,
        bandwidth=819 * GB, flops={"bf16": 28.4 * TB, "fp16": 28.4 * TB, "fp32": 28.4 * TB},
        cpu_cores=32, runtime_bytes=GiB,
        source="Apple Mac Studio (2025) tech specs (apple.com/mac-studio/specs): M3 Ultra, up to 512 GB unified memory, "
               "819 GB/s. Apple publishes no FLOP/s: 80 GPU cores x 128 ALUs x 2 FLOP x ~1.39 GHz = 28.4 TFLOP/s "
               "(FP16 at FP32 rate), our derivation"),
    "strix-halo-128": dict(
        name="strix-halo-128", device="cuda", unified=True, gpu_name="AMD Radeon 8060S (Ryzen AI Max+ 395)",
        memory_bytes=128 * GiB, reserved_bytes=8 * GiB,
        bandwidth=256 * GB, flops={"bf16": 59.4 * TB, "fp16": 59.4 * TB, "fp32": 29.7 * TB},
        cpu_cores=16, runtime_bytes=5 * GiB // 2,
        source="AMD Ryzen AI Max+ 395 product page (amd.com): 128 GB LPDDR5X-8000 on a 256-bit bus = 256 GB/s, "
               "Radeon 8060S 40 CUs at up to 2.9 GHz; FP16/BF16 WMMA 40 x 512 FLOP/clk x 2.9 GHz = 59.4 TFLOP/s "
               "(our derivation from RDNA 3.5 rates); no FP8/FP4 matrix units",
        notes=("ROCm exposes the GPU as 'cuda' in PyTorch; the BIOS carve-out (up to 96 GB) plus GTT decides how much "
               "of the 128 GB the GPU may map",)),
}
