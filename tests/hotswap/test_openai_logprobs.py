"""Log-probabilities through the OpenAI schemas: which bodies ask for what (chat's logprobs /
top_logprobs, completions' logprobs / echo / max_tokens 0), and the response shapes built from what
workers report (hotswap/openai_logprobs.py), checked against the official `openai` package's types.
Pure: the real demo tokenizer, no Redis, no model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hotswap.openai_logprobs import (
    MissingLogprobs,
    answer,
    chat_logprobs,
    completion_logprobs,
    needs_tokenizer,
)
from hotswap.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    completion_choices,
    error_message,
    to_sampling,
)
from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec, TokenEvent
from tests.hotswap.test_openai_schemas import chat, comp, no_extras, refused

# -- requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, logprobs", [
    ({}, None),
    ({"logprobs": False}, None),
    ({"logprobs": None, "top_logprobs": None}, None),
    ({"logprobs": False, "top_logprobs": 0}, None),  # asks for nothing: accepted, as before
    ({"top_logprobs": 0}, None),
    ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 0}, 0),
    ({"logprobs": True, "top_logprobs": 5}, 5),
    ({"logprobs": True, "top_logprobs": 20}, 20),
])
def test_chat_logprobs_reach_the_sampling_spec(extra, logprobs):
    got = to_sampling(ChatCompletionRequest.model_validate(chat(**extra)))
    assert (got["logprobs"], got["prompt_logprobs"]) == (logprobs, None)
    SamplingSpec(**{**got, "max_tokens": 4})


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 3}, "top_logprobs"),  # OpenAI: top_logprobs needs logprobs: true
    ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),  # strict: no floats for counts
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),  # chat's logprobs is a bool
    ({"logprobs": "true"}, "logprobs"),
    ({"echo": True}, "echo"),  # a completions parameter: unknown here
])
def test_chat_logprobs_refusals_name_the_field(extra, param):
    got, message = refused(ChatCompletionRequest, chat(**extra))
    assert got == param and param in message


def test_top_logprobs_without_logprobs_says_what_to_do():
    assert refused(ChatCompletionRequest, chat(top_logprobs=3)) == ("top_logprobs",
                                                                    "top_logprobs: requires logprobs: true")


@pytest.mark.parametrize("extra, logprobs, prompt_logprobs", [
    ({}, None, None),
    ({"logprobs": None, "echo": False}, None, None),
    ({"logprobs": 0}, 0, None),
    ({"logprobs": 5}, 5, None),
    ({"echo": True}, None, None),  # the prompt's text, no logprobs
    ({"echo": True, "logprobs": 1}, 1, 1),
    ({"echo": True, "logprobs": 0, "max_tokens": 0}, 0, 0),  # scoring the prompt alone
    ({"echo": True, "max_tokens": 0}, None, None),
])
def test_completion_logprobs_and_echo_reach_the_sampling_spec(extra, logprobs, prompt_logprobs):
    req = CompletionRequest.model_validate(comp(**extra))
    got = to_sampling(req)
    assert (got["logprobs"], got["prompt_logprobs"]) == (logprobs, prompt_logprobs)
    SamplingSpec(**{**got, "max_tokens": got["max_tokens"] if got["max_tokens"] is not None else 16})


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 6}, "logprobs"),  # OpenAI's legacy limit
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),  # completions' logprobs is a count
    ({"logprobs": 1.0}, "logprobs"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
    ({"max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),  # a chat parameter: unknown here
])
def test_completion_logprobs_refusals_name_the_field(extra, param):
    got, message = refused(CompletionRequest, comp(**extra))
    assert got == param and param in message


hostile = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
           | st.text(max_size=5) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                                                                                         st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["chat", "completion"]),
       extra=st.fixed_dictionaries({}, optional={"logprobs": hostile, "top_logprobs": hostile, "echo": hostile,
                                                 "max_tokens": hostile, "stream": st.booleans()}))
def test_any_logprobs_values_validate_into_a_valid_spec_or_refuse_by_name(kind, extra):
    """Whatever JSON a client sends in these fields: a ValidationError naming a field it sent, or a
    request whose sampling spec is within the engine's limits (never another exception)."""
    model, body = (ChatCompletionRequest, chat(**extra)) if kind == "chat" else (CompletionRequest, comp(**extra))
    try:
        req = model.model_validate(json.loads(json.dumps(body)))
    except ValidationError as exc:
        param, message = error_message(exc)
        assert param.split(".")[0] in extra and message
        return
    got = to_sampling(req)
    spec = SamplingSpec(**{**got, "max_tokens": 16 if got["max_tokens"] is None else got["max_tokens"]})
    assert spec.logprobs is None or 0 <= spec.logprobs <= (20 if kind == "chat" else 5)
    assert spec.prompt_logprobs is None or (kind == "completion" and req.echo and spec.prompt_logprobs == spec.logprobs)
    assert spec.max_tokens > 0 or (kind == "completion" and req.echo)


