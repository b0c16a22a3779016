"""Seeded random JSON Schemas of the kinds response_format users send, for structured-output tests
and `bench_engine.py --json-schema`: an object root with 1-4 properties (some required), nested
objects, arrays with bounded item counts, string enums, strings with maxLength or an anchored
`pattern`, integers and numbers with minimum/maximum, booleans, nullable fields (anyOf with null)
and consts. Every string and array is bounded, so a conforming output fits a modest max_tokens.
Standard library only.
"""

from __future__ import annotations

import json
import random

_NAMES = ["name", "title", "city", "country", "color", "status", "kind", "id", "age", "score", "price", "count",
          "tags", "items", "owner", "address", "active", "level", "note", "email", "year", "rating", "size", "code"]
_WORDS = ["red", "green", "blue", "small", "large", "open", "closed", "cat", "dog", "alpha", "beta", "north",
          "south", "yes", "no", "pending", "done"]
# Anchored, so a validator's search (jsonschema uses re.search) and the grammar's full match agree.
_PATTERNS = [r"^[A-Z][a-z]{2,8}$", r"^[0-9]{3}-[0-9]{4}$", r"^[a-z]{1,8}@[a-z]{1,8}\.com$", r"^(yes|no|maybe)$",
             r"^[A-F0-9]{4,8}$", r"^v[0-9]\.[0-9]{1,2}$"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema; nests objects and arrays up to depth 2."""
    names = rng.sample(_NAMES, rng.randint(1, 4 if depth == 0 else 3))
    properties = {name: _value(rng, depth + 1) for name in names}
    schema = {"type": "object", "properties": properties}
    required = [n for n in names if rng.random() < 0.7]
    if required:
        schema["required"] = required
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "enum", "pattern", "integer", "number", "boolean", "nullable", "const"]
    if depth < 3:
        kinds += ["array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 16)}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(_WORDS, rng.randint(2, 5))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(_PATTERNS)}
    if kind == "integer":
        lo = rng.randint(-100, 100)
        out = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 1000)}
        if rng.random() < 0.3:
            del out[rng.choice(["minimum", "maximum"])]
        return out
    if kind == "number":
        lo = rng.choice([0, -1, 0.5, 10])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([1, 5.5, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "nullable":
        return {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}
    if kind == "const":
        return {"const": rng.choice(_WORDS)}
    if kind == "array":
        item = _value(rng, depth + 2)  # arrays of shallow things
        low = rng.randint(0, 1)
        return {"type": "array", "items": item, "minItems": low, "maxItems": low + rng.randint(1, 3)}
    return random_schema(rng, depth)


def random_schemas(count: int, seed: int = 0) -> list[dict]:
    """`count` schemas from one seed (the same list every time), no two equal."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        schema = random_schema(rng)
        text = json.dumps(schema)
        if text not in seen:
            seen.add(text)
            out.append(schema)
    return out


def prompt_for(schema: dict) -> str:
    """A short user message asking for JSON with the schema's top-level fields (the grammar enforces the
    rest; a prompt that spelled out the whole schema would be longer than the answer)."""
    return f"Reply with a JSON object with the fields {', '.join(schema['properties'])}."
