"""Fine-tuning: LoRA / QLoRA / full, PEFT-format adapters, JSONL data, resumable training.

    lora.py     LoRALinear around any Linear (incl. quantized), inject/merge, PEFT-format save/load
    data.py     JSONL records -> tokens + loss masks -> (packed) batches
    forward.py  training forward: per-half-layer gradient checkpointing, chunked fused LM loss
    trainer.py  the loop: AdamW, schedule, accumulation, eval, metrics, atomic checkpoints, resume
    tune.py     ``ember tune`` / ``ember merge`` as functions
    cli.py      argparse wiring for those verbs
    demo.py     the fine-tuning step of ``ember demo``
"""

from ember.train.adapter_files import apply_adapter, save_adapter
from ember.train.lora import LoRAConfig, LoRALinear, inject_lora, merge_lora

__all__ = ["LoRAConfig", "LoRALinear", "apply_adapter", "inject_lora", "merge_lora", "save_adapter"]
