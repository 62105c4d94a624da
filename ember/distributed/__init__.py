"""Running one model over several processes (and machines) with PyTorch's own distributed stack.

    torchrun --nproc-per-node 2 -m ember generate MODEL "prompt"     # pipeline parallel (the default)
    ember generate MODEL "prompt" --pp 2                              # the same; ember starts the workers
    ember generate MODEL "prompt" --tp 2                              # tensor parallel
    ember generate MODEL "prompt" --pp 2 --tp 2                       # both (4 processes)
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT -m ember generate MODEL "..." --pp 2

    group.py     the process group (gloo on CPU, NCCL on CUDA), rank 0's ownership of stdin/stdout,
                 guarded send/recv/collectives whose errors name the rank, the peer and what it was doing
    launch.py    ``--pp N`` / ``--tp N``: torch's elastic agent starts and watches the workers
    pipeline.py  pipeline parallel: contiguous layer stages, each reading only its own tensors
    tensor.py    tensor parallel: heads, MLP and expert channels split, all-reduce after row-parallel layers
    grid.py      both: pipeline stages, each split over its own tensor-parallel group
    follow.py    chat/serve: rank 0 announces each generation or batched forward, the other ranks replay it
    data.py      data-parallel fine-tuning: each rank a slice of every batch, LoRA gradients all-reduced,
                 full fine-tuning's layers sharded with FSDP2
    link.py      loopback latency and bandwidth between two processes (``ember hw --measure``)

docs/distributed.md describes the design and the measured figures.
"""

from __future__ import annotations

import argparse
import os
import random

import ember
from ember.config import ModelConfig
from ember.distributed import follow, group
from ember.distributed.grid import GridShard
from ember.distributed.group import Dist, current, launched
from ember.distributed.launch import MODE_ENV, launch
from ember.distributed.pipeline import PipelineShard
from ember.distributed.tensor import TensorShard
from ember.errors import DistributedError, EmberError

__all__ = ["Dist", "SUPPORTED_VERBS", "current", "launched", "load", "requested", "run"]

# verbs that run over several processes: generate, eval and tune run the same
# work on every rank; chat and serve know their work on rank 0 only (stdin, HTTP): the others follow (follow.py)
SUPPORTED_VERBS = ("generate", "eval", "chat", "serve", "tune")
FOLLOW_VERBS = ("chat", "serve")


def requested(args: argparse.Namespace) -> bool:
    """Whether this command runs as (or starts) a multi-process run: ``--pp``/``--tp`` > 1, or under torchrun."""
    return launched() or (getattr(args, "pp", None) or 1) > 1 or (getattr(args, "tp", None) or 1) > 1


def _mode(args: argparse.Namespace) -> tuple[str, int | None, int | None]:
    """(mode, processes asked for or None, tensor-parallel ranks per stage or None)."""
    pp, tp = getattr(args, "pp", None), getattr(args, "tp", None)
    if args.verb == "tune":
        return "dp", None, None
    if pp and tp and pp > 1 and tp > 1:
        return "pp", pp * tp, tp  # P stages of T tensor-parallel ranks (grid.py)
    if tp and tp > 1:
        return "tp", tp, None
    return os.environ.get(MODE_ENV) or "pp", pp, None


