"""The API's schema check (hotswap/schema_support.py) against what xgrammar really enforces.

For each keyword: a schema using it and a JSON text that is valid without the keyword but breaks it.
A keyword the check accepts must make xgrammar's grammar refuse that text; one the check refuses must
be one xgrammar ignores (accepts the text) or refuses to compile. A new xgrammar that changes either
side fails here, and the check's lists are updated from this table.
"""

import json

import pytest

from hotswap.schema_support import unsupported_feature

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string  # noqa: E402

from worker.engine.grammar import JSON_FORMAT  # noqa: E402

ENFORCED = [  # (schema, a text only the keyword refuses)
    ({"type": "string", "minLength": 2}, '"a"'),
    ({"type": "string", "maxLength": 2}, '"abc"'),
    ({"type": "string", "pattern": "^a+$"}, '"b"'),
    *[({"type": "string", "format": f}, '"no pe!"') for f in
      ["email", "date", "date-time", "time", "uuid", "uri", "uri-reference", "uri-template", "hostname", "ipv4",
       "ipv6", "duration", "json-pointer", "relative-json-pointer"]],
    ({"type": "integer", "minimum": 3}, "2"),
    ({"type": "integer", "maximum": 3}, "4"),
    ({"type": "integer", "exclusiveMinimum": 3}, "3"),
    ({"type": "integer", "exclusiveMaximum": 3}, "3"),
    ({"type": "integer", "multipleOf": 3}, "4"),
    ({"type": "number", "minimum": 3}, "2.5"),
    ({"type": "number", "maximum": 3.5}, "3.6"),
    ({"type": "number", "exclusiveMinimum": 3}, "3"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "[1, 2, 3]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}]}, '["a"]'),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1, 2]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}, '{"a": 1, "b": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": "x"}'),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, '{"a": "x"}'),
    ({"type": "object", "propertyNames": {"pattern": "^a"}, "additionalProperties": {"type": "integer"}}, '{"b": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1}, '{"a": 1, "b": 2}'),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, '"s"'),
    ({"allOf": [{"type": "integer", "minimum": 1}]}, "0"),
    ({"enum": ["a", "b"]}, '"c"'),
    ({"const": "a"}, '"c"'),
    ({"type": ["string", "null"]}, "1"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
      "$defs": {"x": {"type": "integer"}}}, '{"a": "s"}'),
]
NOT_ENFORCED = [  # refused by the check: xgrammar accepts the text breaking them, or fails to compile
    ({"type": "string", "format": "iri"}, '"\\u0001 x"'),
    ({"type": "number", "multipleOf": 0.5}, "0.3"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "[2]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    ({"type": "integer", "not": {"const": 1}}, "1"),
    ({"type": "integer", "if": {"minimum": 1}, "then": {"maximum": 3}}, "5"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "0"),
    ({"type": "string", "pattern": "^(?!b).$"}, '"b"'),
    ({"type": "string", "pattern": "^(?=a).$"}, '"b"'),
    ({"type": "object", "properties": {"a": {"$ref": "http://x/y.json"}}, "required": ["a"]}, '{"a": "s"}'),
    ({"type": "string", "pattern": "(?<=a)b"}, None),
    ({"type": "string", "pattern": r"\bx"}, None),
    ({"type": "object", "minProperties": 1}, None),
    ({"type": "string", "minLength": 5, "maxLength": 2}, None),
    ({"enum": []}, None),
]


def accepts(schema: dict, text: str) -> bool:
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), **JSON_FORMAT)
    return _is_grammar_accept_string(grammar, text)


@pytest.mark.parametrize("schema, breaking", ENFORCED, ids=lambda v: json.dumps(v)[:60])
def test_what_the_check_accepts_xgrammar_enforces(schema, breaking):
    assert unsupported_feature(schema) is None
    assert not accepts(schema, breaking)


@pytest.mark.parametrize("schema, breaking", NOT_ENFORCED, ids=lambda v: json.dumps(v)[:60])
def test_what_the_check_refuses_xgrammar_would_not_enforce(schema, breaking):
    assert unsupported_feature(schema) is not None
    if breaking is None:  # xgrammar refuses it when compiling (RuntimeError from C++)
        with pytest.raises(Exception):
            accepts(schema, '""')
    else:
        assert accepts(schema, breaking), "xgrammar enforces this now: allow it in the check"
