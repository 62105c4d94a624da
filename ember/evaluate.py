"""``ember eval ppl``: perplexity of a model on a text file, by the sliding-window method.

A text longer than the model's window is scored in windows of ``window`` tokens that start every
``stride`` tokens (as in the HF guide "Perplexity of fixed-length models"). Each window scores only
the tokens the previous window did not, using the tokens before them in the window as context, so
with ``stride < window`` every token but the first is scored exactly once, with at least
``window - stride`` tokens of context after the first window. ``stride == window`` gives disjoint
windows (fast, less context; a window's first token has no context and is not scored).

Logits are never made for a whole window at once: the model returns final hidden states and the
LM head + fp32 log-softmax run over chunks of positions, so memory stays ~``chunk x vocab`` floats.
A model whose config has ``final_logit_softcapping`` (Gemma 2/3/4) has its logits capped,
``cap * tanh(logits / cap)`` in the model dtype, before the log-softmax, as its forward pass and HF's loss do.

The ``ember eval ppl`` verb that calls it is :mod:`ember.commands.eval`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.errors import EvaluationError

# fp32 logits elements per log-softmax chunk (64 MiB): e.g. 512 positions of a 32k vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 24


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a sequence of ``n_tokens``.

    Returns:
        (begin, end, first) per window: the window holds tokens ``begin:end`` and scores the
        targets ``first:end`` (each predicted from the tokens before it in the window). The
        ``first`` of window i is the ``end`` of window i-1; the first window scores from token 1.
    """
    if window < 2:
        raise EvaluationError(f"window {window} is too small: a window needs at least 2 tokens (context + target)")
    if not 1 <= stride <= window:
        raise EvaluationError(f"stride {stride} must be between 1 and the window ({window})")
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512, stride: int = 256, batch: int = 1,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of ``token_ids`` under ``model``.

    Args:
        model: an :class:`ember.models.Transformer` (float or quantized; any device).
        token_ids: the text as token ids (BOS included if the tokenizer adds one), at least 2.
        window: tokens per forward pass (capped at the sequence length and must fit the model's context).
        stride: tokens between window starts; each window scores its last ``stride`` tokens
            (the first window scores all but its first token).
        batch: windows per forward pass (windows of equal length are batched together).
        progress: show a tqdm bar over windows on stderr.
    Returns:
        dict: ``nll_sum`` (nats, summed over scored tokens), ``tokens`` (scored; len - 1 when stride < window),
        ``mean_nll``, ``ppl`` = exp(mean_nll), ``windows``, ``window`` (effective), ``stride``.
    Raises:
        EvaluationError: fewer than 2 tokens, bad window/stride, or a window longer than the model's context.
    """
    n = len(token_ids)
    if n < 2:
        raise EvaluationError(f"text has {n} token(s); perplexity needs at least 2")
    ctx = model.config.max_position_embeddings
    if window > ctx and n > ctx:
        raise EvaluationError(f"window {window} exceeds the model's context of {ctx} tokens; use --window {ctx} or less")
    window = min(window, n)
    stride = min(stride, window)
    wins = sliding_windows(n, window, stride)
    device = model.model.norm.weight.device  # (the embedding may hold its table as GGUF blocks, with no .weight)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    vocab = model.config.vocab_size
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    batch = max(1, batch)
    cap = model.config.final_logit_softcapping

    from tqdm.auto import tqdm

    bar = tqdm(total=len(wins), desc="perplexity", unit="window", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    i = 0
    while i < len(wins):
        # consecutive windows of one length go through the model together
        length = wins[i][1] - wins[i][0]
        group = [wins[i]]
        while len(group) < batch and i + len(group) < len(wins) and \
                wins[i + len(group)][1] - wins[i + len(group)][0] == length:
            group.append(wins[i + len(group)])
        x = torch.stack([ids[b:e] for b, e, _ in group])  # (B, L)
        hidden = model(x, hidden_only=True)  # (B, L, H), final-normed
        for row, (b, e, first) in enumerate(group):
            # targets first..e-1 are predicted by positions first-1..e-2 (window-local: minus b)
            h = hidden[row, first - 1 - b:e - 1 - b]  # (n_scored, H)
            targets = ids[first:e]
            for c in range(0, h.shape[0], chunk):
                logits = model.lm_head(h[c:c + chunk])  # (chunk, V)
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                logp = F.log_softmax(logits.float(), dim=-1)  # (chunk, V) fp32
                nll -= logp.gather(-1, targets[c:c + chunk, None]).sum().double()
            scored += e - first
        i += len(group)
        bar.update(len(group))
    bar.close()
    total = nll.item()
    mean = total / scored
    return {"nll_sum": total, "tokens": scored, "mean_nll": mean, "ppl": math.exp(mean), "windows": len(wins),
            "window": window, "stride": stride}


def read_text(path: str | os.PathLike) -> str:
    """The text of an evaluation file (UTF-8).

    Raises:
        EvaluationError: the file is missing, unreadable, not UTF-8, or has no text.
    """
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: text file not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{p}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise EvaluationError(f"{p}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise EvaluationError(f"{p}: the text file is empty; give it some text to score")
    return text