def run(args: argparse.Namespace, argv: list[str], load_args=None) -> int:
    """Run a parsed command as one rank of a multi-process run, or start the workers (``--pp/--tp`` outside
    torchrun). Any rank's failure is printed with its rank; returns the exit status.

    Args:
        load_args: the verbs' ``load_from_args(args)``, which a follower rank (``chat``) runs to load its part.
    """
    if args.verb not in SUPPORTED_VERBS:
        raise DistributedError(f"`ember {args.verb}` does not run over several processes yet (only "
                               f"{', '.join(SUPPORTED_VERBS)} does); run it as one process, without --pp/--tp or torchrun")
    mode, n, tp = _mode(args)
    if not launched():
        return launch(n or 1, mode, argv)
    world = int(os.environ["WORLD_SIZE"])
    if n is not None and n != world:
        asked = f"--pp {args.pp} --tp {args.tp}" if tp else f"--{mode} {n}"
        raise DistributedError(f"{asked} needs {n} processes but torchrun started {world}; give the same number")
    d = group.init(mode, getattr(args, "device", None), tp)
    try:
        if hasattr(args, "seed") and args.seed is None:  # every rank samples the same tokens
            args.seed = group.broadcast_object(random.randrange(2**31), 0, "the sampling seed")
        if args.verb in FOLLOW_VERBS and not d.is_main:
            return follow.follow(load_args(args))
        d.leads = args.verb in FOLLOW_VERBS
        try:
            return args.func(args) or 0
        except DistributedError:
            d.led = False  # a rank is gone: there is no one to tell to stop
            raise
        finally:
            if d.leads and d.led:
                follow.finish()
    except EmberError as e:
        group.report_failure(f"ember: error: rank {d.rank} ({d.doing}): {e}" if not str(e).startswith("rank ")
                             else f"ember: error: {e}")
        return 1
    finally:
        group.shutdown()


def load(path, device=None, dtype="auto", quant=None, group_size=None, adapter=None, context=None, batch=1,
         max_memory=None, lm_head="auto") -> "ember.engine.Engine":
    """:func:`ember.load` for this rank's part of the model (pipeline stage or tensor shard).

    Each rank reads only the tensors it keeps; ranks wait for each other once all have loaded.

    Raises:
        DistributedError: outside a run, or a combination not supported under the run's mode.
    """
    d = current()
    if d is None:
        raise DistributedError("ember.distributed.load outside a multi-process run (start it with torchrun or --pp)")
    if adapter is not None:
        raise DistributedError(f"--adapter under --{d.mode}: merge the adapter first (`ember merge`), then load the "
                               "merged model")
    from ember.loading.gguf import is_gguf_file

    if is_gguf_file(path):
        from ember.loading.gguf import GGUFFile, config_from_gguf

        cfg = config_from_gguf(GGUFFile.open(path))
    else:
        cfg = ModelConfig.from_file(path)
    q = (quant or "none").lower()
    tp = d.tp > 1
    method = cfg.extra.get("quantization", {}).get("method") if isinstance(cfg.extra.get("quantization"), dict) \
        else None
    if tp and method not in (None, "int8", "int4"):
        raise DistributedError(f"{path}: --tp splits float, int8 and int4 checkpoints and GGUF files; this folder "
                               f"is {method}, whose blocks run across rows: load it with --pp, or quantize the float "
                               "model on load (--tp with --quant)")
    if tp and q != "none" and (method is not None or is_gguf_file(path)):
        raise DistributedError(f"{path}: already quantized ({method or 'GGUF'}); load it without --quant")
    if tp and d.stages > 1:
        shard = GridShard(d, cfg)
    else:  # a GGUF file's embedding and head stay whole (their blocks are kept as stored)
        shard = TensorShard(d, cfg, split_vocab=not is_gguf_file(path)) if tp else PipelineShard(d, cfg, quant=q)
    with group.phase(f"loading ({shard.describe()})"):
        # TP quantizes after sharding (so each rank holds the codes one process would; see tensor.py)
        engine = ember.load(path, device=d.device, dtype=dtype, quant=None if tp else quant, group_size=group_size,
                            context=context, batch=batch, max_memory=max_memory, check_memory=False,
                            lm_head=lm_head, shard=shard)
        if tp and q != "none":
            from ember.quant.quantize import DEFAULT_LM_HEAD

            shard.quantize(engine.model, q, group_size, DEFAULT_LM_HEAD if lm_head == "auto" else lm_head)
        if tp:
            shard.ready(engine.model)
    group.barrier("wait for every rank to load", loading=True)
    group.doing(f"generating ({shard.describe()})")
    engine.shard = shard
    if d.leads and d.is_main:
        follow.lead(engine)
        d.led = True
    return engine
