"""Batch jobs end to end on a live stack: a real `hotswap worker` (Celery, the demo model on CPU) and
a real `hotswap scheduler` subprocess, whose job runner validates, feeds, collects and writes the
results to moto S3; the API over real HTTP; the official `openai` client and the `hotswap batch` CLI.

Greedy outputs in the result files must equal the engine run directly on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
HOTSWAP = os.path.join(os.path.dirname(sys.executable), "hotswap")
QUESTIONS = ["Name a famous painter.", "What is 2 + 2?", "Say hello in French.", "Name a color."]


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(live_stack, demo_model_dir):
    """The engine run directly on the same weights: what the batch's greedy answers must equal."""
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", max_loras=2, kv_cache_gb=0.1,
                                  cpu_tuning="off"))  # the workers' matmul paths: see tests/stack.py
    engine.register_adapter("support-bot", live_stack.adapter_dir)

    def run(prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> list[str]:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapters=adapters)
        return [o.text for o in outs]

    return run


def wait_batch(client, batch_id: str, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} is still {batch.status}: {batch.request_counts}")


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def lines_of(client, file_id: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {r["custom_id"]: r for r in rows}
    assert len(by_id) == len(rows)  # every custom_id once
    return by_id


def check_presigned_results(live_stack, done) -> None:
    """GET /v1/batches/{id}/results gives presigned S3 URLs: downloading them with plain HTTP and reading
    their objects with boto3 both give the files' content; another tenant gets a 404."""
    from urllib.parse import urlsplit

    import boto3
    import httpx

    resp = httpx.get(f"{live_stack.url}/v1/batches/{done.id}/results", params={"expires_in": 600},
                     headers={"Authorization": f"Bearer {live_stack.key}"})
    assert resp.status_code == 200, resp.text
    urls = resp.json()
    assert time.time() < urls["expires_at"] <= time.time() + 600 + 5
    s3 = boto3.client("s3", endpoint_url=live_stack.settings.s3_endpoint_url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    client = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0)
    for url, file_id in ((urls["output_url"], done.output_file_id), (urls["error_url"], done.error_file_id)):
        if file_id is None:
            assert url is None
            continue
        want = client.files.content(file_id).content
        assert httpx.get(url, timeout=30).content == want
        bucket, _, key = urlsplit(url).path.lstrip("/").partition("/")  # path-style URL of moto / MinIO
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == want
    other = httpx.get(f"{live_stack.url}/v1/batches/{done.id}/results",
                      headers={"Authorization": f"Bearer {live_stack.other_key}"})
    assert other.status_code == 404 and other.json()["error"]["message"]


def test_mixed_models_batch_equals_the_engine(live_stack, client, direct, demo_tokenizer):
    models = [BASE, "support-bot", "support-bot@1"]
    rows, want_inputs = [], {}
    for i, question in enumerate(QUESTIONS):
        for model in models:
            custom_id = f"{model}/{i}"
            messages = [{"role": "user", "content": question}]
            rows.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}})
            want_inputs[custom_id] = (demo_tokenizer.encode_chat(messages), None if model == BASE else "support-bot")
    rows.append({"custom_id": "ghost", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}})
    file_id = client.files.create(file=("mixed.jsonl", jsonl(rows)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_batch(client, batch.id)

    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (13, 12, 1)
    output = lines_of(client, done.output_file_id)
    ids = sorted(want_inputs)
    texts = direct([want_inputs[c][0] for c in ids], [want_inputs[c][1] for c in ids], 8)
    for custom_id, want in zip(ids, texts):
        line = output[custom_id]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert body.choices[0].message.content == want, custom_id
        assert body.model == custom_id.split("/")[0]  # the name the line used
        assert body.usage.completion_tokens <= 8
    # The batch's usage adds up its lines', cached prompt tokens (prefix caching) included.
    usages = [line["response"]["body"]["usage"] for line in output.values()]
    usage = done.model_dump()["usage"]
    assert usage["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert usage["input_tokens_details"]["cached_tokens"] == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                                 for u in usages)
    # The same greedy requests through the real-time API give the same answers.
    for row in rows[:-1]:
        live = client.chat.completions.create(**row["body"])
        assert live.choices[0].message.content == \
            output[row["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"], row["custom_id"]
    assert {output[f"{BASE}/{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(4)} != \
        {output[f"support-bot/{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(4)}
    errors = lines_of(client, done.error_file_id)
    assert list(errors) == ["ghost"] and errors["ghost"]["response"]["status_code"] == 404

    # The presigned URLs (hotswap extension) serve the same bytes to any HTTP or S3 client.
    check_presigned_results(live_stack, done)

    # Another tenant sees neither the batch nor its results.
    other = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(done.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)


def test_cli_completions_batch_with_a_scheduler_restart(live_stack, client, direct, demo_tokenizer, tmp_path):
    """`hotswap batch submit --wait` while the scheduler is killed (-9) and restarted mid-batch:
    the new one resumes the job from Redis, and every line is in the results exactly once."""
    prompts = [f"{q} Answer:" for q in QUESTIONS] * 3
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": BASE if i % 2 else "support-bot", "prompt": p, "max_tokens": 8, "temperature": 0}}
            for i, p in enumerate(prompts)]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(jsonl(rows))
    env = {**os.environ, "HOTSWAP_API_URL": live_stack.url, "HOTSWAP_API_KEY": live_stack.key}
    submit = subprocess.Popen([HOTSWAP, "batch", "submit", str(path), "--endpoint", "/v1/completions", "--wait",
                               "--poll", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        batch_id = submit.stdout.readline().strip()
        assert batch_id.startswith("batch_"), submit.stderr.read() if submit.poll() is not None else batch_id
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch_id).status == "validating" and time.monotonic() < deadline:
            time.sleep(0.1)
        stack = live_stack.stack
        stack.scheduler.kill()  # kill -9: no lease release, nothing flushed
        stack.scheduler.wait(timeout=30)
        time.sleep(1.0)  # the worker finishes what it holds meanwhile; results wait in Redis
        stack.scheduler = stack._spawn(["scheduler"], "scheduler-restarted")
        rest, err = submit.communicate(timeout=400)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, err
    assert "12 completed, 0 failed of 12" in err

    out = tmp_path / "out.jsonl"
    got = subprocess.run([HOTSWAP, "batch", "results", batch_id, "-o", str(out)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert got.returncode == 0, got.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in rows)  # once each
    by_id = {line["custom_id"]: line for line in lines}
    texts = direct([demo_tokenizer.encode(r["body"]["prompt"]) for r in rows],
                   [None if r["body"]["model"] == BASE else "support-bot" for r in rows], 8)
    for r, want in zip(rows, texts):
        body = openai.types.Completion.model_validate(by_id[r["custom_id"]]["response"]["body"])
        assert body.choices[0].text == want and body.model == r["body"]["model"]


def test_cancel_mid_way_keeps_what_finished_and_stops_the_rest(live_stack, client, direct, demo_tokenizer):
    """Cancel while lines are still queued: the batch ends `cancelled`, its output holds exactly the lines
    that completed (each once, equal to the engine), nothing of it stays queued or running, and the
    stack serves the next request at once."""
    prompts = [f"Write a story about a {animal}." for animal in
               ("cat", "dog", "fox", "owl", "bee", "eel", "yak", "ant")] * 5
    rows = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": BASE if i % 2 else "support-bot", "prompt": p, "max_tokens": 24, "temperature": 0}}
            for i, p in enumerate(prompts)]
    file_id = client.files.create(file=("long.jsonl", jsonl(rows)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while (current := client.batches.retrieve(batch.id)).request_counts.completed < 1:
        assert current.status in ("validating", "in_progress"), current
        assert time.monotonic() < deadline, "no line finished in 300 s"
        time.sleep(0.2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id, timeout=120)

    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    assert counts.total == len(rows) and 1 <= counts.completed < len(rows) and counts.failed == 0
    output = lines_of(client, done.output_file_id)
    assert len(output) == counts.completed  # what finished is kept, once each
    by_id = {r["custom_id"]: r for r in rows}
    ids = sorted(output)
    texts = direct([demo_tokenizer.encode(by_id[c]["body"]["prompt"]) for c in ids],
                   [None if by_id[c]["body"]["model"] == BASE else "support-bot" for c in ids], 24)
    for custom_id, want in zip(ids, texts):
        assert output[custom_id]["response"]["body"]["choices"][0]["text"] == want, custom_id
    check_presigned_results(live_stack, done)

    # Nothing of the batch is left in the queues or on the worker: the next request runs at once.
    r = live_stack.redis
    assert sum(r.zcard(k) for k in r.scan_iter("hotswap:q:*")) == 0
    assert sum(r.scard(k) for k in r.scan_iter("hotswap:w:*:inflight")) == 0
    started = time.monotonic()
    reply = client.completions.create(model=BASE, prompt="Hello", max_tokens=2, temperature=0)
    assert reply.choices[0].text and time.monotonic() - started < 60
