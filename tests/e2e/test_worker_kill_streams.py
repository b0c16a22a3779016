"""Fault test: kill -9 of a worker while streams are open, three times, with new streams arriving
throughout (before the kill, while the dead worker's lease lapses, while its replacement starts).

Every stream must answer 200 and end with `data: [DONE]` after its finish chunk: no 5xx, no stream
cut short, nothing lost, and the text a client saw equal to the one result Redis recorded (a rerun
after the kill is not repeated to the client). Real Redis, two real `hotswap worker` processes,
a real scheduler, the API over HTTP; workers are restarted when they die, as a supervisor would."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from hotswap import keys
from tests.stack import Stack, stack_env

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
ROUNDS = 3
QUESTIONS = ["Name a planet.", "What is 3 + 4?", "Say hello in Spanish.", "Name a fruit.", "Count to five."]


@pytest.fixture
def stack_and_api(demo_model_dir, tmp_path):
    import redis

    from api.app import create_app
    from api.auth import create_key
    from hotswap.settings import Settings
    from tests.api.conftest import LiveServer
    from tests.servers import redis_server

    storage = {"HOTSWAP_STORAGE_URL": f"file://{tmp_path / 'store'}"}
    with redis_server() as url:
        settings = Settings(redis_url=url, storage_url=storage["HOTSWAP_STORAGE_URL"], base_model_dir=demo_model_dir,
                            cache_dir=tmp_path / "api-cache", data_dir=tmp_path / "api-data")
        client = redis.Redis.from_url(url)
        env = stack_env(url, storage, demo_model_dir, tmp_path / "worker-cache")
        with Stack(env, tmp_path / "logs", workers=2, supervise=True) as stack, \
                LiveServer(create_app(settings)) as api:
            yield stack, api.url, create_key(client, "acme"), client


async def one_stream(url: str, key: str, question: str) -> dict:
    body = {"model": BASE, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    out = {"status": None, "text": "", "finish": None, "errors": [], "done": False, "id": None}
    try:
        async with httpx.AsyncClient(timeout=180) as client, client.stream(
                "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                out["errors"].append((await resp.aread()).decode()[:300])
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["errors"].append(event["error"])
                    continue
                out["id"] = event["id"]
                choice = event["choices"][0]
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
    except httpx.HTTPError as exc:
        out["errors"].append(f"transport: {exc!r}")
    return out


async def one_round(stack: Stack, url: str, key: str, redis_client) -> tuple[list[dict], str]:
    """Streams every 0.3 s for 12 s; 2 s in, SIGKILL the worker running the most of them."""
    tasks, victim = [], None
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 12:
        tasks.append(asyncio.create_task(one_stream(url, key, f"{QUESTIONS[i % len(QUESTIONS)]} ({uuid.uuid4().hex[:4]})")))
        i += 1
        if victim is None and time.monotonic() - start > 2:
            victim = running_worker(redis_client)
            if victim is not None:
                stack.kill_worker(stack.worker_index(victim))
        await asyncio.sleep(0.3)
    return await asyncio.gather(*tasks), victim


def running_worker(redis_client) -> str | None:
    """The worker with the most requests in flight."""
    from scheduler.workers import live_workers

    workers = sorted(live_workers(redis_client), key=lambda w: w.inflight, reverse=True)
    return workers[0].id if workers and workers[0].inflight else None


def recorded_result(redis_client, request_id: str) -> list[dict]:
    entries = redis_client.xrange(keys.output(request_id))
    return [json.loads(fields[b"result"]) for _, fields in entries if b"result" in fields]


def test_kill_9_with_streams_open_ends_every_stream_cleanly(stack_and_api):
    stack, url, key, redis_client = stack_and_api
    victims = []
    for round_no in range(ROUNDS):
        stack.wait_workers(2, timeout=180)  # the replacement of the last victim is up
        streams, victim = asyncio.run(one_round(stack, url, key, redis_client))
        assert victim is not None, f"round {round_no}: no worker had requests in flight to kill"
        victims.append(victim)
        bad = [s for s in streams if s["status"] != 200 or s["errors"] or not s["done"] or s["finish"] is None]
        assert not bad, f"round {round_no}: {len(bad)} of {len(streams)} streams failed, e.g. {bad[:3]}"
        for s in streams:  # nothing duplicated: the text sent is the one result recorded
            (result,) = recorded_result(redis_client, "req_" + s["id"].split("-", 1)[1])
            assert result["status"] == "completed" and result["text"] == s["text"]
    assert len(set(victims)) == ROUNDS  # a different worker process each time
    assert stack.restarts >= ROUNDS
    assert redis_client.zcard(keys.DEAD) == 0  # one crash per request at most: nothing dead-lettered
