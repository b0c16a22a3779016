"""OpenAI request bodies: what is accepted, what is refused by name, defaults; response shapes
checked against the official `openai` package's own types."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hotswap.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_choices,
    chat_chunk,
    chat_completion,
    completion,
    completion_choices,
    completion_chunk,
    error_message,
    new_id,
    to_sampling,
    unsupported_params,
    usage_chunk,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def chat(**extra) -> dict:
    return {"model": "base", "messages": MESSAGES, **extra}


def comp(**extra) -> dict:
    return {"model": "base", "prompt": "Once upon a time", **extra}


def refused(model, body) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return error_message(info.value)


@pytest.mark.parametrize("extra", [
    {},
    {"max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n"},
    {"max_completion_tokens": 9, "temperature": 2, "top_p": 1},
    {"max_tokens": 9, "max_completion_tokens": 9},
    {"stop": ["a", "b", "c", "d"], "user": "u-1", "seed": None},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "logit_bias": {}},
    {"n": 8, "frequency_penalty": 2, "presence_penalty": -2.0, "repetition_penalty": 1.3, "min_tokens": 2,
     "stop_token_ids": [2, 0], "max_tokens": 2},
    {"n": None, "frequency_penalty": None, "repetition_penalty": None, "min_tokens": None, "stop_token_ids": None},
    {"response_format": {"type": "text"}, "tools": None, "tool_choice": None, "top_logprobs": None},
    {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y", "name": "bob"},
                  {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
])
def test_chat_accepts(extra):
    req = ChatCompletionRequest.model_validate(chat(**extra))
    assert req.model == "base"
    # The harmless extras are dropped, never carried along.
    assert not {"tools"} & set(req.model_dump())


@pytest.mark.parametrize("extra, names", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"]),
    ({"tools": [{"type": "function"}], "logit_bias": {"50256": -100}}, ["tools", "logit_bias"]),
    ({"functions": [{"name": "f"}]}, ["functions"]),
    ({"tool_choice": "auto"}, ["tool_choice"]),
    ({"best_of": 3}, ["best_of"]),
    ({"modalities": ["text", "audio"]}, ["modalities"]),
    ({"prompt": "x"}, ["prompt"]),  # a completions field is unknown here
    ({"temprature": 0.5}, ["temprature"]),
    ({"foo": 1, "tools": [{}], "bar": None}, ["foo", "tools", "bar"]),
])
def test_chat_refuses_by_name(extra, names):
    body = chat(**extra)
    assert unsupported_params(body, "chat") == names
    param, message = refused(ChatCompletionRequest, body)
    assert message.startswith("unsupported parameter(s): " + ", ".join(names))
    assert param == names[0]


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),  # strict: no strings for numbers
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": True}, "n"),  # strict: true is not 1
    ({"n": 2.0}, "n"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
    ({"min_tokens": 6, "max_completion_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids.1"),
    ({"stop_token_ids": [True]}, "stop_token_ids.0"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages.0.content"),
])
def test_chat_invalid_values_name_the_field(extra, param):
    got, message = refused(ChatCompletionRequest, chat(**extra))
    assert got.startswith(param) and message.startswith(param)


def test_chat_cross_field_rules():
    _, message = refused(ChatCompletionRequest, chat(stream_options={"include_usage": True}))
    assert "stream_options" in message
    _, message = refused(ChatCompletionRequest, chat(max_tokens=5, max_completion_tokens=6))
    assert "max_tokens" in message and "max_completion_tokens" in message
    _, message = refused(ChatCompletionRequest, chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]))
    assert "input_audio" in message


def test_image_parts_message():
    _, message = refused(ChatCompletionRequest, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "u"}}]}]))
    assert message == "messages.0.content: only text content parts are supported, got 'image_url'"


def test_message_text_joins_parts():
    req = ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert req.messages[0].text == "a\nb"
    assert ChatCompletionRequest.model_validate(chat()).messages[1].text == "Hi"


@pytest.mark.parametrize("prompt, expected", [
    ("hello", ["hello"]),
    (["hello"], ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompts(prompt, expected):
    req = CompletionRequest.model_validate(comp(prompt=prompt))
    assert req.prompt == prompt and req.prompts == expected  # ids are kept exactly as sent


@pytest.mark.parametrize("prompt", [[], [1, -2], [[1, 2], []], [[1], "a"], None, 5, [1.5]])
def test_completion_bad_prompts(prompt):
    param, message = refused(CompletionRequest, comp(prompt=prompt))
    assert param.startswith("prompt") and message.startswith("prompt")


@pytest.mark.parametrize("extra", [
    {"echo": False, "suffix": None, "logprobs": None, "best_of": 1, "n": 1},
    {"max_tokens": 3, "stop": ["x"], "stream": True, "stream_options": {"include_usage": False}},
])
def test_completion_accepts(extra):
    CompletionRequest.model_validate(comp(**extra))


@pytest.mark.parametrize("extra, names", [
    ({"suffix": "end"}, ["suffix"]),
    ({"logprobs": 5, "best_of": 2}, ["best_of"]),
    ({"messages": MESSAGES}, ["messages"]),
    ({"max_completion_tokens": 5}, ["max_completion_tokens"]),
])
def test_completion_refuses_by_name(extra, names):
    param, message = refused(CompletionRequest, comp(**extra))
    assert message.startswith("unsupported parameter(s): " + ", ".join(names)) and param == names[0]


def test_to_sampling_defaults():
    off = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
           "stop_token_ids": [], "guided": None, "logprobs": None, "prompt_logprobs": None}
    assert to_sampling(ChatCompletionRequest.model_validate(chat())) == {
        "max_tokens": None, "temperature": 1.0, "top_p": 1.0, "seed": None, "stop": [], **off}
    assert to_sampling(CompletionRequest.model_validate(comp(stop="\n", temperature=0, seed=3))) == {
        "max_tokens": None, "temperature": 0.0, "top_p": 1.0, "seed": 3, "stop": ["\n"], **off}


def test_to_sampling_output_controls():
    """Penalties and vLLM's extras reach the sampling spec as sent; n stays out (it is a fan-out)."""
    from hotswap.protocol import SamplingSpec

    req = ChatCompletionRequest.model_validate(chat(n=3, presence_penalty=0.5, frequency_penalty=-1,
                                                    repetition_penalty=1.2, min_tokens=3, stop_token_ids=[7, 9]))
    got = to_sampling(req)
    assert (got["presence_penalty"], got["frequency_penalty"], got["repetition_penalty"], got["min_tokens"],
            got["stop_token_ids"]) == (0.5, -1.0, 1.2, 3, [7, 9])
    assert "n" not in got and req.choices_per_prompt == 3
    assert ChatCompletionRequest.model_validate(chat()).choices_per_prompt == 1
    # A request written before these fields existed still parses, with every control off.
    old = SamplingSpec.model_validate({"max_tokens": 4, "temperature": 0.5, "top_p": 1.0, "top_k": 0, "seed": None,
                                       "stop": [], "ignore_eos": False})
    assert (old.presence_penalty, old.frequency_penalty, old.repetition_penalty, old.min_tokens,
            old.stop_token_ids) == (0.0, 0.0, 1.0, 0, [])


