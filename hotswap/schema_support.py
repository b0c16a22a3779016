"""Which JSON Schemas the engine can enforce: the API's check before a request is queued.

The worker's grammar engine (xgrammar 0.2.9, worker/engine/grammar.py) refuses some schemas when it
compiles them, but silently ignores other keywords: `not`, `if`, `uniqueItems`, a second entry of
`allOf`, an unknown `format`... An output could then break the schema the caller asked for. This
check knows the subset it enforces (measured keyword by keyword: tests/worker/engine/
test_schema_support_vs_xgrammar.py) and names the first thing outside it, so the API answers 400
before queueing. It also catches the contradictions xgrammar refuses at compile time (minLength above
maxLength, an empty enum, a $ref to nothing), so a typical mistake is a 400 here too; anything else
xgrammar refuses still fails the request in the worker with a 400 naming the cause.

Torch-free and dependency-free: the API process runs it.

    unsupported_feature(schema)   # None, or ("properties.age", "`not` is not supported: ...")
"""

from __future__ import annotations

import re
from typing import Any

# Keywords that describe a schema without constraining it: accepted, no effect on the output.
ANNOTATIONS = frozenset({
    "title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "contentSchema", "discriminator",
})
# Keywords the grammar enforces (with the limits checked below).
ENFORCED = frozenset({
    "type", "enum", "const", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "unevaluatedProperties",
    "items", "prefixItems", "minItems", "maxItems", "unevaluatedItems",
    "anyOf", "oneOf", "allOf",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
# Keywords the grammar would ignore, with what to do instead.
NOT_ENFORCED = {
    "not": "rewrite it with enum, anyOf or bounds",
    "if": "conditional schemas cannot be enforced; use anyOf of the cases",
    "then": "conditional schemas cannot be enforced; use anyOf of the cases",
    "else": "conditional schemas cannot be enforced; use anyOf of the cases",
    "contains": "list the item types in items or prefixItems",
    "minContains": "list the item types in items or prefixItems",
    "maxContains": "list the item types in items or prefixItems",
    "uniqueItems": "only uniqueItems: false can be enforced",
    "dependentRequired": "make the fields required, or use anyOf of the two shapes",
    "dependentSchemas": "use anyOf of the shapes",
    "dependencies": "use anyOf of the shapes",
    "nullable": 'use "type": [..., "null"] or anyOf with {"type": "null"}',
    "$dynamicRef": "use $ref", "$recursiveRef": "use $ref", "$anchor": "use $ref with a JSON pointer",
}
FORMATS = frozenset({
    "date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
    "uri-template", "uuid", "json-pointer", "relative-json-pointer",
})
TYPES = frozenset({"null", "boolean", "object", "array", "number", "string", "integer"})

# Keywords whose value is a schema / a list of schemas / a map of name -> schema.
_ONE_SCHEMA = ("items", "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions")
_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
           ("minimum", "maximum"))

# Regular-expression features the grammar's regex converter refuses or ignores (lookahead is ignored:
# the output could break what it asserts). An escape pair is read as one unit.
_REGEX_UNITS = re.compile(r"\\.|\(\?<[=!]|\(\?[=!]|\[\[:|.", re.DOTALL)
_REGEX_REFUSED = {
    "(?<=": "lookbehind", "(?<!": "lookbehind", "(?=": "lookahead", "(?!": "lookahead", "[[:": "POSIX character classes",
    r"\b": r"word boundaries (\b)", r"\B": r"word boundaries (\B)", r"\p": r"Unicode property classes (\p{...})",
    r"\P": r"Unicode property classes (\P{...})", r"\k": r"named backreferences (\k<...>)",
    **{f"\\{d}": f"backreferences (\\{d})" for d in "123456789"},
}


def unsupported_feature(schema: Any) -> tuple[str, str] | None:
    """The first thing in `schema` the engine cannot enforce, as (where, what): `where` is the path of
    the sub-schema ("" for the top, "properties.age.items"); None when the whole schema can be
    enforced. Iterative, so deep nesting cannot overflow."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        where, node = stack.pop()
        problem = _node_problem(node, schema)
        if problem:
            return where, problem
        if isinstance(node, dict):
            stack += reversed(list(_children(where, node)))
    return None


def _children(where: str, node: dict):
    def at(*parts: Any) -> str:
        return ".".join([where, *map(str, parts)]) if where else ".".join(map(str, parts))

    for key in _ONE_SCHEMA:
        if key in node:
            yield at(key), node[key]
    for key in _SCHEMA_LIST:
        for i, child in enumerate(node.get(key) or []):
            yield at(key, i), child
    for key in _SCHEMA_MAP:
        for name, child in (node.get(key) or {}).items():
            yield at(key, name), child


def _node_problem(node: Any, root: dict) -> str | None:
    if isinstance(node, bool):  # true / false schemas
        return None
    if not isinstance(node, dict):
        return f"a schema must be an object or a boolean, got {type(node).__name__}"
    for key in node:
        if key in NOT_ENFORCED:
            if key == "uniqueItems" and node[key] is False:
                continue
            return f"`{key}` is not supported: the engine cannot enforce it ({NOT_ENFORCED[key]})"
        if key not in ENFORCED and key not in ANNOTATIONS:
            return f"unknown keyword `{key}`: the engine would ignore it (remove it, or put notes in description)"
    return _shape_problem(node) or _value_problem(node, root)


def _shape_problem(node: dict) -> str | None:
    """Keyword values of the wrong JSON type (a schema the engine would misread)."""
    for key in _SCHEMA_LIST:
        if key in node and (not isinstance(node[key], list) or not node[key]):
            return f"`{key}` must be a non-empty array of schemas"
    for key in (*_SCHEMA_MAP, "dependentRequired"):
        if key in node and not isinstance(node[key], dict):
            return f"`{key}` must be an object"
    if "required" in node and not (isinstance(node["required"], list) and all(isinstance(r, str) for r in node["required"])):
        return "`required` must be an array of property names"
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        return "`enum` must be a non-empty array"
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in node and (type(node[key]) is not int or node[key] < 0):
            return f"`{key}` must be a non-negative integer"
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if key in node and type(node[key]) not in (int, float):
            return f"`{key}` must be a number"
    for key in ("pattern", "format", "$ref"):
        if key in node and not isinstance(node[key], str):
            return f"`{key}` must be a string"
    return None


def _value_problem(node: dict, root: dict) -> str | None:
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if types is not None:
        if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
            return "`type` must be a type name or a non-empty array of them"
        unknown = [t for t in types if t not in TYPES]
        if unknown:
            return f"unknown type {unknown[0]!r} (one of {', '.join(sorted(TYPES))})"
    if len(node.get("allOf") or []) > 1:
        return "`allOf` with more than one schema is not supported: the engine enforces only one (merge them)"
    if "multipleOf" in node:
        if types != ["integer"] or type(node["multipleOf"]) is not int or node["multipleOf"] <= 0:
            return "`multipleOf` is supported only as a positive integer on {\"type\": \"integer\"}"
    if "format" in node and node["format"] not in FORMATS:
        return f"format {node['format']!r} is not supported (one of {', '.join(sorted(FORMATS))})"
    for low, high in _BOUNDS:
        if low in node and high in node and node[low] > node[high]:
            return f"`{low}` ({node[low]}) is greater than `{high}` ({node[high]}): nothing can match"
    minimum = node.get("minProperties", 0)
    if minimum > len(node.get("properties") or {}) and node.get("additionalProperties", False) is False \
            and "patternProperties" not in node:
        return (f"`minProperties` ({minimum}) needs more properties than the object may have: outputs "
                "hold only the listed properties unless additionalProperties allows more")
    if "$ref" in node and not _resolves(node["$ref"], root):
        return f"$ref {node['$ref']!r} does not point into this schema (only local refs like #/$defs/name)"
    for pattern in _patterns(node):
        problem = regex_problem(pattern)
        if problem:
            return f"pattern {pattern!r}: {problem} is not supported"
    return None


def _patterns(node: dict) -> list[str]:
    patterns = [node["pattern"]] if "pattern" in node else []
    patterns += list(node.get("patternProperties") or {})
    names = node.get("propertyNames")
    if isinstance(names, dict) and isinstance(names.get("pattern"), str):
        patterns.append(names["pattern"])
    return patterns


def regex_problem(pattern: str) -> str | None:
    """The first regular-expression feature of `pattern` the engine cannot enforce, or None."""
    for unit in _REGEX_UNITS.findall(pattern):
        if unit in _REGEX_REFUSED:
            return _REGEX_REFUSED[unit]
    return None


def _resolves(ref: str, root: dict) -> bool:
    """A local JSON pointer ("#" or "#/a/b", with ~0 / ~1 escapes) that names a schema in root."""
    if ref == "#":
        return True
    if not ref.startswith("#/"):
        return False
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, (dict, bool))
