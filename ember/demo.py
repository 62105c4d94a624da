"""A demo model built on the spot: no downloads, about a minute on 2 CPU cores.

``ember demo`` must work for a new user who has no weights at all. So we train, locally and
deterministically, a byte-level BPE tokenizer and a tiny Llama-family model on a bundled
~18 KB English text (``ember/data/demo_corpus.txt``: short prose about the sun, the sea, cooking
and a little town, plus a few question/answer turns), and save the result as an ordinary Hugging
Face checkpoint folder. Everything else in Ember (``generate``, ``chat``, ``serve``, ``tune``,
``plan``) then runs on it exactly as on a downloaded model, and HF ``transformers`` can load it too.

The model memorises much of its small text; it is there to show the machinery working, not to be clever.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ember.checkpoint_io import save_hf_checkpoint
from ember.config import ModelConfig
from ember.errors import OutputExistsError
from ember.models import Transformer

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

# Bump when the corpus, tokenizer, model shape or training recipe changes: old demo folders are
# then rebuilt instead of reused.
DEMO_VERSION = 1

BOS, EOS, USER, ASSISTANT, SYSTEM, END, PAD = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>",
)
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, SYSTEM, END, PAD]  # ids 0..6, in this order
VOCAB_SIZE = 1024
CONTEXT = 512

# ChatML-like: every turn is "<|role|>\n{content}<|end|>\n"; generation stops at <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Training recipe. Sized so the default run takes about a minute on 2 CPU cores (see steps below).
SEQ_LEN = 128
BATCH = 16
DEFAULT_STEPS = 300
PEAK_LR = 3e-3
WARMUP = 20
DEFAULT_TIME_LIMIT_S = 240.0  # safety net for slow machines: stop early rather than make a new user wait


def demo_model_config(vocab_size: int = VOCAB_SIZE) -> ModelConfig:
    """The demo architecture: a 4-layer Llama with GQA (4 query / 2 kv heads) and tied embeddings."""
    cfg = ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD), torch_dtype="float32",
    )
    cfg.extra["ember_demo_version"] = DEMO_VERSION
    return cfg


# ---------------------------------------------------------------------------------------- corpus
def load_corpus() -> str:
    """The bundled demo text."""
    return resources.files("ember").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")


def corpus_documents(text: str | None = None) -> tuple[list[str], list[list[dict[str, str]]]]:
    """Split the corpus into prose paragraphs and chat conversations.

    Blocks are separated by blank lines; a block of ``User:`` / ``Assistant:`` lines is a chat.
    """
    prose: list[str] = []
    chats: list[list[dict[str, str]]] = []
    for block in (text if text is not None else load_corpus()).split("\n\n"):
        block = block.strip()
        if not block:
            continue
        if block.startswith("User:"):
            turns = []
            for line in block.splitlines():
                role, _, content = line.partition(":")
                turns.append({"role": "user" if role == "User" else "assistant", "content": content.strip()})
            chats.append(turns)
        else:
            prose.append(" ".join(block.split()))
    return prose, chats


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Python twin of :data:`CHAT_TEMPLATE` (used for training text; the Jinja one ships with the model)."""
    out = BOS + "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)
    return out + (f"{ASSISTANT}\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(text: str | None = None, vocab_size: int = VOCAB_SIZE) -> "Tokenizer":
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on the corpus (deterministic, < 1 s).

    Byte-level so that any input (other languages, emoji) still encodes; the post-processor adds
    ``<|begin_of_text|>`` like Llama 3's does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    prose, chats = corpus_documents(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = prose + [m["content"] for chat in chats for m in chat]
    tok.train_from_iterator(lines, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def tokenizer_config(tok: "Tokenizer") -> dict[str, Any]:
    """``tokenizer_config.json`` in the form transformers writes for a PreTrainedTokenizerFast."""
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": CONTEXT,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config(tok: "Tokenizer") -> dict[str, Any]:
    """``generation_config.json``: chat turns end at ``<|end|>``, text at ``<|end_of_text|>``."""
    return {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(END)],
        "pad_token_id": tok.token_to_id(PAD),
        "do_sample": False,
    }


# ---------------------------------------------------------------------------------------- training
def training_stream(tok: "Tokenizer", text: str | None = None, seed: int = 0, repeats: int = 8) -> torch.Tensor:
    """All documents as one token stream, in ``repeats`` shuffled orders (so windows cross varied seams).

    Prose is ``<bos> text <eot>``; chats are rendered with the chat template. Chats are short, so
    they are included twice per order to make the one-turn chat in ``ember demo`` work.
    """
    prose, chats = corpus_documents(text)
    eot = tok.token_to_id(EOS)
    docs = [tok.encode(p).ids + [eot] for p in prose]  # post-processor adds <bos>
    docs += [tok.encode(render_chat(c), add_special_tokens=False).ids for c in chats] * 2
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(repeats):
        for i in torch.randperm(len(docs), generator=g).tolist():
            ids.extend(docs[i])
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers).

    PyTorch's defaults (N(0,1) embeddings, tied to the head) would start with huge logits.
    """
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.zero_()


def lm_loss(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (B, T+1)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train_demo_model(tok: "Tokenizer", seed: int = 0, steps: int = DEFAULT_STEPS, progress: bool = True,
                     time_limit: float | None = DEFAULT_TIME_LIMIT_S,
                     config: ModelConfig | None = None, peak_lr: float = PEAK_LR,
                     pace_by_time: bool = False) -> tuple[Transformer, dict[str, Any]]:
    """Train the demo Transformer (fp32, AdamW, warmup + cosine LR) on random corpus windows.

    ``config``: another architecture to train the same way (default :func:`demo_model_config`; the speculative
    decoding benchmark trains a target and a smaller draft). ``peak_lr``: the LR after warmup (larger models
    want less than the demo's). ``pace_by_time``: with a ``time_limit``, the cosine follows whichever of steps
    or wall time is further along, so a run the clock stops still ends at the low LR (a model cut off at a high
    LR is far from its best); off by default, so the demo's training does not depend on the machine's speed.
    Returns the model (eval mode) and a small report: steps run, first/last loss, seconds.
    """
    from tqdm.auto import tqdm

    cfg = config or demo_model_config(tok.get_vocab_size())
    model = Transformer(cfg)
    init_weights(model, seed)
    stream = training_stream(tok, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95), foreach=True)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return peak_lr * (step + 1) / WARMUP
        frac = (step - WARMUP) / max(1, steps - WARMUP)
        if pace_by_time and time_limit:
            frac = max(frac, (time.perf_counter() - t0) / time_limit)
        frac = min(frac, 1.0)
        return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine down to 10%

    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="training demo model", unit="step", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=g)
        batch = torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            bar.write(f"[ember demo] stopping after {step + 1} steps: time limit {time_limit:.0f}s reached",
                      file=sys.stderr)
            break
    bar.close()
    model.eval().requires_grad_(False)
    report = {"steps": len(losses), "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t0, 1)}
    return model, report


# ---------------------------------------------------------------------------------------- folder
def is_demo_checkpoint(folder: str | os.PathLike, version: int | None = DEMO_VERSION) -> bool:
    """Whether ``folder`` holds a complete demo checkpoint (of ``version``, or of any version if None).

    Checkpoint folders are renamed into place only when complete, so the files being present
    is enough; the version guards against reusing a demo built by an older recipe.
    """
    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict) or "ember_demo_version" not in raw:
        return False
    if version is not None and raw["ember_demo_version"] != version:
        return False
    return all((folder / f).is_file() for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def build_demo_checkpoint(folder: str | os.PathLike, seed: int = 0, steps: int = DEFAULT_STEPS,
                          progress: bool = True, rebuild: bool = False,
                          time_limit: float | None = DEFAULT_TIME_LIMIT_S) -> Path:
    """Train the demo tokenizer and model and save them as an HF checkpoint folder; reuse one already there.

    Args:
        folder: destination. An existing demo of this version is reused (unless ``rebuild``); an
            older demo is replaced; any other non-empty folder is left alone and an error raised.
        seed: RNG seed; the same seed and steps give the same weights on the same machine.
        steps: optimizer steps (the default takes about a minute on 2 CPU cores).
        progress: show a tqdm bar with the loss on stderr.
        rebuild: retrain even when a matching demo exists.
        time_limit: stop training after this many seconds even if ``steps`` are not done.
    Returns:
        The folder.
    Raises:
        OutputExistsError: ``folder`` is non-empty and is not an Ember demo checkpoint.
    """
    folder = Path(folder)
    if not rebuild and is_demo_checkpoint(folder):
        return folder
    replace = is_demo_checkpoint(folder, version=None)
    if folder.exists() and not replace and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputExistsError(f"{folder}: exists and is not an Ember demo model; choose another --dir")

    tok = train_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state untouched
        model, report = train_demo_model(tok, seed=seed, steps=steps, progress=progress, time_limit=time_limit)
    tok_config = tokenizer_config(tok)
    readme = (
        "# Ember demo model\n\n"
        "A tiny Llama-family model and byte-level BPE tokenizer trained locally by `ember demo` on the "
        "bundled text `ember/data/demo_corpus.txt`. It is an ordinary Hugging Face checkpoint folder.\n\n"
        f"- ember_demo_version: {DEMO_VERSION}\n- seed: {seed}\n- steps: {report['steps']}\n"
        f"- loss: {report['first_loss']:.3f} -> {report['last_loss']:.3f}\n- training seconds: {report['seconds']}\n"
        if report["steps"] else
        "# Ember demo model (untrained)\n"
    )
    try:
        save_hf_checkpoint(
            folder, model,
            tokenizer_files={"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n"},
            generation_config=generation_config(tok),
            overwrite=replace,
            extra_files={"README.md": readme},
        )
    except OutputExistsError:
        if is_demo_checkpoint(folder):  # another `ember demo` finished first; its result is as good as ours
            return folder
        raise
    return folder
