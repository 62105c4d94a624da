"""How ``ember serve`` runs (:class:`ServerSettings`) and the size of its paged KV pool (:func:`plan_kv_pool`)."""

from __future__ import annotations

from dataclasses import dataclass

from ember.engine import Engine
from ember.hardware import GiB
from ember.planner import MIN_SEQ_TOKENS, kv_block_bytes, kv_pool_blocks  # noqa: F401  (MIN_SEQ_TOKENS: re-exported)


@dataclass
class ServerSettings:
    """How ``ember serve`` runs (see :func:`ember.server.app.create_app`)."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    num_blocks: int | None = None       # KV blocks, scratch block included (default: sized by kv_pool_blocks)
    block_size: int = 16
    prefill_chunk: int = 256
    kv_memory_bytes: int | None = None  # KV pool budget in bytes (default: the planner's kv_budget_bytes)
    context: int | None = None          # tokens per sequence (--context; default the model's limit)
    quant: str | None = None            # what the model was loaded with (for the plan)
    max_memory: float | None = None     # GiB cap on the process (--max-memory)
    ui: bool = True                     # serve the chat page at / (--no-ui: off)
    model_dir: str | None = None        # the checkpoint folder (its sentence-transformers pooling config, if any)
    pooling: str | None = None          # embeddings: "mean" | "last" (--pooling; default from model_dir, else mean)
    max_stored_responses: int = 256     # /v1/responses kept for previous_response_id (oldest dropped first)


@dataclass(frozen=True)
class KVPoolPlan:
    """The paged KV pool the server allocates.

    Attributes:
        num_blocks: blocks allocated, the scratch block included (``capacity + 1``).
        block_size: tokens per block.
        block_bytes: bytes of one block over all layers, keys and values.
        budget_bytes: what the planner allowed for the pool; None when ``--kv-blocks`` fixed it.
    """

    num_blocks: int
    block_size: int
    block_bytes: int
    budget_bytes: int | None = None

    @property
    def capacity(self) -> int:
        """Blocks sequences can own (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        """The startup log line: ``KV pool: N blocks x 16 tokens = X GiB (from the plan: budget Y GiB)``."""
        src = "--kv-blocks" if self.budget_bytes is None else f"from the plan: budget {_gib(self.budget_bytes)}"
        return f"KV pool: {self.capacity} blocks x {self.block_size} tokens = {_gib(self.nbytes)} ({src})"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 2**20:.2f} MiB"  # tiny test models: MiB


def plan_kv_pool(engine: Engine, settings: ServerSettings) -> KVPoolPlan:
    """The server's KV pool: ``--kv-blocks`` if given, else sized from the planner's budget.

    The model is already loaded, so the memory free now excludes its weights (``loaded=True``); with
    ``--max-memory`` the budget is also capped at that cap less the planned weights.
    """
    cfg, dtype, bs = engine.config, engine.dtype, settings.block_size
    per_block = kv_block_bytes(cfg, dtype, bs)
    if settings.num_blocks is not None:
        return KVPoolPlan(settings.num_blocks, bs, per_block)
    budget = settings.kv_memory_bytes
    if budget is None:
        from ember.planner import kv_budget_bytes

        kw = dict(quant=settings.quant, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk,
                  max_memory=settings.max_memory)
        budget = kv_budget_bytes(cfg, engine.device, dtype, loaded=True, **kw)
        if settings.max_memory is not None:  # the cap counts the weights too, free memory already excludes them
            budget = min(budget, kv_budget_bytes(cfg, engine.device, dtype, loaded=False, **kw))
    n = kv_pool_blocks(cfg, dtype, budget, settings.max_batch, bs, settings.context, prefill_chunk=settings.prefill_chunk)
    return KVPoolPlan(n, bs, per_block, budget)
