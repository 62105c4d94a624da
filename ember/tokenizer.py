"""Tokenizer and chat templates: the `tokenizers` library plus the checkpoint's own Jinja template.

A checkpoint directory written by HF ``save_pretrained`` holds everything we need:

    tokenizer.json            the full pipeline (normalizer, pre-tokenizer, model, post-processor, decoder)
    tokenizer_config.json     special tokens (strings or AddedToken dicts), flags, maybe the chat template
    chat_template.jinja       the chat template (transformers >= 4.50 / 5 write it here)
    generation_config.json    eos_token_id(s) the model was trained to stop on
    config.json               eos_token_id again (older checkpoints only have it here)

HF ``transformers`` is the oracle for every behaviour here (tests compare against it), but it is
never imported: the runtime needs only ``tokenizers`` and ``jinja2``.

Facts about transformers 5 this module mirrors:

- BOS/EOS insertion comes from tokenizer.json's post-processor alone. When tokenizer.json exists,
  transformers 5 *drops* ``add_bos_token``/``add_eos_token`` from tokenizer_config.json; a v5
  ``save_pretrained`` bakes those flags into the post-processor (a ``TemplateProcessing``) instead.
- Named special tokens (and ``extra_special_tokens``) missing from the added-token table are added
  as special tokens at load, which can change ids and ``vocab_size``.
- Templates run in an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``,
  the ``loopcontrols`` extension, a ``{% generation %}`` tag, ``raise_exception``,
  ``strftime_now`` and a ``tojson`` that does not HTML-escape and keeps non-ASCII text.
  They see ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, every named special
  token as a string (``bos_token``, ``eos_token``, ...) and the caller's extra keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from ember.chat_formats.harmony import HARMONY_TEMPLATE
from ember.chat_template import _alias_reasoning, _compile_template, _message_dict, _plain, _TemplateRaised
from ember.errors import ChatTemplateError, TokenizerError

# The special-token attributes transformers knows by name, in its order (template variables and
# the order missing tokens are added in both follow it).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")



class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template.

    Build it with :meth:`from_dir`. Encoding and decoding are exactly those of HF
    ``AutoTokenizer.from_pretrained(path)`` for checkpoints with a tokenizer.json.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
        source: str = "<memory>",
    ) -> None:
        """Wrap a ready `tokenizers.Tokenizer`; prefer :meth:`from_dir`, which fills every argument.

        Args:
            backend: the Rust tokenizer; special tokens must already be in its added-token table.
            special_tokens: template-visible special tokens by name (``bos_token`` -> ``"<s>"``).
            chat_templates: named Jinja templates; ``"default"`` is the one used without tools.
            eos_token_ids: ids that end generation, first the generation_config ones.
            clean_up_tokenization_spaces: HF's legacy post-decode space cleanup (never for BPE).
            source: where this came from, for error messages.
        """
        self._backend = backend
        self._source = source
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._templates = dict(chat_templates or {})
        # transformers skips the cleanup for BPE models because it corrupts their output.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = self._special.get("bos_token")
        self.eos_token: str | None = self._special.get("eos_token")
        self.pad_token: str | None = self._special.get("pad_token")
        self.unk_token: str | None = self._special.get("unk_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.pad_token_id: int | None = self.token_to_id(self.pad_token)
        ids = list(eos_token_ids)
        if (eos_id := self.token_to_id(self.eos_token)) is not None:
            ids.append(eos_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))  # dedupe, keep order
        self.chat_template: str | None = self._templates.get("default")

        # For StreamDecoder: ids whose text can still change with the ids that follow them.
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_ids = _byte_fallback_ids(backend)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of an HF checkpoint directory.

        Reads tokenizer.json (required), and if present tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja / additional_chat_templates/*.jinja / chat_template.json,
        generation_config.json and config.json (for eos ids).

        Raises:
            TokenizerError: tokenizer.json is missing, or a file is malformed (the message names it).
        """
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory; pass the checkpoint folder that holds tokenizer.json")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(
                f"{tok_file} not found: Ember needs the fast-tokenizer file tokenizer.json "
                "(a checkpoint with only tokenizer.model can be converted once with HF transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            )
        text = _read_text(tok_file)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for any error
            _parse_json(text, tok_file)  # a JSON syntax error: report its line, which tokenizers does not
            raise TokenizerError(f"{tok_file}: not a valid tokenizers file: {e}") from e
        # Ember pads and truncates itself; HF also switches these off for a plain encode.
        backend.no_padding()
        backend.no_truncation()

        config = _read_json_object(root / "tokenizer_config.json")
        special, extras = _special_tokens(root, config)
        _add_missing_special_tokens(backend, special, extras)
        # HF's split_special_tokens=True encodes "<s>" in text as plain characters.
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        return cls(
            backend,
            special_tokens={name: tok.content for name, tok in special.items()},
            chat_templates=_chat_templates(root, config) or _family_fallback_template(root),
            eos_token_ids=_model_eos_ids(root),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            source=str(root),
        )

    # ---------------------------------------------------------------- text <-> ids

    def check_fits(self, model_vocab_size: int, model_source: str) -> None:
        """Refuse a tokenizer that can produce ids the model has no embedding row for.

        Raises:
            TokenizerError: the largest token id is >= ``model_vocab_size`` (naming both files), so the
                error comes at load rather than as an IndexError at generate time.
        """
        top = max([self.vocab_size - 1, *self.eos_token_ids])
        if top >= model_vocab_size:
            raise TokenizerError(f"{self._source}: the tokenizer has token ids up to {top} but the model "
                                 f"({model_source}) has vocab_size {model_vocab_size}; they do not belong together")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` tokens marked special (BOS, EOS, ...) are dropped."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str | None) -> int | None:
        """Id of one token string (e.g. ``"<|eot_id|>"``), or None if it is not in the vocabulary."""
        return None if token is None else self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of one id, or None if the id is out of range."""
        return self._backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for one generated sequence, fed one id at a time (see :class:`StreamDecoder`)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template, exactly as HF does.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``; keys whose value is None are dropped.
            add_generation_prompt: end with the header that opens the assistant's turn.
            tools: JSON-schema tool descriptions; picks the ``tool_use`` template if there is one.
            **kwargs: extra template variables (``documents``, ``date_string``, ``enable_thinking``, ...);
                they override the special tokens of the same name.

        Returns:
            The prompt text, special tokens written out; encode it with ``add_special_tokens=False``.

        Raises:
            ChatTemplateError: no template, bad messages, or the template raised (its message is kept).
        """
        template = self._select_template(tools)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("apply_chat_template needs a non-empty list of messages")
        chat = _alias_reasoning([_message_dict(m) for m in messages])
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ChatTemplateError(
                        f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{...}}}}), "
                        f"got {type(tool).__name__}"
                    )
        documents = kwargs.pop("documents", None)
        variables = {**self._special, **kwargs}  # caller's kwargs win over special tokens, as in HF
        try:
            compiled = _compile_template(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"the chat template of {self._source} has a syntax error at line {e.lineno}: {e.message}"
            ) from e
        try:
            return compiled.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except _TemplateRaised as e:
            raise ChatTemplateError(f"the chat template of {self._source} rejected the messages: {e.message}") from e
        except Exception as e:  # templates are untrusted code: any failure is a bad template or bad messages
            raise ChatTemplateError(
                f"the chat template of {self._source} failed to render: {type(e).__name__}: {e}"
            ) from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation (= HF ``apply_chat_template(tokenize=True)``).

        The template writes BOS itself where the model wants one, so no special tokens are added.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def chat_template_source(self, tools: list | None = None) -> str | None:
        """The source of the chat template :meth:`apply_chat_template` would use (None if there is none)."""
        try:
            return self._select_template(tools)
        except ChatTemplateError:
            return None

    def _select_template(self, tools: list | None) -> str:
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if self._templates:
            raise ChatTemplateError(
                f"{self._source} has several chat templates ({', '.join(sorted(self._templates))}) "
                "and none is named 'default'"
            )
        raise ChatTemplateError(
            f"{self._source} has no chat template (no chat_template.jinja and none in tokenizer_config.json): "
            "it is probably a base model; use a plain text prompt (completions) instead of chat messages"
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos_ids={self.eos_token_ids}, chat_template={'yes' if self._templates else 'no'})"
        )


class StreamDecoder:
    """Incremental detokenizer for one generated sequence.

    Re-decodes a small window of recent ids per push (not the whole sequence) and emits only the
    text that is new, holding it back while it ends in U+FFFD, i.e. while a multi-byte UTF-8 char
    is still split across tokens. The window always starts one emission back, so decoders that
    treat the first token specially (Metaspace's leading space, Strip) see the same first token in
    both decodes they compare. Invariant: ``"".join(pushes) + flush() == tokenizer.decode(ids)``.

    SentencePiece-style byte fallback (``<0xE4>`` tokens) needs one more rule: the ByteFallback
    decoder turns a whole run of byte tokens into U+FFFDs if any byte in it is invalid, so a run's
    text is only final once a non-byte token closes it. Such runs are held until then (one token
    of delay for characters outside the vocabulary); skipped special tokens do not close a run.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:_read] are accounted for in the emitted text
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._tok._byte_ids or (self._skip and token_id in self._tok._special_ids):
            return ""  # may still change or join a byte run: decide when the next visible token comes
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """End of sequence: return the remaining text (a genuinely broken char shows as U+FFFD) and reset."""
        emitted = "".join(self._emitted)
        full = self._decode(self._ids)
        if full.startswith(emitted):
            rest = full[len(emitted) :]
        else:  # a decoder whose output is not local; emit what the window says rather than retract
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            rest = after[len(before) :] if after.startswith(before) else ""
        self._reset()
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


# -------------------------------------------------------------------- file reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _read_json_object(path: Path) -> dict:
    """The JSON object in an optional file; {} if the file is absent."""
    if not path.is_file():
        return {}
    data = _parse_json(_read_text(path), path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class _SpecialToken:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def added_token(self) -> tokenizers.AddedToken:
        # normalized=False: special tokens match the raw text, as HF adds them.
        return tokenizers.AddedToken(
            self.content, lstrip=self.lstrip, rstrip=self.rstrip, single_word=self.single_word,
            normalized=False, special=True,
        )


def _as_special_token(value: Any, where: str) -> _SpecialToken | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _SpecialToken(value)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return _SpecialToken(
            value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False)),
            bool(value.get("single_word", False)),
        )
    raise TokenizerError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r}")


def _special_tokens(root: Path, config: dict) -> tuple[dict[str, _SpecialToken], list[_SpecialToken]]:
    """Named special tokens (bos_token, ..., model-specific like image_token) and the unnamed extras.

    Follows transformers 5: tokenizer_config.json first; special_tokens_map.json (legacy) overrides
    it only for configs without ``added_tokens_decoder``, i.e. ones not written by a recent save.
    """
    cfg_file = root / "tokenizer_config.json"
    values: dict[str, tuple[Any, str]] = {k: (v, f"{cfg_file}: {k}") for k, v in config.items()}
    map_file = root / "special_tokens_map.json"
    if "added_tokens_decoder" not in config:
        for k, v in _read_json_object(map_file).items():
            values[k] = (v, f"{map_file}: {k}")

    named: dict[str, _SpecialToken] = {}
    for key in NAMED_SPECIAL_TOKENS:
        if key in values and (tok := _as_special_token(*values[key])) is not None:
            named[key] = tok
    # Model-specific named tokens (image_token, ...): any other "*_token" key holding a token.
    for key, (value, where) in values.items():
        if key.endswith("_token") and key not in named and key not in NAMED_SPECIAL_TOKENS:
            if isinstance(value, str) or (isinstance(value, Mapping) and "content" in value):
                named[key] = _as_special_token(value, where)  # type: ignore[assignment]

    extras: list[_SpecialToken] = []
    # "additional_special_tokens" is the v4 name of "extra_special_tokens".
    raw, where = values.get("extra_special_tokens", (None, ""))
    if not raw:
        raw, where = values.get("additional_special_tokens", (None, ""))
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            if (tok := _as_special_token(value, f"{where}.{key}")) is not None:
                named.setdefault(key, tok)
    elif isinstance(raw, list):
        extras = [t for i, v in enumerate(raw) if (t := _as_special_token(v, f"{where}[{i}]")) is not None]
    elif raw is not None:
        raise TokenizerError(f"{where}: expected a list or an object of tokens, got {type(raw).__name__}")
    return named, extras


def _add_missing_special_tokens(
    backend: tokenizers.Tokenizer, named: Mapping[str, _SpecialToken], extras: list[_SpecialToken]
) -> None:
    """Add special tokens the config names but tokenizer.json lacks, as transformers does at load.

    A token already in the model vocabulary keeps its id but becomes an added token, so it is
    matched whole in text; a brand-new one gets the next id.
    """
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing: list[tokenizers.AddedToken] = []
    for tok in [*named.values(), *extras]:
        if tok.content not in present:
            present.add(tok.content)
            missing.append(tok.added_token())
    if missing:
        backend.add_special_tokens(missing)


def _chat_templates(root: Path, config: dict) -> dict[str, str]:
    """Named chat templates; template files beat tokenizer_config.json entries, as in transformers."""
    templates: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = _read_text(root / "chat_template.jinja")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = _read_text(f)
    if templates:
        return templates

    where = root / "tokenizer_config.json"
    value = config.get("chat_template")
    if value is None and (root / "chat_template.json").is_file():
        # Processor-style file ({"chat_template": "..."}); transformers' tokenizer ignores it, so it
        # comes last and only fills a gap.
        where = root / "chat_template.json"
        value = _read_json_object(where).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        return {str(t["name"]): str(t["template"]) for t in value}
    raise TokenizerError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


def _family_fallback_template(root: Path) -> dict[str, str]:
    """Ember's own template for a family whose format it knows, when the folder ships none (gpt-oss: harmony).

    Prints one line on stderr saying so; any other folder without a template gets none (a base model).
    """
    cfg = _read_json_object(root / "config.json")
    if cfg.get("model_type") != "gpt_oss":
        return {}
    print(f"ember: {root} has no chat template; using Ember's harmony template for gpt-oss", file=sys.stderr)
    return {"default": HARMONY_TEMPLATE}


def _model_eos_ids(root: Path) -> list[int]:
    """eos_token_id(s) from generation_config.json, then config.json, in order, deduplicated later."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        cfg = _read_json_object(root / name)
        value = cfg.get("eos_token_id")
        if value is None and isinstance(cfg.get("text_config"), Mapping):  # multimodal wrappers nest it
            value = cfg["text_config"].get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TokenizerError(f"{root / name}: eos_token_id must be an int or a list of ints, got {value!r}")
            ids.append(v)
    return ids


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of ``<0xNN>`` tokens when the decoder has a ByteFallback step, else none."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _clean_up_tokenization(text: str) -> str:
    """HF's legacy cleanup of spaces before punctuation and contractions (WordPiece-era decoding)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