def test_to_sampling_token_limits():
    assert to_sampling(ChatCompletionRequest.model_validate(chat(max_tokens=7)))["max_tokens"] == 7
    assert to_sampling(ChatCompletionRequest.model_validate(chat(max_completion_tokens=8)))["max_tokens"] == 8
    assert to_sampling(ChatCompletionRequest.model_validate(chat(stop=[])))["stop"] == []


# ---------------------------------------------------------------------------------------------
# Responses, parsed by the official client's types


def no_extras(obj) -> None:
    """Every key we send is one the openai types know (they keep unknown keys in model_extra)."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        assert not obj.model_extra, f"{type(obj).__name__} got unknown keys {obj.model_extra}"
        for name in type(obj).model_fields:
            no_extras(getattr(obj, name))
    elif isinstance(obj, list):
        for item in obj:
            no_extras(item)


def test_chat_completion_shape():
    from openai.types.chat import ChatCompletion

    body = chat_completion("chatcmpl-1", "base", 1700000000, "Paris.", "stop", 12, 3)
    parsed = ChatCompletion.model_validate(body)
    no_extras(parsed)
    assert parsed.object == "chat.completion" and parsed.system_fingerprint is None
    assert parsed.choices[0].message.content == "Paris." and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (12, 3, 15)


def test_cached_tokens_in_every_usage():
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 by default, the count when given."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chat = ChatCompletion.model_validate(chat_completion("c", "base", 1, "x", "stop", 40, 2, cached_tokens=32))
    text = Completion.model_validate(completion("c", "base", 1, "x", "stop", 40, 2, cached_tokens=16))
    tail = ChatCompletionChunk.model_validate(usage_chunk("c", "base", 1, 40, 2, cached_tokens=48))
    plain = ChatCompletion.model_validate(chat_completion("c", "base", 1, "x", "stop", 40, 2))
    for parsed in (chat, text, tail, plain):
        no_extras(parsed)
    assert [p.usage.prompt_tokens_details.cached_tokens for p in (chat, text, tail, plain)] == [32, 16, 48, 0]


def test_chat_chunks_shape():
    from openai.types.chat import ChatCompletionChunk

    first = ChatCompletionChunk.model_validate(chat_chunk("c", "base", 1, role="assistant", delta_text=""))
    middle = ChatCompletionChunk.model_validate(chat_chunk("c", "base", 1, delta_text="Hel"))
    last = ChatCompletionChunk.model_validate(chat_chunk("c", "base", 1, finish_reason="length"))
    for chunk in (first, middle, last):
        no_extras(chunk)
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert middle.choices[0].delta.content == "Hel" and middle.choices[0].delta.role is None
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    assert "usage" not in chat_chunk("c", "base", 1, delta_text="x")
    assert chat_chunk("c", "base", 1, delta_text="x", include_usage=True)["usage"] is None

    tail = usage_chunk("c", "base", 1, 10, 4)
    parsed = ChatCompletionChunk.model_validate(tail)
    assert tail["choices"] == [] and parsed.usage.total_tokens == 14


def test_completion_shapes():
    from openai.types import Completion

    full = Completion.model_validate(completion("cmpl-1", "base", 5, " there", "length", 4, 16))
    no_extras(full)
    assert full.object == "text_completion" and full.choices[0].text == " there"
    assert full.usage.total_tokens == 20 and full.system_fingerprint is None

    # Streamed completions carry finish_reason null until the last chunk, as OpenAI's own do; the
    # Completion type does not allow that, and the client builds stream chunks without validation.
    from openai._models import construct_type

    chunk = construct_type(type_=Completion, value=completion_chunk("cmpl-1", "base", 5, "x"))
    no_extras(chunk)
    Completion.model_validate(completion_chunk("cmpl-1", "base", 5, "", finish_reason="stop"))
    assert chunk.choices[0].text == "x" and chunk.choices[0].finish_reason is None
    tail = Completion.model_validate(usage_chunk("cmpl-1", "base", 5, 4, 16, kind="completion"))
    assert tail.object == "text_completion" and tail.choices == [] and tail.usage.completion_tokens == 16


def test_ids_and_created():
    assert new_id("chat").startswith("chatcmpl-") and new_id("completion").startswith("cmpl-")
    assert new_id("chat") != new_id("chat")
    assert isinstance(chat_completion("x", "m", None, "", "stop", 0, 0)["created"], int)


def test_several_choices_and_their_chunks():
    """n > 1 and several prompts: one choice per (text, finish_reason), `index` = its position;
    chunks carry the index of the choice they belong to."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chat = ChatCompletion.model_validate(chat_choices("c", "base", 1, [("a", "stop"), ("b", "length")], 10, 5, 8))
    text = Completion.model_validate(completion_choices("c", "base", 1, [("x", "stop"), ("y", "stop"),
                                                                         ("z", "length")], 12, 6))
    for parsed in (chat, text):
        no_extras(parsed)
    assert [(c.index, c.message.content, c.finish_reason) for c in chat.choices] == [(0, "a", "stop"),
                                                                                     (1, "b", "length")]
    assert [(c.index, c.text) for c in text.choices] == [(0, "x"), (1, "y"), (2, "z")]
    assert chat.usage.prompt_tokens_details.cached_tokens == 8 and text.usage.total_tokens == 18
    chunk = ChatCompletionChunk.model_validate(chat_chunk("c", "base", 1, delta_text="hi", index=3))
    assert chunk.choices[0].index == 3
    assert completion_chunk("c", "base", 1, "x", index=2)["choices"][0]["index"] == 2
