"""Engine: a loaded model + tokenizer that generates text.

Generation is a prefill of the (left-padded) prompts into a static KV cache followed by one-token
decode steps. :meth:`Engine.stream` yields a :class:`StreamChunk` per generated token with the
new text (never a broken UTF-8 character, never part of a stop string) and, on the last chunk,
the run's :class:`GenerationStats`.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ember import kernels
from ember.config import ModelConfig
from ember.errors import GenerationError
import ember.runtime  # noqa: F401  (the CPU kernels behind the model's pieces)
from ember.cache import StaticKVCache
from ember.models import Transformer
from ember.sampling import Sampler, SamplingParams
from ember.speculative import SpeculationCounters, SpeculativeConfig, SpeculativeDecoder, check_target
from ember.speculative import supports as speculation_applies
from ember.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class GenerationStats:
    """Measured figures of one generate/stream call."""

    prompt_tokens: int = 0          # summed over the batch, padding excluded
    generated_tokens: int = 0       # summed over the batch
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0           # forward passes after prefill
    peak_memory_bytes: int = 0      # peak RSS (CPU) or peak allocated (CUDA)
    speculation: SpeculationCounters | None = None  # proposals and passes, when the run speculated

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second per sequence (the first token comes from prefill)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        """One line for stderr."""
        spec = self.speculation
        extra = (f", speculative: {spec.acceptance:.0%} of {spec.proposed} proposed accepted, "
                 f"{spec.tokens_per_pass:.2f} tok/weight pass") if spec is not None else ""
        return (f"prompt {self.prompt_tokens} tok, prefill {self.prefill_tok_s:.1f} tok/s, "
                f"decode {self.decode_tok_s:.2f} tok/s ({self.generated_tokens} tok){extra}, "
                f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB")


@dataclass
class StreamChunk:
    """One generated token of one row of the batch."""

    index: int                       # row in the batch
    token_id: int
    text: str                        # newly printable text (may be "")
    finish_reason: str | None = None  # "stop" | "length" on the row's last chunk
    stats: GenerationStats | None = None  # on the very last chunk of the whole call


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak resident memory of this process (CPU) or peak CUDA allocation."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class _RowState:
    """Per-row text bookkeeping: incremental detokenization and stop-string hold-back."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, stop_ids: set[int]) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = [s for s in params.stop if s]
        self.stop_ids = stop_ids
        self.text = ""       # all text decoded so far
        self.emitted = 0     # characters of self.text already handed out
        self.tokens: list[int] = []
        self.finish: str | None = None

    def push(self, tok: int, max_new: int) -> str:
        self.tokens.append(tok)
        if tok in self.stop_ids:
            self.finish = "stop"
            self.text += self.decoder.flush()
            return self._release(final=True)
        self.text += self.decoder.push(tok)
        if self.stops:
            cut = min((i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish = "stop"
                return self._release(final=True)
        if len(self.tokens) >= max_new:
            self.finish = "length"
            self.text += self.decoder.flush()
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stops:
            # Hold back a tail that could still grow into a stop string.
            for s in self.stops:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


class Engine:
    """A model ready to generate. Build with :func:`ember.load`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.path = Path(path) if path is not None else None
        p = model.model.norm.weight
        self.device, self.dtype = p.device, p.dtype
        # called with (prompt ids, params) before each generation: a multi-process run's rank 0 announces the
        # work to the other ranks here (ember.distributed.follow)
        self.on_generate = None
        self.on_batch_forward = None  # the same for each forward of a BatchScheduler over this engine (serve)
        if self.device.type == "cpu":
            kernels.load()  # compile (first run on this machine) now, not inside the first prompt's timed prefill
        self.speculation: SpeculativeConfig | None = None  # see speculate()

    def speculate(self, method: str | None = None, draft: "Engine | Transformer | None" = None,
                  num_speculative: int | None = None, adaptive: bool = True) -> None:
        """Decode speculatively from now on (``method=None`` and no draft: plainly again); docs/speculative.md.

        Batch-1 generation (:meth:`stream`, :meth:`generate`) and the server's scheduler then verify several
        proposed tokens per weight pass; greedy output stays identical, sampled output keeps its distribution.

        Args:
            method: "ngram" (prompt lookup), "draft" (default when ``draft`` is given) or "mtp".
            draft: a smaller model sharing this model's tokenizer (an Engine or a Transformer).
            num_speculative: the most proposed tokens per pass (default 4; MTP 1).
            adaptive: adapt the number to the measured acceptance, off where it does not pay.
        Raises:
            GenerationError: a draft whose cache cannot drop rejected tokens, or with another vocabulary.
        """
        if method is None and draft is None:
            self.speculation = None
            return
        model = draft.model if isinstance(draft, Engine) else draft
        probe = "The quick brown fox, 12 times: 3.5% of {x}!\n"
        if isinstance(draft, Engine) and draft.tokenizer.encode(probe) != self.tokenizer.encode(probe):
            raise GenerationError("the draft model's tokenizer encodes text differently from this model's; a draft "
                                  "must share the target's tokenizer")
        config = SpeculativeConfig(method or "draft", num_speculative, model, adaptive)
        check_target(self.model, config)
        self.speculation = config

    # ---------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids for text (``chat=True`` wraps it as one user turn), ids, or chat messages."""
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages")

    # ---------------------------------------------------------------- generation
    @torch.inference_mode()
    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
               chat: bool = False, **kwargs) -> Iterator[StreamChunk]:
        """Generate for one prompt or a batch, yielding a chunk per token per row.

        Do not change the model (modules, weights, hooks) between chunks of one generation: its decode steps
        check the CPU kernel blocks against the modules once, at the first step; a change is seen from the
        next generation on.

        Args:
            prompts: one prompt or a list of prompts (text, token ids, or chat message lists).
            params: sampling settings; keyword arguments override its fields.
            chat: wrap text prompts in the model's chat template as a user turn.
        """
        params = _params(params, kwargs)
        batch = _as_batch(prompts)
        ids = [self.encode_prompt(p, chat) for p in batch]
        yield from self._generate(ids, params)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 chat: bool = False, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Like :meth:`stream` but returns the whole text: one result, or a list for a batch."""
        single = not _is_batch(prompts)
        batch = _as_batch(prompts)
        texts = [""] * len(batch)
        tokens: list[list[int]] = [[] for _ in batch]
        finish = ["length"] * len(batch)
        stats = GenerationStats()
        for c in self.stream(batch, params, chat, **kwargs):
            texts[c.index] += c.text
            tokens[c.index].append(c.token_id)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            if c.stats:
                stats = c.stats
        results = [GenerationResult(t, k, f, stats) for t, k, f in zip(texts, tokens, finish)]
        return results[0] if single else results

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Iterator[StreamChunk]:
        if self.on_generate is not None:
            self.on_generate(prompt_ids, params)
        B = len(prompt_ids)
        lengths = [len(p) for p in prompt_ids]
        if min(lengths) == 0:
            raise GenerationError("empty prompt: give at least one token of text")
        longest = max(lengths)
        ctx = self.config.max_position_embeddings
        max_new = params.new_token_limit(longest, ctx)
        if params.max_new_tokens is None and max_new == 0:
            raise GenerationError(f"prompt ({longest} tokens) fills the model's context of {ctx} tokens; "
                                  "shorten the prompt")
        if longest + max_new > ctx:
            raise GenerationError(
                f"prompt ({longest} tokens) + max new tokens ({max_new}) = {longest + max_new} exceeds the model's "
                f"context of {ctx} tokens; shorten the prompt or lower -n"
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        rows = [_RowState(self.tokenizer, params, stop_ids) for _ in range(B)]
        stats = GenerationStats(prompt_tokens=sum(lengths))
        if max_new == 0:
            stats.peak_memory_bytes = peak_memory_bytes(self.device)
            return
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        # Left-pad to a rectangle; padding slots are masked and get position 0.
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((B, longest), pad, dtype=torch.long)
        valid = torch.zeros((B, longest + max_new), dtype=torch.bool)
        for i, p in enumerate(prompt_ids):
            input_ids[i, longest - len(p):] = torch.tensor(p)
            valid[i, longest - len(p):] = True
        padded = any(n != longest for n in lengths)
        positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp_min(0)
        input_ids, valid, positions = input_ids.to(dev), valid.to(dev), positions.to(dev)
        k_valid = valid if padded else None

        sampler = Sampler(params, B, dev)
        needs_history = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        history = torch.cat([torch.where(valid[:, :longest], input_ids, -1),
                             torch.full((B, max_new), -1, dtype=torch.long, device=dev)], 1) if needs_history else None

        cache = StaticKVCache(self.config, B, longest + max_new, self.dtype, dev)
        t0 = time.perf_counter()
        speculate = self.speculation is not None and B == 1 and speculation_applies(params)
        if speculate:
            self.speculation.before_prefill(self.model)
        logits = self.model(input_ids, positions, cache, 0, k_valid, last_only=True)[:, -1]
        cache.advance(longest)
        next_pos = positions[:, -1] + 1
        if speculate:
            spec = SpeculativeDecoder(self.model, cache, self.speculation, params, sampler, prompt_ids[0], max_new)
            yield from self._speculative(spec, logits, rows[0], max_new, stats, t0)
            return

        # The model is not changed while a generation runs: its decode steps check the CPU kernel blocks once.
        session = object()
        step = 0
        while True:
            past = history[:, :longest + step] if history is not None else None
            gen = history[:, longest:longest + step] if history is not None else None
            tok = sampler.sample(logits.float(), past, gen)  # (B,)
            toks = tok.tolist()
            if step == 0:
                stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            if history is not None:
                history[:, longest + step] = tok
            step += 1
            for i, r in enumerate(rows):
                if r.finish is not None:
                    continue
                text = r.push(toks[i], max_new)
                stats.generated_tokens += 1
                if r.finish is not None and all(x.finish is not None for x in rows):
                    stats.decode_s = time.perf_counter() - t1
                    stats.decode_steps = step - 1
                    stats.peak_memory_bytes = peak_memory_bytes(dev)
                    yield StreamChunk(i, toks[i], text, r.finish, stats)
                    return
                yield StreamChunk(i, toks[i], text, r.finish)
            # One decode step for every row (finished rows ride along; their output is ignored).
            logits = self.model(tok[:, None], next_pos[:, None], cache, cache.pos, k_valid, session=session)[:, -1]
            cache.advance(1)
            next_pos = next_pos + 1


    def _speculative(self, spec: SpeculativeDecoder, logits: torch.Tensor, row: _RowState, max_new: int,
                     stats: GenerationStats, t0: float) -> Iterator[StreamChunk]:
        """The chunks of a batch-1 generation whose tokens come from ``spec`` (prefill already run)."""
        stats.speculation = spec.counters
        t1 = None
        for tok in spec.tokens(logits):
            if t1 is None:
                stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            text = row.push(tok, max_new)
            stats.generated_tokens += 1
            if row.finish is not None:
                stats.decode_s = time.perf_counter() - t1
                stats.decode_steps = stats.generated_tokens - 1  # tokens after the first (tok/s stays per token)
                stats.peak_memory_bytes = peak_memory_bytes(self.device)
                yield StreamChunk(0, tok, text, row.finish, stats)
                return
            yield StreamChunk(0, tok, text, None)


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    import dataclasses

    params = dataclasses.replace(params or SamplingParams(), **overrides)
    params.validate()
    return params


def _is_batch(prompts) -> bool:
    if isinstance(prompts, str):
        return False
    if isinstance(prompts, list) and prompts and (isinstance(prompts[0], int) or isinstance(prompts[0], dict)):
        return False
    return True


def _as_batch(prompts) -> list:
    return list(prompts) if _is_batch(prompts) else [prompts]
