"""Structured outputs through a live stack (real Redis, scheduler, Celery worker with the demo model,
the API over HTTP): response_format on chat and completions, streamed and not, refused before
queueing when the engine cannot enforce the schema, and 50 random schemas at temperature 1.0
through a Batch API file, every output that ends by itself valid against its schema."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from scheduler.queues import Queues
from tests.script_modules import benchkit_module

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Reply with a JSON object with the fields name and age."}]


def json_schema(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def schemas():
    with benchkit_module("json_schemas") as module:
        yield module


def test_chat_json_schema_validates(client):
    r = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=60, temperature=0,
                                       response_format=json_schema(PERSON))
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_json_schema_is_the_same_answer(client):
    whole = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=60, temperature=0,
                                           response_format=json_schema(PERSON))
    chunks = list(client.chat.completions.create(model=BASE, messages=ASK, max_tokens=60, temperature=0,
                                                 response_format=json_schema(PERSON), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_take_response_format_json_object(client):
    r = client.completions.create(model=BASE, prompt="A JSON object describing a cat:", max_tokens=80,
                                  temperature=0, extra_body={"response_format": {"type": "json_object"}})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    else:  # cut by max_tokens: a prefix of an object, as OpenAI's
        assert choice.finish_reason == "length" and choice.text.lstrip().startswith("{")


def test_max_tokens_cuts_the_json_with_length(client):
    r = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=3, temperature=0,
                                       response_format=json_schema(PERSON))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"age": {"type": "integer", "not": {"const": 3}}}}, "properties.age"),
    ({"type": "string", "pattern": r"(?<=a)b"}, "lookbehind"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "format": "iri"}, "format 'iri'"),
])
def test_an_unenforceable_schema_is_a_400_before_queueing(live_stack, schema, where):
    waiting = Queues(live_stack.redis).waiting("realtime")
    r = httpx.post(live_stack.url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {live_stack.key}"},
                   json={"model": BASE, "messages": ASK, "response_format": json_schema(schema)})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and where in error["message"], error
    assert "response_format.json_schema.schema" in error["message"]
    assert Queues(live_stack.redis).waiting("realtime") == waiting


def test_fifty_random_schemas_through_a_batch_file(client, schemas):
    """Temperature 1.0, a seed per line: every output that ends by itself parses and validates."""
    cases = schemas.random_schemas(50, seed=1)
    rows = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": BASE, "max_tokens": 96, "temperature": 1.0, "seed": i,
                      "messages": [{"role": "user", "content": schemas.prompt_for(s)}],
                      "response_format": json_schema(s, f"schema_{i}")}}
            for i, s in enumerate(cases)]
    upload = client.files.create(file=("schemas.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 900
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(1)
    assert batch.status == "completed" and batch.request_counts.failed == 0, batch
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: line["response"]["body"]["choices"][0] for line in lines}
    assert len(by_id) == 50
    stopped = [(s, by_id[f"s{i}"]) for i, s in enumerate(cases) if by_id[f"s{i}"]["finish_reason"] == "stop"]
    assert {c["finish_reason"] for c in by_id.values()} <= {"stop", "length"}
    assert len(stopped) >= 45, [c["message"]["content"] for c in by_id.values() if c["finish_reason"] != "stop"]
    for schema, choice in stopped:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
