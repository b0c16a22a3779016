"""Errors raised while reading user-supplied LoRA adapters and full fine-tunes.

Every one is an `AdapterFormatError`, itself a `ValueError`: the user's files are wrong or unsupported
(a client error), never the server. Messages name the file or field at fault and what to do about it.
A problem with the *base* model's config (the server's own) is a plain `ValueError`, not one of these.
"""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """A LoRA adapter or full fine-tune dir that hotswap cannot serve."""


class MissingFileError(AdapterFormatError):
    """The dir lacks a required file (adapter_config.json, adapter_model.safetensors, config.json, ...)."""


class NotRegularFileError(AdapterFormatError):
    """A symlink, directory, FIFO or device where a file is expected: never followed, never read."""


class PickledWeightsError(AdapterFormatError):
    """Only pickled weights (.bin/.pt/...) were found. They are refused and never opened."""


class InvalidConfigError(AdapterFormatError):
    """adapter_config.json / config.json is not valid JSON or has a malformed field."""


class UnsupportedAdapterError(AdapterFormatError):
    """A valid PEFT adapter using a feature the engine does not implement (DoRA, modules_to_save, ...)."""


class RankError(AdapterFormatError):
    """LoRA rank is not positive, exceeds the engine's maximum, or disagrees with the tensors."""


class BaseModelMismatchError(AdapterFormatError):
    """The weights were trained for a different base model (other dims, layer count or architecture)."""


class CorruptWeightsError(AdapterFormatError):
    """A .safetensors file whose header or layout is broken (truncated, bad JSON, bad offsets)."""


class MissingTensorError(AdapterFormatError):
    """A tensor the config implies is absent (e.g. lora_A without its lora_B)."""


class UnexpectedTensorError(AdapterFormatError):
    """A tensor that has no place in the adapter / model."""


class TensorDtypeError(AdapterFormatError):
    """A tensor whose dtype is not a floating point type the engine accepts."""


class NonFiniteWeightsError(AdapterFormatError):
    """A tensor holding NaN or Inf values."""
