"""Property tests for the parsers of user bytes on the request path: batch files at upload
(`check_jsonl`), batch lines (`validate_lines`), and chat / completion bodies (the schemas, then
`build_request`). Whatever the input (arbitrary bytes, any JSON, deep nesting, lone surrogates,
huge integers), each either succeeds or refuses with its own documented error; nothing else is
ever raised. Real tokenizer and a real registry on Redis."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hotswap.openai_schemas import ChatCompletionRequest, CompletionRequest
from scheduler.batchjobs.lines import validate_lines
from scheduler.prepare import PrepareError, ServedModel, build_request

BASE = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(alphabet=st.characters(codec=None) | st.sampled_from(["\ud800", "\udfff", "\x00", "é", "字"]),
               max_size=40)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=12)
deep = st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n)


def message_like():
    """Mostly well-formed chat bodies with hostile values, so validation gets past the envelope."""
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 5]),
                                     "content": text | json_values})
    return st.fixed_dictionaries(
        {"model": st.sampled_from([BASE, "ghost", "a@1", "", "x" * 300]) | text,
         "messages": st.lists(message, max_size=3) | json_values},
        optional={"max_tokens": st.integers(min_value=-5, max_value=2**70) | json_values,
                  "seed": st.integers(min_value=-(2**70), max_value=2**70),
                  "temperature": st.floats(allow_nan=True) | json_values,
                  "stop": st.lists(text, max_size=5) | text | json_values,
                  "stream": st.booleans()})


@pytest.fixture(scope="module")
def registry(tmp_path_factory, redis_url):
    import redis

    from adapters.registry import Registry
    from hotswap.storage import open_store

    return Registry(redis.Redis.from_url(redis_url), open_store(url=f"file://{tmp_path_factory.mktemp('store')}"))


def served_or_refused(model_cls, body, tokenizer, registry) -> None:
    """Validation refuses with its ValidationError, build_request with a 4xx PrepareError, or the
    request is built; any other exception fails the test."""
    try:
        parsed = model_cls.model_validate(body)
    except ValidationError:
        return
    try:
        build_request(parsed, "acme", ServedModel(BASE, tokenizer, 2048), registry)
    except PrepareError as exc:
        assert 400 <= exc.status < 500


@SETTINGS
@given(body=message_like() | json_values)
def test_chat_bodies_validate_and_prepare_or_refuse_cleanly(body, demo_tokenizer, registry):
    served_or_refused(ChatCompletionRequest, body, demo_tokenizer, registry)


@SETTINGS
@given(body=st.fixed_dictionaries({"model": st.just(BASE), "prompt": text | st.lists(st.integers(), max_size=5)
                                   | json_values}) | json_values)
def test_completion_bodies_validate_and_prepare_or_refuse_cleanly(body, demo_tokenizer, registry):
    served_or_refused(CompletionRequest, body, demo_tokenizer, registry)


def _line(args) -> bytes:
    custom_id, body = args
    envelope = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    return json.dumps(envelope).encode() + b"\n"


@SETTINGS
@given(lines=st.lists(st.binary(max_size=60) | deep.map(str.encode) | json_values.map(lambda v: json.dumps(v).encode())
                      | st.tuples(text, message_like()).map(_line), min_size=1, max_size=6))
def test_batch_lines_never_raise(lines, demo_tokenizer, registry):
    """Every line ends up judged: prepared, an envelope error, or a refused body; never an exception."""
    sink = []
    v = validate_lines(lines, endpoint=CHAT, tenant="acme", batch_id="batch_p",
                       served=ServedModel(BASE, demo_tokenizer, 2048), registry=registry, max_lines=100,
                       sink=sink.append)
    assert v.prepared == len(sink)
    for req in sink:
        req.model_dump_json()  # what is stored next: it must serialize
    for raw in v.refused:
        json.loads(raw)  # every error line is itself valid JSON (no lone surrogate leaks into it)


@SETTINGS
@given(data=st.binary(max_size=300) | st.lists(deep | json_values.map(json.dumps), min_size=1, max_size=5).map(
    lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")))
def test_batch_file_upload_check_accepts_or_refuses_with_a_4xx(data):
    from api.errors import APIError
    from api.routes.files import check_jsonl

    try:
        size = check_jsonl(io.BytesIO(data), limit_mb=1)
    except APIError as exc:
        assert 400 <= exc.status < 500
        return
    assert size == len(data)
