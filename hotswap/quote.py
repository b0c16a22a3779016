"""User values inside error messages, cut short: a hostile file may hold a 10 MB name or list."""

from __future__ import annotations

from typing import Any


def clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """repr() for a message, at most 200 characters."""
    return clip(repr(value))
