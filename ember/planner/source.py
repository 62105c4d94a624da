"""What ``ember plan MODEL`` plans: an HF folder (or its config.json), a ``.gguf`` file, or a catalog name,
read as a :class:`~ember.config.ModelConfig` without loading any weight."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.config import ModelConfig
from ember.errors import ConfigError, EmberError, GGUFError
from ember.hardware import GiB
from ember.planner.workload import short_dtype


@dataclass
class ResolvedModel:
    """A model to plan: its config, a display name, the on-disk dtype (if known) and remarks."""

    name: str
    config: ModelConfig
    checkpoint_dtype: str | None
    notes: list[str]


def state_note(cfg: ModelConfig) -> str | None:
    """One line on a hybrid model's cache: the recurrent layers' fixed state per sequence apart from the attention
    layers' KV per token (bf16); None for a model without recurrent layers."""
    import torch

    from ember.cache import bytes_per_sequence, bytes_per_token, layer_specs

    specs = layer_specs(cfg)
    rec = [s for s in specs if s.kind == "recurrent"]
    if not rec:
        return None
    state = sum(bytes_per_sequence(s, torch.float32, 0) for s in rec)
    per_token = sum(bytes_per_token(s, torch.bfloat16) for s in specs)
    held = sum(1 for s in rec if s.state_shapes)  # Nemotron-H's MLP/MoE blocks are "recurrent" with no state
    return (f"cache: recurrent state {state / 2**20:.1f} MiB per sequence, fixed ({held} of {len(specs)} layers, "
            f"fp32), plus KV {per_token / 1024:.1f} KiB per token in bf16 ({len(specs) - len(rec)} attention layers)")


def resolve_model(spec: str) -> ResolvedModel:
    """MODEL of ``ember plan``: an HF folder (or its config.json), a ``.gguf`` file, or a catalog name.

    Raises:
        ConfigError: none of those (the message lists the catalog), or a bad config.
        GGUFError: a GGUF file that cannot be read (or the ``gguf`` package is missing).
    """
    from ember import catalog

    p = Path(spec).expanduser()
    if p.is_dir() or (p.is_file() and p.name.endswith(".json")):
        cfg = ModelConfig.from_file(p)
        folder = p if p.is_dir() else p.parent
        dt, notes = None, []
        try:
            from ember.loading.safetensors import Checkpoint

            ckpt = Checkpoint(folder)
            dt = short_dtype(str(ckpt.dtype()))
            on_disk = sum(f.path.stat().st_size for f in ckpt.files.values())
            notes.append(f"checkpoint: {on_disk / GiB:.1f} GiB of {dt} safetensors in {folder}")
        except EmberError:
            notes.append(f"{folder}: no safetensors weights found; planning from config.json")
        notes += [n for n in (state_note(cfg),) if n]
        return ResolvedModel(folder.name or str(folder), cfg, dt or short_dtype(cfg.torch_dtype), notes)
    if p.is_file():
        from ember.loading.gguf import is_gguf_file

        if not is_gguf_file(p):
            raise ConfigError(f"{p}: not a model folder, config.json or GGUF file")
        return _resolve_gguf(p)
    entry = catalog.find(spec)
    if entry is not None:
        cfg = entry.config
        note = f"catalog: {entry.hf_id}, published {entry.published_params / 1e9:.1f}B parameters"
        if entry.published_active_params:
            note += f" ({entry.published_active_params / 1e9:.1f}B active)"
        return ResolvedModel(entry.name, cfg, "bf16", [note] + [n for n in (state_note(cfg),) if n])
    raise ConfigError(f"{spec!r} is not a model folder, GGUF file or catalog name; catalog: {', '.join(catalog.names())}")


# GGUF tensor name -> the WeightBytes part it is priced in (ember.planner.memory); anything else is "other".
_GGUF_PARTS = (("token_embd.", "embedding"), ("output.", "lm_head"), ("_exps.", "experts"), (".attn_q.", "attention"),
               (".attn_k.", "attention"), (".attn_v.", "attention"), (".attn_output.", "attention"),
               (".ffn_gate.", "mlp"), (".ffn_up.", "mlp"), (".ffn_down.", "mlp"), ("_shexp.", "mlp"),
               (".attn_qkv.", "recurrent"), (".attn_gate.", "recurrent"), (".ssm_in.", "recurrent"),
               (".ssm_out.", "recurrent"), (".ssm_ba.", "recurrent"), (".ssm_alpha.", "recurrent"),
               (".ssm_beta.", "recurrent"))  # the hybrids' recurrent mixers' projections


def gguf_weight_parts(gf) -> dict[str, tuple[int, int]]:
    """A GGUF file's weights as Ember holds them, by planner part: ``{part: (block bytes, float elements)}``.

    Tensors of a kept quantized type are held as their blocks (their bytes in the file); float tensors are
    loaded in the compute dtype (their element count, priced by :func:`ember.planner.memory.weight_bytes`).
    """
    from ember.loading.gguf import DEQUANTIZERS  # noqa: PLC0415  (gguf is imported only for GGUF files)

    parts = {k: (0, 0) for k in ("embedding", "lm_head", "attention", "recurrent", "mlp", "experts", "other")}
    for name, t in gf.tensors.items():
        if name == "rope_freqs.weight":
            continue  # RoPE divisors: folded into the config, not a weight
        part = next((p for key, p in _GGUF_PARTS if key in f".{name}" and name.endswith(".weight")), "other")
        q, n = parts[part]
        if t.tensor_type in DEQUANTIZERS:
            parts[part] = (q + int(t.n_bytes), n)
        else:
            parts[part] = (q, n + int(t.n_elements))
    return parts


def _resolve_gguf(p: Path) -> ResolvedModel:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError(f"{p}: reading GGUF metadata needs the 'gguf' package (pip install gguf)") from None
    from ember.loading.gguf import GGUFFile, check_tensor_types, config_from_gguf

    gf = GGUFFile.open(p)
    cfg = config_from_gguf(gf)
    check_tensor_types(gf)
    types: dict[str, int] = {}
    for t in gf.tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    mix = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
    notes = [f"GGUF file {p.stat().st_size / GiB:.2f} GiB ({mix}); quantized tensors are held in their own "
             "blocks, so plans without --quant price the file's own types"]
    cfg.extra["gguf_weights"] = gguf_weight_parts(gf)
    notes += [n for n in (state_note(cfg),) if n]
    return ResolvedModel(p.name, cfg, short_dtype(cfg.torch_dtype) or "bf16", notes)
