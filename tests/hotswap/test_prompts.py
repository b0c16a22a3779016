"""The `prompt` contract of /v1/completions (hotswap/prompts.py): the four OpenAI shapes, refusals
that name the index, and (hypothesis) that no input at all raises anything but a PromptError /
a pydantic ValidationError, which the API answers with a 400."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hotswap.openai_schemas import CompletionRequest, error_message
from hotswap.prompts import PromptError, bad_token_id, check_counts, is_nested, split_prompts

VOCAB = 100


@pytest.mark.parametrize("value, prompts", [
    ("hi", ["hi"]),
    ("", [""]),  # refused once tokenized (empty), like any text that encodes to nothing
    (["a"], ["a"]),
    (["a", "b", "c"], ["a", "b", "c"]),
    ([5], [[5]]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2]], [[1, 2]]),
    ([[1, 2], [3], [0, 0, 0]], [[1, 2], [3], [0, 0, 0]]),
])
def test_the_four_shapes(value, prompts):
    assert split_prompts(value) == prompts
    assert CompletionRequest.model_validate({"model": "m", "prompt": value}).prompts == prompts


@pytest.mark.parametrize("value, param", [
    ([], "prompt"),
    (None, "prompt"),
    (5, "prompt"),
    ({"a": 1}, "prompt"),
    ([[]], "prompt.0"),
    ([[1], []], "prompt.1"),
    ([1, -2], "prompt.1"),
    ([1, True], "prompt.1"),  # strict: true is not a token id
    ([True], "prompt.0"),
    ([1.0], "prompt.0"),
    ([1, 2.5], "prompt.1"),
    ([1, "a"], "prompt.1"),
    (["a", 1], "prompt.1"),
    (["a", ["b"]], "prompt.1"),
    ([[1], 2], "prompt.1"),
    ([[1], "x"], "prompt.1"),
    ([[1, 2], [3, -1]], "prompt.1.1"),
    ([[1, [2]]], "prompt.0.1"),
    ([[1], [2, None]], "prompt.1.1"),
    ([None], "prompt.0"),
    ([{}], "prompt.0"),
])
def test_bad_shapes_name_the_index(value, param):
    with pytest.raises(PromptError) as exc:
        split_prompts(value)
    assert exc.value.param == param and exc.value.message.startswith(param + ":")
    with pytest.raises(ValidationError) as verr:  # the request schema says the same
        CompletionRequest.model_validate({"model": "m", "prompt": value})
    assert error_message(verr.value) == (param, exc.value.message)


def test_messages_stay_short_whatever_the_garbage():
    with pytest.raises(PromptError) as exc:
        split_prompts([[1], [[2] * 10_000]])
    assert len(exc.value.message) < 200


@pytest.mark.parametrize("value, param", [
    ([1, 100], "prompt.1"),
    ([[1, 2], [3, 99, 100]], "prompt.1.2"),
    ([[1, 2], [10**30]], "prompt.1.0"),
    ([100], "prompt.0"),
])
def test_token_ids_outside_the_vocabulary(value, param):
    err = bad_token_id(value, VOCAB)
    assert err is not None and err.param == param and "vocabulary [0, 100)" in err.message


def test_token_ids_inside_the_vocabulary_and_text_pass():
    assert bad_token_id([0, 99], VOCAB) is None
    assert bad_token_id([[0], [99, 1]], VOCAB) is None
    assert bad_token_id(["a", "b"], VOCAB) is None and bad_token_id("a", VOCAB) is None
    assert bad_token_id([3, 200], VOCAB, "stop_token_ids").param == "stop_token_ids.1"
    assert is_nested([[1]]) and is_nested(["a"]) and not is_nested([1]) and not is_nested("a")


def test_counts_within_the_settings():
    check_counts(32, 8, max_prompts=32, max_n=8)
    with pytest.raises(PromptError) as exc:
        check_counts(33, 1, max_prompts=32, max_n=8)
    assert exc.value.param == "prompt" and "HOTSWAP_MAX_PROMPTS_PER_REQUEST" in exc.value.message
    with pytest.raises(PromptError) as exc:
        check_counts(1, 9, max_prompts=32, max_n=8)
    assert exc.value.param == "n" and "HOTSWAP_MAX_N" in exc.value.message


# -- properties ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=json_values)
def test_any_json_is_prompts_or_a_prompt_error(value):
    try:
        prompts = split_prompts(value)
    except PromptError as exc:
        assert exc.param.split(".")[0] == "prompt" and exc.message.startswith(exc.param)
        return
    assert prompts and all(isinstance(p, str) or (p and all(type(t) is int and t >= 0 for t in p)) for p in prompts)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_any_json_through_the_schema_is_valid_or_a_validation_error(value):
    try:
        req = CompletionRequest.model_validate({"model": "m", "prompt": value})
    except ValidationError as exc:
        param, message = error_message(exc)
        assert param and param.startswith("prompt") and message
        return
    assert req.prompts == split_prompts(value)
    err = bad_token_id(req.prompt, VOCAB)
    assert err is None or err.param.startswith("prompt.")


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, VOCAB * 2), min_size=1, max_size=6), min_size=1, max_size=6),
       max_prompts=st.integers(1, 8))
def test_lists_of_id_lists(prompts, max_prompts):
    """Nested ids come back unchanged; the vocabulary check finds exactly the first id out of range;
    more prompts than the setting allow are a PromptError naming `prompt`."""
    assert split_prompts(prompts) == prompts
    bad = [(i, j) for i, p in enumerate(prompts) for j, t in enumerate(p) if t >= VOCAB]
    err = bad_token_id(prompts, VOCAB)
    assert (err.param if err else None) == (f"prompt.{bad[0][0]}.{bad[0][1]}" if bad else None)
    if len(prompts) > max_prompts:
        with pytest.raises(PromptError, match="at most"):
            check_counts(len(prompts), 1, max_prompts=max_prompts, max_n=8)
    else:
        check_counts(len(prompts), 1, max_prompts=max_prompts, max_n=8)


def test_a_huge_list_beyond_the_setting():
    prompts = [[1, 2, 3]] * 10_000
    assert len(split_prompts(prompts)) == 10_000
    with pytest.raises(PromptError) as exc:
        check_counts(len(prompts), 1, max_prompts=32, max_n=8)
    assert "got 10000" in exc.value.message
