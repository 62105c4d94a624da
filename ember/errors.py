"""Every error Ember raises on purpose lives here.

Each message says what was wrong, where (file, line, field, tensor name) and what to do.
The CLI prints ``str(err)`` for any :class:`EmberError` as a one-line message, with no traceback.
"""


class EmberError(Exception):
    """Base class for all Ember errors; messages are for humans."""


class ConfigError(EmberError):
    """A config.json is missing, malformed, or describes a model Ember cannot build."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's ``model_type`` (or one of its features) is not supported."""


class CheckpointError(EmberError):
    """Weights are missing, unexpected, mis-shaped or the file is corrupt."""


class GenerationError(EmberError):
    """A generation request cannot be run (e.g. it does not fit the model's context)."""


class SamplingError(EmberError):
    """Sampling parameters are out of range, or the sampler was fed tensors of the wrong shape."""


class OutputExistsError(EmberError, FileExistsError):
    """An output file or folder already exists and overwriting it was not asked for."""


class TokenizerError(EmberError):
    """A tokenizer file (tokenizer.json, tokenizer_config.json, ...) is missing or malformed."""


class ChatTemplateError(EmberError):
    """A chat cannot be rendered: no template, bad messages, or the template itself raised."""


class GGUFError(CheckpointError):
    """A GGUF file is malformed or truncated, or holds something Ember cannot load (the message says which)."""


class UnsupportedGGUFTypeError(GGUFError):
    """A GGUF tensor is stored in a ggml type Ember does not decode (e.g. IQ2_XXS); the message lists those it does."""


class UnsupportedSchemaError(EmberError):
    """A JSON schema (``response_format``) uses a feature constrained decoding does not support."""


class QueueFullError(EmberError):
    """The server's request queue is full; retry later."""


class InsufficientMemoryError(EmberError):
    """The planned model, KV cache and activations do not fit the memory available; the message says what would."""


class AdapterError(EmberError):
    """A LoRA adapter folder is missing, malformed, unsupported (DoRA, modules_to_save, ...) or does not fit the model."""


class DataError(EmberError):
    """A training data file has malformed lines; the message lists them by file and line number."""


class TrainingError(EmberError):
    """A fine-tuning run cannot start or continue (bad options, no checkpoint to resume, diverged loss)."""


class QuantizationError(EmberError, ValueError):
    """A quantization request is invalid (unknown mode, group size not dividing a layer's width, ...)
    or a quantized checkpoint's ``quantization`` section is malformed; the message names the layer/field."""


class EvaluationError(EmberError):
    """An evaluation cannot run: a missing or empty text file, too few tokens, a bad window/stride."""


class ModelNotFoundError(EmberError):
    """A model name (``org/name``, ``ollama:NAME``, a name in Ember's model folder) is not on this machine;
    the message lists the closest local names."""


class DistributedError(EmberError):
    """A multi-process run failed: a rank died, hung past the timeout, or the launch was misconfigured."""
