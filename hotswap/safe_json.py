"""JSON from untrusted bytes: every way it can fail is a `ValueError` with a message a user can act on.

`json.loads` raises `RecursionError` (not `ValueError`) on deeply nested input such as `[` x 50,000,
and input nested a little less deep parses but breaks recursive code later (pydantic, repr,
json.dumps). So nesting is bounded here, once, for every parser of user bytes.

    obj = safe_json.loads(raw)          # ValueError: "... nested more than 64 levels deep"
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # an OpenAI request body nests ~6 levels; a JSON schema in one rarely passes 20


class JSONDepthError(ValueError):
    """The document nests arrays/objects deeper than allowed."""


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """`json.loads`, with deep nesting refused as a `ValueError` (never `RecursionError`)."""
    try:
        obj = json.loads(data, **kwargs)
    except RecursionError:
        raise JSONDepthError(f"JSON nested more than {max_depth} levels deep") from None
    check_depth(obj, max_depth)
    return obj


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise `JSONDepthError` if lists/dicts nest deeper than `max_depth` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise JSONDepthError(f"JSON nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
