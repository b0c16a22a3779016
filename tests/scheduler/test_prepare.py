"""`build_request`'s refusals of hostile prompts, with the demo model's real tokenizer: a prompt that
cannot fit is refused by its character count before any tokenizing (so refusing a huge prompt costs
no more than refusing a small one), and text the tokenizer cannot take is a 400, never a TypeError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.openai_schemas import ChatCompletionRequest, CompletionRequest
from hotswap.tokenizer import Tokenizer
from scheduler.prepare import PrepareError, ServedModel, build_request

BASE = "smollm2-135m-instruct"
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]  # hypothesis rarely draws them by itself


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting the characters it was asked to encode."""

    encoded_chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded_chars += len(text)
        return super().encode(text, add_special_tokens)


@pytest.fixture
def served(demo_model_dir):
    return ServedModel(BASE, CountingTokenizer(demo_model_dir), 8192)


def chat(content: str, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": BASE, "messages": [{"role": "user", "content": content}],
                                                 **extra})


def test_the_character_bound_is_safe_for_this_vocabulary(demo_tokenizer):
    # Every token of the vocabulary stands for at most max_token_chars characters; the bound is real.
    longest = max(demo_tokenizer._tok.get_vocab(with_added_tokens=True), key=len)
    assert len(longest) == demo_tokenizer.max_token_chars
    assert len(demo_tokenizer.encode("#" * 80, add_special_tokens=False)) == 1  # one token of 80 characters


@pytest.mark.parametrize("make", [lambda text: chat(text),
                                  lambda text: CompletionRequest.model_validate({"model": BASE, "prompt": text})])
def test_a_prompt_too_long_by_characters_is_refused_without_tokenizing(served, make):
    limit = served.max_model_len * served.tokenizer.max_token_chars
    with pytest.raises(PrepareError) as exc:
        build_request(make("a" * (limit + 1)), "acme", served, registry=None)
    assert exc.value.status == 400 and exc.value.code == "context_length_exceeded"
    assert "characters" in exc.value.message
    assert served.tokenizer.encoded_chars == 0  # refused before the tokenizer saw a character


def test_a_prompt_under_the_character_bound_is_still_counted_in_tokens(served):
    with pytest.raises(PrepareError) as exc:
        build_request(chat("word " * 9000), "acme", served, registry=None)
    assert exc.value.code == "context_length_exceeded" and "tokens" in exc.value.message
    assert served.tokenizer.encoded_chars > 0


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None) | st.sampled_from(LONE_SURROGATES), max_size=200),
       kind=st.sampled_from(["chat", "completion"]))
def test_any_unicode_prompt_is_served_or_refused_cleanly(demo_tokenizer, text, kind):
    """Arbitrary code points, lone surrogates included: validation or build_request refuse with their
    own errors, or the request is built; nothing else is raised."""
    from pydantic import ValidationError

    served = ServedModel(BASE, demo_tokenizer, 8192)
    body = ({"model": BASE, "messages": [{"role": "user", "content": text}]} if kind == "chat"
            else {"model": BASE, "prompt": text})
    try:
        parsed = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        req = build_request(parsed, "acme", served, registry=None)
    except ValidationError as exc:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text), exc
        return
    except PrepareError as exc:
        assert exc.status == 400, exc.message
        return
    assert req.prompt_token_ids


def test_logprobs_echo_and_max_tokens_0_reach_the_queued_request(served):
    """What the worker and the answer need: the sampling spec's logprobs and prompt_logprobs, and
    the request's echo; max_tokens 0 (echo only) is a spec of 0 the worker runs as one hidden token."""
    def completion(**extra):
        body = CompletionRequest.model_validate({"model": BASE, "prompt": [5, 6, 7], **extra})
        return build_request(body, "acme", served, registry=None)

    scoring = completion(echo=True, logprobs=1, max_tokens=0)
    assert (scoring.echo, scoring.sampling.max_tokens, scoring.sampling.logprobs,
            scoring.sampling.prompt_logprobs) == (True, 0, 1, 1)
    plain = completion(logprobs=3)
    assert (plain.echo, plain.sampling.max_tokens, plain.sampling.logprobs, plain.sampling.prompt_logprobs) == (
        False, 16, 3, None)
    asked = build_request(chat("Hi", logprobs=True, top_logprobs=4, max_tokens=3), "acme", served, registry=None)
    assert (asked.echo, asked.sampling.logprobs, asked.sampling.prompt_logprobs) == (False, 4, None)
    assert build_request(chat("Hi"), "acme", served, registry=None).sampling.logprobs is None
