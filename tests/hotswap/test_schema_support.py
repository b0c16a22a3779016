"""The API's check of JSON Schemas: what the engine can enforce passes, the rest is named with its path."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.schema_support import regex_problem, unsupported_feature
from scripts.benchkit.json_schemas import random_schema

OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("schema", [
    OBJ,
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "minItems": 1, "maxItems": 3}}, "additionalProperties": False},
    {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"oneOf": [{"const": "a"}, {"const": "b"}]},
    {"type": ["string", "null"], "title": "t", "description": "d", "examples": ["x"], "default": None},
    {"type": "object", "properties": {"n": {"$ref": "#/$defs/node"}}, "$defs": {"node": {"type": "integer"}}},
    {"type": "object", "properties": {"child": {"$ref": "#"}}},
    {"allOf": [{"$ref": "#/definitions/x"}], "definitions": {"x": {"type": "integer", "multipleOf": 3}}},
    {"type": "string", "format": "date-time"},
    {"type": "string", "pattern": r"^[A-Z]\d{3}(?:-[a-z]+)?$"},
    {"type": "string", "pattern": r"^a\\b$"},  # an escaped backslash then "b": not a word boundary
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
    {"type": "object", "patternProperties": {"^x_": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}},
    {"type": "object", "minProperties": 1, "maxProperties": 2, "additionalProperties": {"type": "string"}},
    {"type": "number", "minimum": 0.5, "maximum": 0.5},
    {"type": "string", "discriminator": {"propertyName": "kind"}, "$schema": "x", "$comment": "c"},
])
def test_enforceable_schemas_pass(schema):
    assert unsupported_feature(schema) is None


@pytest.mark.parametrize("schema, where, words", [
    ({"type": "integer", "not": {"const": 1}}, "", "`not` is not supported"),
    ({"type": "object", "properties": {"a": {"if": {"minimum": 1}, "then": {"maximum": 3}}}}, "properties.a", "`if`"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "", "uniqueItems: false"),
    ({"type": "array", "contains": {"const": 1}}, "", "`contains`"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "", "`dependentRequired`"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "", "more than one schema"),
    ({"type": "number", "multipleOf": 0.5}, "", "positive integer"),
    ({"type": "string", "format": "iri"}, "", "format 'iri' is not supported"),
    ({"type": "string", "nullable": True}, "", '"null"'),
    ({"type": "string", "x-hint": 1}, "", "unknown keyword `x-hint`"),
    ({"type": "strin"}, "", "unknown type 'strin'"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "", "nothing can match"),
    ({"type": "integer", "minimum": 3, "maximum": 1}, "", "nothing can match"),
    ({"enum": []}, "", "non-empty"),
    ({"type": "object", "minProperties": 1}, "", "additionalProperties"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "properties.a", "does not point"),
    ({"$ref": "https://example.com/s.json"}, "", "only local refs"),
    ({"type": "object", "properties": {"a": {"items": [{"type": "integer"}]}}}, "properties.a.items",
     "object or a boolean"),
    ({"anyOf": [{"type": "string"}, {"type": "string", "pattern": r"(?<=a)b"}]}, "anyOf.1", "lookbehind"),
    ({"type": "object", "patternProperties": {r"^\p{L}+$": {"type": "integer"}}}, "", "Unicode property"),
    ({"type": "object", "propertyNames": {"pattern": r"(a)\1"}}, "", "backreferences"),
    ({"type": "string", "pattern": r"^(?!x).*$"}, "", "lookahead"),
    ({"type": "string", "pattern": r"\bword\b"}, "", "word boundaries"),
    ({"$defs": {"d": {"type": "string", "format": "bogus"}}}, "$defs.d", "format 'bogus'"),
    ({"required": "a"}, "", "`required` must be an array"),
    ({"type": "string", "maxLength": -1}, "", "non-negative integer"),
    ({"type": "integer", "minimum": "1"}, "", "must be a number"),
])
def test_what_cannot_be_enforced_is_named_with_its_path(schema, where, words):
    problem = unsupported_feature(schema)
    assert problem is not None
    assert problem[0] == where and words in problem[1], problem


def test_the_benchmark_and_test_schemas_are_all_enforceable():
    rng = random.Random(0)
    for _ in range(200):
        schema = random_schema(rng)
        assert unsupported_feature(schema) is None, json.dumps(schema)


def test_deep_nesting_is_walked_without_recursion():
    schema: dict = {"type": "integer"}
    for _ in range(20_000):
        schema = {"type": "array", "items": schema}
    assert unsupported_feature(schema) is None
    schema["items"]["items"]["not"] = {}
    assert unsupported_feature(schema) == ("items.items", "`not` is not supported: the engine cannot enforce it "
                                                          "(rewrite it with enum, anyOf or bounds)")


@pytest.mark.parametrize("pattern, problem", [
    (r"^\d+$", None), (r"[\b]", r"word boundaries (\b)"), (r"\\1", None), (r"(?=a)a", "lookahead"),
    (r"(?<!a)b", "lookbehind"), (r"\k<x>", r"named backreferences (\k<...>)"), ("[[:digit:]]", "POSIX character classes"),
])
def test_regex_features(pattern, problem):
    assert regex_problem(pattern) == problem


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "anyOf", "allOf", "enum", "required", "minimum", "maximum",
                         "minLength", "maxLength", "pattern", "format", "$ref", "$defs", "not", "x", "prefixItems",
                         "additionalProperties", "patternProperties", "propertyNames", "multipleOf", "const"])
        | st.text(max_size=6), children, max_size=5),
    max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_any_json_gets_an_answer_never_an_exception(schema):
    """Whatever JSON a caller sends as a schema, the check answers None or (where, what) and never
    raises: a TypeError here would be a 500."""
    result = unsupported_feature(schema)
    assert result is None or (isinstance(result[0], str) and isinstance(result[1], str) and result[1])