def test_old_specs_parse_and_new_fields_round_trip_as_exact_floats():
    old = SamplingSpec.model_validate({"max_tokens": 4})
    assert (old.logprobs, old.prompt_logprobs) == (None, None)
    entry = (5, -0.123456789012345, [(5, -0.123456789012345), (7, -2.5)])
    result = GenerationResult(id="r", status="completed", token_ids=[5], logprobs=[entry],
                              prompt_logprobs=[None, (3, -1e-9, [])])
    back = GenerationResult.model_validate_json(result.model_dump_json())
    assert back.logprobs == [entry] and back.prompt_logprobs == [None, (3, -1e-9, [])]
    event = TokenEvent(attempt=1, offset=0, text="x", token_ids=[5], logprobs=[entry], token_offset=3)
    assert TokenEvent.model_validate_json(event.model_dump_json()) == event
    plain = TokenEvent(attempt=1, offset=0, text="x", token_ids=[5])
    assert json.loads(plain.model_dump_json(exclude_defaults=True)) == {"attempt": 1, "offset": 0, "text": "x",
                                                                       "token_ids": [5]}


# -- responses --------------------------------------------------------------------------------------

def make_req(ids: list[int], *, logprobs=None, prompt_logprobs=None, echo=False, max_tokens=4) -> GenerationRequest:
    return GenerationRequest(tenant="t", base_model="b", model="b", target=ModelTarget(kind="base"),
                             prompt_token_ids=ids, echo=echo,
                             sampling=SamplingSpec(max_tokens=max_tokens, logprobs=logprobs,
                                                   prompt_logprobs=prompt_logprobs))


def entry(token: int, value: float, *top: tuple[int, float]):
    return token, value, list(top)


def test_chat_logprobs_shape(demo_tokenizer):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    ids = demo_tokenizer.encode(" Paris字")
    entries = [entry(ids[0], -0.25, (ids[0], -0.25), (11, -2.0)), entry(ids[1], -3.5, (9, -0.1), (ids[1], -3.5))]
    body = chat_completion("c", "b", 1, " Paris字", "stop", 4, 2, logprobs=chat_logprobs(entries, demo_tokenizer))
    parsed = ChatCompletion.model_validate(body)
    no_extras(parsed)
    content = parsed.choices[0].logprobs.content
    assert [c.token for c in content] == [" Paris", "字"] and parsed.choices[0].logprobs.refusal is None
    assert content[1].bytes == list("字".encode()) and content[1].logprob == -3.5
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [(" Paris", -0.25),
                                                                       (demo_tokenizer.token_text(11), -2.0)]
    assert content[0].top_logprobs[0].bytes == list(b" Paris")
    chunk = ChatCompletionChunk.model_validate(chat_chunk("c", "b", 1, delta_text=" Paris",
                                                          logprobs=chat_logprobs(entries[:1], demo_tokenizer)))
    no_extras(chunk)
    assert chunk.choices[0].logprobs.content[0].token == " Paris"
    assert chat_completion("c", "b", 1, "x", "stop", 1, 1)["choices"][0]["logprobs"] is None


def test_legacy_logprobs_shape_with_echo(demo_tokenizer):
    """The prompt's tokens first (the first one null), then the generated ones; each top dict holds
    the chosen token (the very same float) and the k best; text_offset follows the token strings."""
    from openai._models import construct_type
    from openai.types import Completion

    prompt = demo_tokenizer.encode("Hello world")  # ["Hello", " world"]
    positions = [(prompt[0], None), (prompt[1], entry(prompt[1], -4.0, (13, -1.0))),
                 (13, entry(13, -1.0, (13, -1.0)))]
    body = completion_choices("c", "b", 1, [("Hello world.", "length")], 2, 1,
                              logprobs=[completion_logprobs(positions, demo_tokenizer)])
    # The openai types say float where OpenAI's own echo sends null (the first prompt token), so
    # they are checked without the null position; the client itself builds responses leniently.
    strict = json.loads(json.dumps(body))
    logprobs = strict["choices"][0]["logprobs"]
    logprobs["token_logprobs"][0], logprobs["top_logprobs"][0] = -1.0, {}
    Completion.model_validate(strict)
    parsed = construct_type(type_=Completion, value=body)
    no_extras(parsed)
    lp = parsed.choices[0].logprobs
    dot = demo_tokenizer.token_text(13)
    assert lp.tokens == ["Hello", " world", dot]
    assert lp.token_logprobs == [None, -4.0, -1.0]
    assert lp.top_logprobs == [None, {" world": -4.0, dot: -1.0}, {dot: -1.0}]
    assert lp.text_offset == [0, 5, 11]
    # lm-evaluation-harness: token_logprobs[i] == max(top_logprobs[i].values()) iff the token is the best
    assert [t == max(top.values()) for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])] == [False, True]


