"""Model and tenant names, and model references (`name`, `name@3`, `name@latest`). Pure: no I/O.

The rule (the same for model names and tenant names):

- 1 to 63 characters: lowercase ASCII letters, digits, '-', '_' and '.';
- starts with a letter or a digit;
- no '..' anywhere.

So a name is always safe as one path segment, one storage key segment and one Redis key segment (no
'/', no ':', no '@', never '.' or '..', no upper case to collide with on case-insensitive filesystems).

A reference is `name` (the latest version), `name@latest` (the same) or `name@N` with N a positive
integer (that exact version).
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "NAME_RULE",
    "format_ref",
    "is_valid_name",
    "parse_ref",
    "validate_name",
    "validate_tenant",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MAX_NAME_LENGTH = 63
NAME_RULE = (
    "1 to 63 characters, only lowercase letters, digits, '-', '_' and '.', starting with a letter or a digit, "
    "and no '..'"
)

# fullmatch + \Z semantics: '$' alone would also accept a trailing newline.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_VERSION = re.compile(r"[0-9]+")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


def _validate(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}; a {what} is {NAME_RULE}")
    if not is_valid_name(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ValueError(f"invalid {what} {shown!r}: a {what} is {NAME_RULE}")
    return name


def validate_name(name: object) -> str:
    """Return `name` unchanged if it is a valid model name, else raise ValueError stating the rule."""
    return _validate(name, "model name")


def validate_tenant(tenant: object) -> str:
    """Return `tenant` unchanged if it is a valid tenant name, else raise ValueError stating the rule."""
    return _validate(tenant, "tenant name")


def parse_ref(ref: object) -> tuple[str, int | None]:
    """`"name"` -> (name, None); `"name@latest"` -> (name, None); `"name@3"` -> (name, 3).

    Raises ValueError for an invalid name or a version that is not a positive integer or 'latest'.
    """
    if not isinstance(ref, str):
        raise ValueError(f"model reference must be a string like 'name' or 'name@3', got {type(ref).__name__}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if version == "latest":
        return name, None
    if not _VERSION.fullmatch(version) or int(version) < 1:
        raise ValueError(
            f"invalid model reference {ref!r}: after '@' comes a version, a positive integer (as in "
            f"'{name}@3') or 'latest'; got {version!r}"
        )
    return name, int(version)


def format_ref(name: str, version: int | None = None) -> str:
    """The inverse of `parse_ref`: `name` or `name@3`."""
    return name if version is None else f"{name}@{version}"
