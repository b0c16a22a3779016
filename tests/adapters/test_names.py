"""adapters.names: the name rule and model references."""

from __future__ import annotations

import pytest

from adapters.names import NAME_RULE, format_ref, is_valid_name, parse_ref, validate_name, validate_tenant

VALID = ["a", "0", "my-adapter", "llama3.1-sql_v2", "a" * 63, "x.y", "9lives", "a-", "a_"]
INVALID = ["", "A", "Abc", "-a", ".a", "_a", "a..b", "..", "../x", "a/b", "x" * 64, "a b", "a@b", "a:b",
           "a\n", "caf\u00e9", "a\\b", "\u0661"]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert validate_name(name) == name
    assert validate_tenant(name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_state_the_rule(name):
    for fn, what in ((validate_name, "model name"), (validate_tenant, "tenant name")):
        with pytest.raises(ValueError) as exc_info:
            fn(name)
        msg = str(exc_info.value)
        assert what in msg and NAME_RULE in msg
    assert not is_valid_name(name)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_non_strings_refused(value):
    with pytest.raises(ValueError, match="must be a string"):
        validate_name(value)
    with pytest.raises(ValueError, match="must be a string"):
        parse_ref(value)


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("foo", ("foo", None)),
        ("foo@latest", ("foo", None)),
        ("foo@1", ("foo", 1)),
        ("foo@3", ("foo", 3)),
        ("foo@03", ("foo", 3)),
        ("my.adapter-v2@12", ("my.adapter-v2", 12)),
    ],
)
def test_parse_ref(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref,fragment",
    [
        ("foo@0", "positive integer"),
        ("foo@-1", "positive integer"),
        ("foo@", "positive integer"),
        ("foo@v2", "'v2'"),
        ("foo@1.5", "positive integer"),
        ("foo@LATEST", "'latest'"),
        ("foo@ 1", "positive integer"),
        ("foo@1@2", "positive integer"),
        ("foo@\u0661", "positive integer"),  # a non-ASCII digit
        ("@1", "invalid model name"),
        ("Foo@1", "invalid model name"),
        ("../x@1", "invalid model name"),
        ("", "invalid model name"),
    ],
)
def test_parse_ref_errors(ref, fragment):
    with pytest.raises(ValueError) as exc_info:
        parse_ref(ref)
    assert fragment in str(exc_info.value)


def test_format_ref_roundtrip():
    assert format_ref("foo") == "foo"
    assert format_ref("foo", 7) == "foo@7"
    assert parse_ref(format_ref("foo", 7)) == ("foo", 7)
