"""Error types every package shares."""

from __future__ import annotations


class NotFound(KeyError):
    """No such thing for this caller (a KeyError, so `except KeyError` still works), with a readable
    str(): KeyError's own would repr() the message ("'no such file'")."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
