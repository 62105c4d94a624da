"""``POST /v1/embeddings``: vectors from the loaded model's final hidden states.

Pooling is ``mean`` (average over the input's tokens) or ``last`` (the last token's state, as
Qwen3-Embedding-style checkpoints use), chosen by ``ember serve --pooling`` or else by the
checkpoint's sentence-transformers ``1_Pooling/config.json``, else mean. Vectors are L2-normalized;
``dimensions`` keeps the first N components and normalizes again (Matryoshka-style truncation);
``encoding_format: base64`` sends little-endian float32 bytes.

Inputs are batched (right-padded, so under the causal mask a row's tokens never see the padding and
a batched vector equals the one computed alone) and run in a worker thread beside the generation
steps, one embedding batch at a time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ember.server.core import EmberServer
from ember.server.errors import APIError

BATCH_TOKENS = 4096  # padded tokens per forward pass


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def register(app: FastAPI, server: EmberServer) -> None:
    lock = threading.Lock()
    pooling = pooling_mode(server.settings.pooling, server.settings.model_dir)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        server.check_model(body.model)
        server.check_open()
        prompts = _prompts(server, body.input)
        H = server.engine.config.hidden_size
        if body.dimensions is not None and body.dimensions > H:
            raise APIError(400, f"dimensions ({body.dimensions}) exceeds the model's {H}", param="dimensions")
        vecs = await asyncio.to_thread(_run, server, prompts, pooling, lock)
        if body.dimensions is not None:
            vecs = torch.nn.functional.normalize(vecs[:, :body.dimensions], dim=-1)
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(p) for p in prompts)
        return {"object": "list", "data": data, "model": server.settings.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}


def pooling_mode(flag: str | None, model_dir: str | None) -> str:
    """``--pooling`` if given, else the sentence-transformers pooling config of the checkpoint, else mean."""
    if flag:
        return flag
    cfg = Path(model_dir) / "1_Pooling" / "config.json" if model_dir else None
    if cfg is not None and cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return "mean"
        if c.get("pooling_mode_lasttoken"):
            return "last"
    return "mean"


def _prompts(server: EmberServer, inp) -> list[list[int]]:
    tok, V = server.tokenizer, server.engine.config.vocab_size
    if isinstance(inp, str):
        inp = [inp]
    if not inp:
        raise APIError(400, "input must not be empty", param="input")
    if isinstance(inp[0], int):
        inp = [inp]
    if len(inp) > 2048:
        raise APIError(400, f"input: at most 2048 inputs per request, got {len(inp)}", param="input")
    out = []
    for i, x in enumerate(inp):
        ids = tok.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, f"input[{i}] is empty", param="input")
        if any(not 0 <= t < V for t in ids):
            raise APIError(400, f"input[{i}]: token ids must be in [0, {V})", param="input")
        if len(ids) > server.context:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens, more than the context of {server.context}",
                           param="input")
        out.append(ids)
    return out


def _run(server: EmberServer, prompts: list[list[int]], pooling: str, lock: threading.Lock) -> torch.Tensor:
    """Normalized vectors (N, H) float32, in input order; inputs of similar length share a pass."""
    engine = server.engine
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), engine.config.hidden_size)
    pad = server.tokenizer.pad_token_id or 0
    with lock, torch.inference_mode():
        k = 0
        while k < len(order):
            rows = [order[k]]
            while k + len(rows) < len(order) and \
                    (len(rows) + 1) * len(prompts[order[k + len(rows)]]) <= max(BATCH_TOKENS, len(prompts[rows[0]])):
                rows.append(order[k + len(rows)])
            T = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            lens = torch.tensor([len(prompts[i]) for i in rows])
            for r, i in enumerate(rows):
                ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
            h = engine.model(ids.to(engine.device), hidden_only=True).float().cpu()  # (B, T, H)
            if pooling == "last":
                v = h[torch.arange(len(rows)), lens - 1]
            else:
                mask = (torch.arange(T)[None, :] < lens[:, None]).float()
                v = (h * mask[..., None]).sum(1) / lens[:, None]
            out[rows] = torch.nn.functional.normalize(v, dim=-1)
            k += len(rows)
    return out
