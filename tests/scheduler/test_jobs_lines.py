"""Batch line validation: every bad-line case and its documented outcome (scheduler/batchjobs/records.py).

Envelope problems fail the whole batch with errors.data; bodies are judged by the live API's own
models and `build_request`, and a refused body becomes an error-file line with the live status.
Real tokenizer (the demo model's), real registry on a real Redis and file:// storage.
"""

from __future__ import annotations

import json

import pytest

from scheduler.batchjobs.lines import validate_lines
from scheduler.prepare import ServedModel

BASE = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Say hi."}]


def line(custom_id="a", method="POST", url=CHAT, body=None, **extra) -> bytes:
    obj = {"custom_id": custom_id, "method": method, "url": url,
           "body": {"model": BASE, "messages": MSG, "max_tokens": 4} if body is None else body, **extra}
    return (json.dumps({k: v for k, v in obj.items() if v is not ...}) + "\n").encode()


@pytest.fixture
def registry(redis_client, tmp_path):
    from adapters.registry import Registry
    from hotswap.storage import open_store

    return Registry(redis_client, open_store(url=f"file://{tmp_path / 'store'}"))


@pytest.fixture
def judge(registry, demo_tokenizer):
    def run(lines: list[bytes], endpoint: str = CHAT, max_lines: int = 100, max_model_len: int = 256):
        sink = []
        v = validate_lines(lines, endpoint=endpoint, tenant="acme", batch_id="batch_x",
                           served=ServedModel(BASE, demo_tokenizer, max_model_len), registry=registry,
                           max_lines=max_lines, sink=sink.append)
        return v, sink

    return run


def test_good_lines_become_batch_requests(judge):
    v, sink = judge([line("a"), b"\n", line("b", body={"model": BASE, "messages": MSG, "temperature": 0.5})])
    assert v.ok and (v.total, v.prepared, v.refused) == (2, 2, [])
    assert [r.custom_id for r in sink] == ["a", "b"]
    assert {(r.priority, r.batch_id, r.stream, r.model) for r in sink} == {("batch", "batch_x", False, BASE)}
    assert sink[0].sampling.max_tokens == 4 and sink[1].sampling.temperature == 0.5
    assert len({r.id for r in sink}) == 2


ENVELOPE_CASES = {
    "not json": (b"{oops\n", "invalid_json_line", None),
    "not an object": (b"[1, 2]\n", "invalid_json_line", None),
    "not utf-8": (b'{"custom_id": "\xff"}\n', "invalid_json_line", None),
    "custom_id missing": (line(custom_id=...), "missing_required_parameter", "custom_id"),
    "custom_id not a string": (line(custom_id=5), "invalid_custom_id", "custom_id"),
    "custom_id empty": (line(custom_id=""), "invalid_custom_id", "custom_id"),
    "custom_id with a lone surrogate": (line(custom_id="a\ud800"), "invalid_custom_id", "custom_id"),
    "method GET": (line(method="GET"), "invalid_method", "method"),
    "method missing": (line(method=...), "invalid_method", "method"),
    "url of another endpoint": (line(url="/v1/completions"), "invalid_url", "url"),
    "url missing": (line(url=...), "invalid_url", "url"),
    "body missing": (line(body=...), "missing_required_parameter", "body"),
    "body not an object": (line(body="hello"), "invalid_body", "body"),
    "unknown key": (line(priority="high"), "unsupported_parameter", "priority"),
    "nested 50,000 deep": (b'{"custom_id": "a", "body": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
                           "invalid_json_line", None),
}


@pytest.mark.parametrize("raw, code, param", ENVELOPE_CASES.values(), ids=ENVELOPE_CASES.keys())
def test_envelope_problems_fail_the_batch(judge, raw, code, param):
    v, sink = judge([line("first"), raw, line("last")])
    assert not v.ok
    assert [(e["line"], e["code"], e["param"]) for e in v.errors] == [(2, code, param)]
    assert v.errors[0]["message"].startswith("line 2: ")
    assert sink[:1] == [] or [r.custom_id for r in sink] == ["first"]  # nothing after a bad line is prepared


