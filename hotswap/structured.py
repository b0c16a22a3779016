"""What a request's structured output must be: any JSON object, or JSON matching a JSON Schema.

Torch-free and dependency-free (stdlib json), so the API can build and check the constraint from an
OpenAI `response_format` without the worker's packages: `from_response_format` refuses what the
engine cannot enforce (hotswap/schema_support.py) before the request is queued; the worker's engine
compiles it with xgrammar (worker/engine/grammar.py).

    spec = GuidedSpec.from_response_format({"type": "json_schema",
                                            "json_schema": {"name": "person", "schema": {...}}})
    spec = GuidedSpec.json_schema({"type": "object", ...})   # or GuidedSpec.json_object()
    spec.as_dict() / GuidedSpec(**d)                          # plain JSON for the request protocol

A schema is kept as canonical JSON text (compact separators, key order KEPT: the order of
`properties` is the order of the generated fields), so equal schemas share one compiled grammar.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from hotswap.schema_support import unsupported_feature

KINDS = ("json_object", "json_schema")
MAX_SCHEMA_CHARS = 256 * 1024  # canonical JSON text; far above any real response schema
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name


@dataclass(frozen=True)
class GuidedSpec:
    kind: str  # "json_object" | "json_schema"
    schema: str | None = None  # json_schema: the schema as canonical JSON text (a dict is converted)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "json_object":
            if self.schema is not None:
                raise ValueError("a json_object constraint takes no schema: use kind 'json_schema'")
            return
        if self.schema is None:
            raise ValueError("a json_schema constraint needs a schema")
        object.__setattr__(self, "schema", canonical_schema(self.schema))

    @classmethod
    def json_object(cls) -> GuidedSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> GuidedSpec:
        return cls("json_schema", schema)

    @classmethod
    def from_response_format(cls, response_format: dict | None) -> GuidedSpec | None:
        """OpenAI's `response_format`: {"type": "text"} (or None) -> None; {"type": "json_object"};
        {"type": "json_schema", "json_schema": {"name", "schema", "description"?, "strict"?}}.
        `strict` is accepted and changes nothing: the schema is always enforced by the grammar."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind != "json_schema":
            raise ValueError(f"response_format.type must be text, json_object or json_schema; got {kind!r}")
        body = response_format.get("json_schema")
        if not isinstance(body, dict):
            raise ValueError("response_format.json_schema must be an object with a name and a schema")
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        if "strict" in body and body["strict"] is not None and not isinstance(body["strict"], bool):
            raise ValueError("response_format.json_schema.strict must be a boolean")
        if body.get("schema") is None:
            raise ValueError("response_format.json_schema.schema is required")
        spec = cls.json_schema(body["schema"])
        problem = unsupported_feature(json.loads(spec.schema))
        if problem:  # refused here, before queueing, rather than ignored by the grammar engine
            where, what = problem
            raise ValueError(f"response_format.json_schema.schema{'.' + where if where else ''}: {what}")
        return spec

    @property
    def key(self) -> str:
        """Identity of the grammar this spec compiles to (the engine's compile cache key)."""
        return hashlib.sha256(f"{self.kind}\0{self.schema or ''}".encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": self.schema}


def canonical_schema(schema: dict | str) -> str:
    """The schema as compact JSON text, key order kept. ValueError unless it is a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a non-JSON value (a set, NaN, ...) inside a dict given in Python
        raise ValueError(f"the JSON schema is not plain JSON: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the JSON schema is too large: {len(text)} characters (at most {MAX_SCHEMA_CHARS})")
    return text
