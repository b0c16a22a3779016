"""The engine's own errors. Each is also a ValueError, so callers that only tell "bad input" from
"bug" keep working; the worker service answers each with its own error code."""

from __future__ import annotations


class EngineError(ValueError):
    """Something the engine was asked to do cannot be done."""


class RequestRejected(EngineError):
    """add_request refused this request (too long, unknown adapter, bad token ids, ...): the
    caller's input, never the engine's state."""


class AdapterError(EngineError):
    """An adapter or fine-tune cannot be registered (LoRA disabled, name in use, ...)."""