def test_legacy_top_dict_keeps_the_later_of_two_tokens_with_one_string(demo_tokenizer):
    """Two ids that decode alone to one string (here U+FFFD, parts of a character): the dict is
    built in the order [chosen, best, ...] and the later one wins, as in vLLM."""
    a, b = [i for i in range(demo_tokenizer.vocab_size) if demo_tokenizer.token_text(i) == "\ufffd"][:2]
    body = completion_logprobs([(a, entry(a, -3.0, (b, -0.5), (a, -3.0)))], demo_tokenizer, text_offset=7)
    assert body["top_logprobs"] == [{"\ufffd": -3.0}]  # chosen -3, best -0.5, then a (-3) again: the last wins
    assert body["tokens"] == ["\ufffd"] and body["text_offset"] == [7]
    body = completion_logprobs([(a, entry(a, -3.0, (b, -0.5)))], demo_tokenizer)
    assert body["top_logprobs"] == [{"\ufffd": -0.5}]


def test_answer_per_kind(demo_tokenizer):
    prompt = demo_tokenizer.encode("Hello world")
    out = [13, 2]
    gen = [entry(13, -1.0, (13, -1.0)), entry(2, -0.5, (2, -0.5))]
    result = GenerationResult(id="r", status="completed", text=".", token_ids=out, finish_reason="stop",
                              logprobs=gen, prompt_logprobs=[None, entry(prompt[1], -4.0, (5, -1.0))])
    plain = answer("completion", make_req(prompt), result, None)  # no tokenizer needed without logprobs or echo
    assert (plain.text, plain.finish_reason, plain.logprobs) == (".", "stop", None)
    assert not needs_tokenizer(make_req(prompt))

    chat = answer("chat", make_req(prompt, logprobs=1), result, demo_tokenizer)
    assert [c["token"] for c in chat.logprobs["content"]] == [demo_tokenizer.token_text(13), "<|im_end|>"]

    echo = answer("completion", make_req(prompt, logprobs=1, prompt_logprobs=1, echo=True), result, demo_tokenizer)
    assert echo.text == "Hello world."
    assert echo.logprobs["token_logprobs"] == [None, -4.0, -1.0, -0.5]
    assert echo.logprobs["tokens"][-1] == "<|im_end|>"  # every generated token, EOS too (it is counted)

    echo_only = answer("completion", make_req(prompt, echo=True), result, demo_tokenizer)
    assert echo_only.text == "Hello world." and echo_only.logprobs is None

    scored = GenerationResult(id="r", status="completed", finish_reason="length", logprobs=[],
                              prompt_logprobs=result.prompt_logprobs)  # max_tokens 0: what the worker reports
    got = answer("completion", make_req(prompt, logprobs=0, prompt_logprobs=0, echo=True, max_tokens=0), scored,
                 demo_tokenizer)
    assert (got.text, got.finish_reason, got.logprobs["token_logprobs"]) == ("Hello world", "length", [None, -4.0])


def test_answer_refuses_a_result_without_the_logprobs_it_asked_for(demo_tokenizer):
    """A worker older than the API ignores the new fields: the answer says so instead of null."""
    prompt = demo_tokenizer.encode("Hello world")
    bare = GenerationResult(id="r", status="completed", text=".", token_ids=[13], finish_reason="length")
    with pytest.raises(MissingLogprobs):
        answer("chat", make_req(prompt, logprobs=0), bare, demo_tokenizer)
    with pytest.raises(MissingLogprobs):
        answer("completion", make_req(prompt, logprobs=0, prompt_logprobs=0, echo=True),
               bare.model_copy(update={"logprobs": [entry(13, -1.0)]}), demo_tokenizer)
