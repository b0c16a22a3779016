"""The Batch API over real HTTP (uvicorn, real Redis, moto S3 or file:// storage) with the official
`openai` client, and the `hotswap batch` CLI against it.

Batches really run: a `JobRunner` thread (what `hotswap scheduler` runs) advances them, and a
`FakeWorker` thread takes, claims and completes their requests through the real queues. The same
with real workers and the demo model: tests/e2e/test_batch_stack.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.scheduler.test_jobs_runner import FakeWorker

BASE = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
HOTSWAP = os.path.join(os.path.dirname(sys.executable), "hotswap")


def chat_lines(n: int, model: str = BASE, prefix: str = "c") -> bytes:
    return "".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": CHAT,
                               "body": {"model": model, "messages": [{"role": "user", "content": f"Hi {i}"}],
                                        "max_tokens": 4}}) + "\n" for i in range(n)).encode()


def client(live_api, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_api.url + "/v1", api_key=key, max_retries=0)


def auth(key) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(oa: openai.OpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return oa.files.create(file=(name, data), purpose="batch").id


@pytest.fixture
def running(api_settings, redis_client, demo_tokenizer):
    """A job runner and a worker, each in a thread, for as long as the test runs."""
    from adapters.registry import Registry
    from scheduler.batchjobs.files import FileCatalog
    from hotswap.storage import open_store
    from scheduler.batchjobs.runner import JobRunner
    from scheduler.prepare import ServedModel

    settings = api_settings.model_copy(update={"batch_poll_s": 0.05})
    store = open_store(settings)
    runner = JobRunner(redis_client, store, FileCatalog(redis_client, store), Registry(redis_client, store), settings,
                       served=ServedModel(BASE, demo_tokenizer, 2048))
    worker, stop = FakeWorker(redis_client), threading.Event()

    def work():
        while not stop.wait(0.02):
            worker.run()

    threads = [threading.Thread(target=runner.run, daemon=True), threading.Thread(target=work, daemon=True)]
    for t in threads:
        t.start()
    yield runner
    runner.stop()
    stop.set()
    for t in threads:
        t.join(timeout=10)


def wait_status(oa: openai.OpenAI, batch_id: str, statuses=("completed", "failed", "cancelled", "expired"),
                timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oa.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def test_create_retrieve_list_cancel(live_api, api_key):
    oa = client(live_api, api_key)
    file_id = upload(oa, chat_lines(3))
    created = oa.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                metadata={"team": "nlp"})
    assert created.id.startswith("batch_") and created.object == "batch"
    assert (created.status, created.endpoint, created.input_file_id, created.completion_window) == (
        "validating", CHAT, file_id, "24h")
    assert created.metadata == {"team": "nlp"} and created.expires_at == created.created_at + 86400
    assert created.request_counts.total == 0 and created.output_file_id is None and created.errors is None
    assert oa.batches.retrieve(created.id) == created

    ids = [created.id] + [oa.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                            completion_window="24h").id for _ in range(4)]
    page = oa.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in oa.batches.list(limit=2)] == ids[::-1]  # the client follows `after` itself
    body = httpx.get(live_api.url + "/v1/batches", headers=auth(api_key), params={"after": ids[1]}).json()
    assert [b["id"] for b in body["data"]] == [ids[0]] and body["has_more"] is False

    cancelled = oa.batches.cancel(created.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None


def test_a_batch_runs_to_completion_and_its_results_are_files(live_api, api_key, api_settings, running):
    oa = client(live_api, api_key)
    lines = chat_lines(6) + (json.dumps({"custom_id": "ghost", "method": "POST", "url": CHAT,
                                         "body": {"model": "no-such-model", "messages": [{"role": "user",
                                                                                          "content": "x"}]}})
                             + "\n").encode()
    batch = oa.batches.create(input_file_id=upload(oa, lines), endpoint=CHAT, completion_window="24h")
    done = wait_status(oa, batch.id)
    assert done.status == "completed" and done.completed_at and done.in_progress_at and done.finalizing_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    assert done.model == BASE and done.usage.output_tokens == 18

    output = [json.loads(line) for line in oa.files.content(done.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in output) == [f"c{i}" for i in range(6)]
    for line in output:
        completion = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert completion.model == BASE and completion.choices[0].message.content.startswith("answer to c")
    (error,) = [json.loads(line) for line in oa.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "ghost" and error["response"]["status_code"] == 404
    assert oa.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert done.output_file_id in [f.id for f in oa.files.list(purpose="batch_output").data]

    resp = httpx.get(f"{live_api.url}/v1/batches/{done.id}/results", headers=auth(api_key))
    if api_settings.resolved_storage_url.startswith("file://"):
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "presign_unsupported"
    else:
        urls = resp.json()
        assert resp.status_code == 200 and urls["expires_at"] > time.time()
        assert httpx.get(urls["output_url"]).content == oa.files.content(done.output_file_id).content
        assert httpx.get(urls["error_url"]).content == oa.files.content(done.error_file_id).content

    with pytest.raises(openai.ConflictError):
        oa.batches.cancel(done.id)


def test_results_before_the_end_and_bad_files_fail_the_batch(live_api, api_key, running):
    oa = client(live_api, api_key)
    bad = chat_lines(2) + b'{"custom_id": "c0", "method": "POST", "url": "/v1/completions", "body": {}}\n'
    batch = oa.batches.create(input_file_id=upload(oa, bad), endpoint=CHAT, completion_window="24h")
    failed = wait_status(oa, batch.id)
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.line, e.code, e.param) for e in failed.errors.data] == [(3, "duplicate_custom_id", "custom_id"),
                                                                      (3, "invalid_url", "url")]
    resp = httpx.get(f"{live_api.url}/v1/batches/{batch.id}/results", headers=auth(api_key))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "batch_not_finished"


BAD_CREATES = {
    "window": ({"completion_window": "48h"}, 400, "completion_window"),
    "endpoint": ({"endpoint": "/v1/embeddings"}, 400, "endpoint"),
    "unknown file": ({"input_file_id": "file-0000000000000000000000ff"}, 404, "input_file_id"),
    "no file": ({"input_file_id": None}, 400, "input_file_id"),
    "metadata pairs": ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    "metadata value": ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
    "metadata type": ({"metadata": {"k": 1}}, 400, "metadata"),
    "unknown param": ({"priority": "high"}, 400, "priority"),
}


@pytest.mark.parametrize("change, status, param", BAD_CREATES.values(), ids=BAD_CREATES.keys())
def test_bad_creates_are_refused_naming_the_parameter(live_api, api_key, change, status, param):
    oa = client(live_api, api_key)
    body = {"input_file_id": upload(oa, chat_lines(1)), "endpoint": CHAT, "completion_window": "24h", **change}
    body = {k: v for k, v in body.items() if v is not None}
    resp = httpx.post(live_api.url + "/v1/batches", headers=auth(api_key), json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_the_input_file_must_be_a_batch_input(live_api, api_key, api_settings, redis_client):
    from scheduler.batchjobs.files import FileCatalog
    from hotswap.storage import open_store

    results = FileCatalog(redis_client, open_store(api_settings)).create("acme", "batch_output", "out.jsonl", b"{}\n")
    resp = httpx.post(live_api.url + "/v1/batches", headers=auth(api_key),
                      json={"input_file_id": results.id, "endpoint": CHAT, "completion_window": "24h"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_file_id"
    assert "purpose" in resp.json()["error"]["message"]


def test_tenants_never_see_each_others_batches(live_api, api_key, redis_client):
    from api.auth import create_key

    mine, theirs = client(live_api, api_key), client(live_api, create_key(redis_client, "globex"))
    file_id = upload(mine, chat_lines(1))
    batch = mine.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        theirs.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):  # nor can they run a batch on my file
        theirs.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert theirs.batches.list().data == []
    other = httpx.get(f"{live_api.url}/v1/batches/{batch.id}/results", headers=auth(theirs.api_key))
    assert other.status_code == 404
    assert mine.batches.retrieve(batch.id).status == "validating"  # untouched


# -- the CLI ---------------------------------------------------------------------------------------

def cli(live_api, key, *args, timeout: float = 120):
    env = {**os.environ, "HOTSWAP_API_URL": live_api.url, "HOTSWAP_API_KEY": key}
    return subprocess.run([HOTSWAP, "batch", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_submit_wait_status_results_list(live_api, api_key, running, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(chat_lines(5) + (json.dumps({"custom_id": "ghost", "method": "POST", "url": CHAT, "body": {
        "model": "nope", "messages": [{"role": "user", "content": "x"}]}}) + "\n").encode())
    sub = cli(live_api, api_key, "submit", str(path), "--wait", "--poll", "0.2", "-m", "team=nlp")
    assert sub.returncode == 0, sub.stderr
    batch_id = sub.stdout.strip()
    assert batch_id.startswith("batch_") and "5 completed, 1 failed of 6" in sub.stderr

    status = cli(live_api, api_key, "status", batch_id)
    assert status.returncode == 0 and "completed" in status.stdout and "output_file_id" in status.stdout
    as_json = json.loads(cli(live_api, api_key, "status", batch_id, "--json").stdout)
    assert as_json["metadata"] == {"team": "nlp"}

    out, errs = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    got = cli(live_api, api_key, "results", batch_id, "-o", str(out), "--errors", str(errs))
    assert got.returncode == 0, got.stderr
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == [f"c{i}" for i in range(5)]
    assert [json.loads(line)["custom_id"] for line in errs.read_text().splitlines()] == ["ghost"]

    listed = cli(live_api, api_key, "list")
    assert listed.returncode == 0 and batch_id in listed.stdout
    refused = cli(live_api, api_key, "cancel", batch_id)
    assert refused.returncode == 1 and "HTTP 409" in refused.stderr


def test_cli_wait_exits_non_zero_when_the_batch_fails(live_api, api_key, running, tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_bytes(chat_lines(2) + chat_lines(1))  # c0 twice
    sub = cli(live_api, api_key, "submit", str(path), "--wait", "--poll", "0.2")
    assert sub.returncode == 1 and "failed" in sub.stderr and "duplicate_custom_id" in sub.stderr
    res = cli(live_api, api_key, "results", sub.stdout.strip(), "-o", str(tmp_path / "o.jsonl"))
    assert res.returncode == 1 and "no results" in res.stderr


def test_cli_cancel(live_api, api_key, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(chat_lines(2))
    batch_id = cli(live_api, api_key, "submit", str(path)).stdout.strip()
    cancelled = cli(live_api, api_key, "cancel", batch_id)
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout
    early = cli(live_api, api_key, "results", batch_id, "-o", str(tmp_path / "o.jsonl"))
    assert early.returncode == 1 and "cancelling" in early.stderr


@pytest.mark.parametrize("args, message", [
    (["submit", "/nonexistent/requests.jsonl"], "no such file"),
    (["submit", "{bad}"], "is not JSONL"),
    (["submit", "{empty}"], "has no requests"),
    (["submit", "{good}", "--endpoint", "/v1/embeddings"], "--endpoint must be one of"),
    (["status", "batch_0000000000000000000000ff"], "HTTP 404"),
    (["results", "batch_0000000000000000000000ff", "-o", "{out}"], "HTTP 404"),
])
def test_cli_bad_input_is_one_line_and_exit_1(live_api, api_key, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "good.jsonl").write_bytes(chat_lines(1))
    args = [a.format(bad=tmp_path / "bad.jsonl", empty=tmp_path / "empty.jsonl", good=tmp_path / "good.jsonl",
                     out=tmp_path / "o.jsonl") for a in args]
    got = cli(live_api, api_key, *args)
    assert got.returncode == 1 and message in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and "Traceback" not in got.stderr
