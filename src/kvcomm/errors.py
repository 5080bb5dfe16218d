"""Errors raised for bad user input. Every one says what was wrong and what would fix it."""


class KVCommError(Exception):
    """Base class of every error kvcomm raises on bad input."""


class ModelLoadError(KVCommError):
    """A model name, path or file could not be resolved or loaded."""


class IncompatibleModelsError(KVCommError):
    """Sender and receiver cannot exchange KV (different layer count, KV heads, head dim, vocabulary, RoPE)."""


class LayerSelectionError(KVCommError):
    """Layer indices out of range, an empty selection, or an invalid ratio."""


class PromptError(KVCommError):
    """An empty context or question, or a prompt longer than the model's context window."""


class TaskError(KVCommError):
    """An unknown task, a missing data file, or a malformed record."""


class CalibrationError(KVCommError):
    """Sender and receiver KV statistics that cannot be matched (different head_dim or KV heads, missing layers)."""


class QuantizationError(KVCommError):
    """An invalid bit width, group size, axis or tensor for quantization, or a bit budget that cannot be met."""


class WireFormatError(KVCommError):
    """A message that cannot be encoded, or bytes that are not a valid kvcomm wire message (corrupted, truncated,
    malformed or of an unknown version)."""
