"""GuidedSpec: OpenAI response_format shapes in, one canonical constraint out, ValueErrors a user can act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap.structured import MAX_SCHEMA_CHARS, GuidedSpec

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def test_response_formats_map_to_specs():
    assert GuidedSpec.from_response_format(None) is None
    assert GuidedSpec.from_response_format({"type": "text"}) is None
    assert GuidedSpec.from_response_format({"type": "json_object"}) == GuidedSpec.json_object()
    spec = GuidedSpec.from_response_format({"type": "json_schema",
                                            "json_schema": {"name": "thing_1", "schema": SCHEMA, "strict": True}})
    assert spec == GuidedSpec.json_schema(SCHEMA) and spec.kind == "json_schema"


def test_schema_text_is_canonical_and_keeps_property_order():
    spec = GuidedSpec.json_schema(SCHEMA)
    assert spec.schema == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}},"required":["b"]}'
    assert GuidedSpec.json_schema(json.dumps(SCHEMA, indent=4)) == spec  # same schema, other spacing: one key
    assert GuidedSpec("json_schema", spec.schema) == spec and GuidedSpec(**spec.as_dict()) == spec
    reordered = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["b"]}
    assert GuidedSpec.json_schema(reordered).key != spec.key  # field order is part of the output
    assert GuidedSpec.json_object().key != spec.key
    with pytest.raises(Exception):
        spec.kind = "json_object"  # frozen


@pytest.mark.parametrize("response_format, message", [
    ("json", "must be an object"),
    ({"type": "yaml"}, "must be text, json_object or json_schema"),
    ({"type": "json_schema"}, "must be an object with a name and a schema"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name must be 1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}, "name must be 1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}, "strict must be a boolean"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON object, got list"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{nope"}}, "not valid JSON"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": float("nan")}}}, "not plain JSON"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["x" * MAX_SCHEMA_CHARS]}}}, "too large"),
])
def test_bad_response_formats_say_what_is_wrong(response_format, message):
    with pytest.raises(ValueError, match=message):
        GuidedSpec.from_response_format(response_format)


def test_specs_check_themselves():
    with pytest.raises(ValueError, match="kind must be one of"):
        GuidedSpec("regex", "a+")
    with pytest.raises(ValueError, match="takes no schema"):
        GuidedSpec("json_object", "{}")
    with pytest.raises(ValueError, match="needs a schema"):
        GuidedSpec("json_schema")


def test_imports_without_torch_or_pydantic():
    """The API builds specs where torch (and the worker's packages) cannot be imported."""
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'xgrammar', 'pydantic', 'worker'):\n"
            "    sys.modules[name] = None\n"
            "from hotswap.structured import GuidedSpec\n"
            "print(GuidedSpec.from_response_format({'type': 'json_object'}).kind)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "json_object", done.stderr
