"""Hostile and careless input against a live stack (a real worker and scheduler, the API over HTTP):
each case is refused with a 4xx in the OpenAI envelope before anything is queued, the connection
stays usable, and one bad line of a batch file goes to its error file while the rest runs."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": "Say hi."}]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def post(stack, path: str, raw: bytes, **headers) -> httpx.Response:
    return httpx.post(stack.url + path, content=raw, timeout=60,
                      headers={**auth(stack.key), "Content-Type": "application/json", **headers})


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:500]
    return resp.json()["error"]


def nothing_queued(stack) -> bool:
    from hotswap import keys

    return not any(stack.redis.scan_iter(match=keys.PREFIX + "req:*", count=1000))


@pytest.fixture(autouse=True)
def finished_requests_forgotten(live_stack):
    """Each test starts with no request records, so `nothing_queued` sees only its own."""
    from hotswap import keys

    for key in live_stack.redis.scan_iter(match=keys.PREFIX + "req:*", count=1000):
        live_stack.redis.delete(key)


def test_deeply_nested_json_is_a_400(live_stack):
    deep = b"[" * 50_000 + b"]" * 50_000
    chat = b'{"model": "' + BASE.encode() + b'", "messages": ' + deep + b"}"
    assert post(live_stack, "/v1/chat/completions", chat).status_code == 400
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + deep + b"}\n"
    resp = httpx.post(live_stack.url + "/v1/files", headers=auth(live_stack.key), data={"purpose": "batch"},
                      files={"file": ("in.jsonl", line)}, timeout=60)
    err = error_of(resp, 400)
    assert err["param"] == "file" and "nested" in err["message"]
    assert nothing_queued(live_stack)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model": "%s", "prompt": "hi \\udc80"}', "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": "hi", "stop": ["\\udfff"]}', "stop.0"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [], "\\ud800": 1}', "\\ud800"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_stays(live_stack, path, body, param):
    """On one keep-alive connection: the refusal, then an ordinary call on the very same socket."""
    url = urlsplit(live_stack.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {**auth(live_stack.key), "Content-Type": "application/json"}
    conn.request("POST", path, body=body % BASE.encode(), headers=headers)
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    assert resp.status == 400 and not resp.will_close
    assert err["param"] == param and "surrogate" in err["message"]
    sock = conn.sock
    conn.request("GET", "/v1/models", headers=headers)
    again = conn.getresponse()
    assert again.status == 200 and json.loads(again.read())["data"]
    assert conn.sock is sock  # the same connection: the server did not drop it
    conn.close()
    assert nothing_queued(live_stack)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_a_seed_out_of_range_is_refused_before_queueing(live_stack, seed):
    body = {"model": BASE, "messages": MSG, "max_tokens": 1, "seed": seed}
    err = error_of(post(live_stack, "/v1/chat/completions", json.dumps(body).encode()), 400)
    assert err["param"] == "seed"
    assert nothing_queued(live_stack)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_the_extreme_seeds_in_range_are_served(live_stack, seed):
    body = {"model": BASE, "messages": MSG, "max_tokens": 2, "seed": seed}
    resp = post(live_stack, "/v1/chat/completions", json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


def test_a_huge_body_is_refused_by_its_size(live_stack):
    big = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    err = error_of(post(live_stack, "/v1/chat/completions", big), 413)
    assert err["code"] == "request_too_large" and "HOTSWAP_MAX_REQUEST_MB" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(80):
            yield b" " * (1 << 16)

    resp = httpx.post(live_stack.url + "/v1/chat/completions", content=chunks(), timeout=60,
                      headers={**auth(live_stack.key), "Content-Type": "application/json"})
    assert error_of(resp, 413)["message"].startswith("request body exceeds this server's limit")
    assert nothing_queued(live_stack)


def test_a_long_prompt_under_the_size_limit_is_refused_by_characters(live_stack):
    text = "word " * 400_000  # 2 MB: under the body limit, far over the context
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": text}]}).encode()
    err = error_of(post(live_stack, "/v1/chat/completions", body), 400)
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    assert nothing_queued(live_stack)


def test_bad_lines_go_to_the_error_file_and_the_batch_runs(live_stack):
    client = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0, timeout=120)
    good = {"model": BASE, "messages": MSG, "max_tokens": 2, "temperature": 0}
    bodies = {
        "ok-1": good,
        "surrogate": {"model": BASE, "messages": [{"role": "user", "content": "hi \ud800 there"}], "max_tokens": 2},
        "seed": {**good, "seed": 2**64},
        "ok-2": good,
    }
    raw = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
                  for cid, body in bodies.items()).encode()
    file = client.files.create(file=("in.jsonl", raw), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 2, 2)
    out = {json.loads(r)["custom_id"] for r in client.files.content(batch.output_file_id).text.splitlines()}
    errors = {json.loads(r)["custom_id"]: json.loads(r) for r in client.files.content(batch.error_file_id).text.splitlines()}
    assert out == {"ok-1", "ok-2"} and set(errors) == {"surrogate", "seed"}
    assert errors["surrogate"]["response"]["body"]["error"]["param"] == "messages.0.content"
    assert errors["seed"]["response"]["body"]["error"]["param"] == "seed"


@pytest.mark.parametrize("body, param", [
    (b'{"input_file_id": "file-\\ud800", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
     "input_file_id"),
    (b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
     b'"metadata": {"team": "\\udc80"}}', "metadata.team"),
])
def test_a_batch_with_a_lone_surrogate_is_a_400(live_stack, body, param):
    err = error_of(post(live_stack, "/v1/batches", body), 400)
    assert err["param"] == param and err["code"] == "invalid_unicode"