def test_duplicate_custom_id_names_both_lines(judge):
    v, _ = judge([line("a"), line("b"), line("a")])
    assert [(e["line"], e["code"]) for e in v.errors] == [(3, "duplicate_custom_id")]
    assert "line 1" in v.errors[0]["message"]


def test_every_problem_of_a_file_is_listed_at_once(judge):
    v, _ = judge([b"nope\n", line("a", method="GET", url="/v1/completions"), line("a")])
    assert [(e["line"], e["code"]) for e in v.errors] == [(1, "invalid_json_line"), (2, "invalid_method"),
                                                          (2, "invalid_url"), (3, "duplicate_custom_id")]


def test_empty_file_and_too_many_lines(judge):
    v, _ = judge([b"\n", b"   \n"])
    assert [e["code"] for e in v.errors] == ["empty_file"]
    v, _ = judge([line(f"c{i}") for i in range(4)], max_lines=3)
    assert [(e["line"], e["code"]) for e in v.errors] == [(4, "batch_too_large")]


def test_listed_errors_are_capped(judge):
    v, _ = judge([b"x\n"] * 150, max_lines=1000)
    assert len(v.errors) == 100 and v.error_count == 150


LONG = " ".join(["word"] * 400)
BODY_CASES = {
    "unknown model": ({"model": "no-such-model", "messages": MSG}, 404, "model", "model_not_found"),
    "prompt over the context": ({"model": BASE, "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
                                "context_length_exceeded"),
    "max_tokens over the context": ({"model": BASE, "messages": MSG, "max_tokens": 1000}, 400, "max_tokens",
                                    "context_length_exceeded"),
    "unsupported parameter": ({"model": BASE, "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools",
                              "unsupported_parameter"),
    "n=2": ({"model": BASE, "messages": MSG, "n": 2}, 400, "n", "unsupported_parameter"),
    "stream=true": ({"model": BASE, "messages": MSG, "stream": True}, 400, "stream", "unsupported_parameter"),
    "temperature out of range": ({"model": BASE, "messages": MSG, "temperature": 7}, 400, "temperature", None),
    "max_tokens as a string": ({"model": BASE, "messages": MSG, "max_tokens": "5"}, 400, "max_tokens", None),
    "messages missing": ({"model": BASE}, 400, "messages", None),
    "model missing": ({"messages": MSG}, 400, "model", None),
    "lone surrogate in a message": ({"model": BASE, "messages": [{"role": "user", "content": "hi \ud800 there"}]},
                                    400, "messages.0.content", "invalid_unicode"),
    "lone surrogate in a stop": ({"model": BASE, "messages": MSG, "stop": ["\udc80"]}, 400, "stop.0",
                                 "invalid_unicode"),
    "seed past int64": ({"model": BASE, "messages": MSG, "seed": 2**64}, 400, "seed", None),
    "prompt over the context by characters": ({"model": BASE, "messages": [{"role": "user", "content": "x" * 30_000}]},
                                              400, "messages", "context_length_exceeded"),
}


@pytest.mark.parametrize("body, status, param, code", BODY_CASES.values(), ids=BODY_CASES.keys())
def test_refused_bodies_go_to_the_error_file_and_the_rest_runs(judge, body, status, param, code):
    v, sink = judge([line("ok1"), line("bad", body=body), line("ok2")])
    assert v.ok and v.total == 3 and [r.custom_id for r in sink] == ["ok1", "ok2"]
    (refused,) = [json.loads(r) for r in v.refused]
    assert refused["custom_id"] == "bad" and refused["id"].startswith("batch_req_")
    assert refused["response"]["status_code"] == status and refused["response"]["request_id"] is None
    error = refused["response"]["body"]["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert refused["error"] == {"code": code or error["type"], "message": error["message"]}
    assert param in error["message"] or code in ("model_not_found", "context_length_exceeded")


def test_the_same_body_is_judged_as_the_live_api_judges_it(judge, registry, demo_tokenizer):
    """A refused line carries exactly what build_request / the schemas say for the body live."""
    from pydantic import ValidationError

    from hotswap.openai_schemas import ChatCompletionRequest, error_message
    from scheduler.prepare import PrepareError, build_request

    body = {"model": BASE, "messages": MSG, "top_p": 0}
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(body)
    v, _ = judge([line("x", body=body)])
    assert json.loads(v.refused[0])["response"]["body"]["error"]["message"] == error_message(exc.value)[1]

    body = {"model": "ghost", "messages": MSG}
    with pytest.raises(PrepareError) as exc:
        build_request(ChatCompletionRequest.model_validate(body), "acme", ServedModel(BASE, demo_tokenizer, 256),
                      registry)
    v, _ = judge([line("x", body=body)])
    assert json.loads(v.refused[0])["error"]["message"] == exc.value.message


def test_completions_lines(judge):
    url = "/v1/completions"
    v, sink = judge([line("p", url=url, body={"model": BASE, "prompt": "Hello"}),
                     line("q", url=url, body={"model": BASE, "prompt": ["a", "b"]}),
                     line("r", url=url, body={"model": BASE, "prompt": [1, 2, 3], "max_tokens": 2})], endpoint=url)
    assert v.ok and [r.custom_id for r in sink] == ["p", "r"]
    assert sink[0].sampling.max_tokens == 16  # the completions default, as live
    assert json.loads(v.refused[0])["response"]["body"]["error"]["param"] == "prompt"


@pytest.fixture(scope="session")
def adapter_dir(demo_model_dir, tmp_path_factory):
    from tests.factories import make_peft_adapter

    return make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("lora") / "support-bot", seed=3, r=4,
                             lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_lines_may_name_different_models(judge, registry, adapter_dir, demo_model_dir):
    from adapters.format import inspect_lora_adapter

    config = json.loads((demo_model_dir / "config.json").read_text())
    record = registry.register("acme", "support-bot", "lora", BASE, adapter_dir, inspect_lora_adapter(adapter_dir, config))
    registry.register("globex", "theirs", "lora", BASE, adapter_dir, inspect_lora_adapter(adapter_dir, config))
    v, sink = judge([line("base"), line("lora", body={"model": "support-bot", "messages": MSG}),
                     line("pinned", body={"model": "support-bot@1", "messages": MSG}),
                     line("other-tenant", body={"model": "theirs", "messages": MSG})])
    assert v.ok and v.models == {BASE, "support-bot", "support-bot@1"}
    assert [(r.custom_id, r.target.key) for r in sink] == [
        ("base", "base"), ("lora", f"lora:acme/{record.ref}"), ("pinned", f"lora:acme/{record.ref}")]
    assert [json.loads(r)["response"]["status_code"] for r in v.refused] == [404]  # another tenant's adapter


def test_completions_line_with_a_lone_surrogate(judge):
    url = "/v1/completions"
    v, sink = judge([line("p", url=url, body={"model": BASE, "prompt": "hi \udc80"}),
                     line("q", url=url, body={"model": BASE, "prompt": "Hello"})], endpoint=url)
    assert v.ok and [r.custom_id for r in sink] == ["q"]
    error = json.loads(v.refused[0])["response"]["body"]["error"]
    assert (error["param"], error["code"]) == ("prompt", "invalid_unicode")


def test_a_line_that_breaks_our_code_goes_to_the_error_file_alone(registry, demo_tokenizer, monkeypatch):
    """One error boundary per line: an unexpected exception while preparing one line refuses that
    line with a 500 and the rest of the batch runs (it used to wedge the batch in validating)."""
    import scheduler.batchjobs.lines as job_lines

    real = job_lines.build_request

    def breaks_on_poison(body, *args, **kwargs):
        if body.messages[0].text == "poison":
            raise TypeError("a bug in our code")
        return real(body, *args, **kwargs)

    monkeypatch.setattr(job_lines, "build_request", breaks_on_poison)
    sink = []
    v = validate_lines([line("ok1"), line("bad", body={"model": BASE, "messages": [{"role": "user", "content": "poison"}]}),
                        line("ok2")], endpoint=CHAT, tenant="acme", batch_id="batch_x",
                       served=ServedModel(BASE, demo_tokenizer, 256), registry=registry, max_lines=10, sink=sink.append)
    assert v.ok and [r.custom_id for r in sink] == ["ok1", "ok2"]
    (refused,) = [json.loads(r) for r in v.refused]
    assert refused["custom_id"] == "bad" and refused["response"]["status_code"] == 500
    assert refused["response"]["body"]["error"]["code"] == "internal_error"
