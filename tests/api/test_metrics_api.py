"""GET /metrics over real HTTP: the whole system's state, read from a real Redis that the real
queue and worker functions wrote (no auth, Prometheus text format)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotswap.metrics import MetricsBuffer, record_finished
from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec
from hotswap import keys
from scheduler.queues import Queues
from scheduler.workers import WorkerInfo, heartbeat
from tests.api.conftest import LiveServer

BASE = "smollm2-135m-instruct"


@pytest.fixture
def metrics_api(redis_url, redis_client, demo_model_dir, tmp_path):
    from api.app import create_app
    from hotswap.settings import Settings

    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path / 'store'}", base_model_dir=demo_model_dir,
                        cache_dir=tmp_path / "cache", data_dir=tmp_path / "data")
    with LiveServer(create_app(settings)) as server:
        yield server


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}"""
    resp = httpx.get(url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def request(model_key: str, priority: str = "realtime", tenant: str = "acme") -> GenerationRequest:
    return GenerationRequest(tenant=tenant, base_model=BASE, model=model_key, target=ModelTarget.from_key(model_key),
                             prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=4), priority=priority)


def test_empty_system(metrics_api):
    got = scrape(metrics_api.url)
    assert got["hotswap:workers_up"] == {(("base_model", BASE),): 0}
    assert got["hotswap:dead_letter_requests"] == {(): 0}
    assert got["hotswap:scheduler_up"] == {(): 0}
    assert "hotswap:num_requests_waiting" not in got  # no series yet, but the family is declared
    assert "hotswap:time_to_first_token_seconds_bucket" not in got


def test_live_state_and_aggregated_observations(metrics_api, redis_client):
    queues = Queues(redis_client)
    lora = "lora:acme/bot@1"
    for _ in range(3):
        queues.submit(request("base"))
    for _ in range(2):
        queues.submit(request(lora, "batch"))
    queues.submit(request(lora))

    w1 = WorkerInfo(id="gpu0", base_model=BASE, queue=keys.celery_queue(BASE, "gpu0"), max_inflight=8)
    w2 = WorkerInfo(id="gpu1", base_model=BASE, queue=keys.celery_queue(BASE, "gpu1"), max_inflight=4)
    gone = WorkerInfo(id="gone", base_model=BASE, queue=keys.celery_queue(BASE, "gone"), max_inflight=4)
    for w in (w1, w2, gone):
        assert heartbeat(redis_client, w, lease_s=30, first=True)
    redis_client.delete(keys.worker_alive("gone"))  # lease lapsed: not counted
    # The dispatcher hands out work: 2 base requests to gpu0, the real-time LoRA one to gpu1.
    assert len(queues.take(keys.queue(BASE, "realtime", "base"), 2, "gpu0", 8)) == 2
    assert len(queues.take(keys.queue(BASE, "realtime", lora), 5, "gpu1", 4)) == 1
    # A request whose only attempt crashed its worker is dead-lettered.
    [rid] = queues.take(keys.queue(BASE, "realtime", "base"), 1, "gpu1", 4)
    assert queues.claim(rid, "gpu1") is not None
    assert queues.requeue(rid, "gpu1", crashed=True, max_attempts=1) == "dead"
    redis_client.set(keys.SCHEDULER_ALIVE, 1, px=30000)

    # Observations from two processes (a dispatcher and a worker), flushed into the same hashes.
    dispatcher, worker = MetricsBuffer(), MetricsBuffer()
    dispatcher.observe("batch_size", 2, model="base", priority="realtime")
    dispatcher.observe("batch_size", 1, model=lora, priority="realtime")
    dispatcher.flush(redis_client)
    done = GenerationResult(id="r1", status="completed", finish_reason="length", prompt_tokens=3, completion_tokens=4,
                            queued_at=10.0, started_at=10.1, first_token_at=10.2, finished_at=10.5)
    record_finished(worker, done, "base", "realtime", itl_s=[0.1, 0.1, 0.1])
    record_finished(worker, done, "base", "realtime", itl_s=[0.2])
    failed = GenerationResult(id="r2", status="failed", error={"code": "model_unavailable", "message": "x"},
                              queued_at=10.0)
    record_finished(worker, failed, lora, "batch", itl_s=None)
    worker.inc("adapter_loads_total", model=lora)
    worker.flush(redis_client)

    got = scrape(metrics_api.url)
    assert got["hotswap:num_requests_waiting"] == {
        (("model", lora), ("priority", "batch")): 2,
    }  # the base queue is empty now (2 taken, 1 dead), the real-time LoRA one too
    assert got["hotswap:num_requests_running"] == {(("model", "base"),): 2, (("model", lora),): 1}
    assert got["hotswap:workers_up"] == {(("base_model", BASE),): 2}
    assert got["hotswap:worker_inflight"] == {(("worker", "gpu0"),): 2, (("worker", "gpu1"),): 1}
    assert got["hotswap:worker_max_inflight"] == {(("worker", "gpu0"),): 8, (("worker", "gpu1"),): 4}
    assert got["hotswap:dead_letter_requests"] == {(): 1}
    assert got["hotswap:scheduler_up"] == {(): 1}

    base_rt = (("model", "base"), ("priority", "realtime"))
    assert got["hotswap:prompt_tokens_total"] == {base_rt: 6}
    assert got["hotswap:generation_tokens_total"] == {base_rt: 8}
    assert got["hotswap:request_success_total"] == {(("finished_reason", "length"), *base_rt): 2}
    assert got["hotswap:request_errors_total"] == {
        (("model", lora), ("priority", "batch"), ("type", "model_unavailable")): 1}
    assert got["hotswap:adapter_loads_total"] == {(("model", lora),): 1}

    # Histograms: cumulative buckets, +Inf == count, sum.
    ttft = got["hotswap:time_to_first_token_seconds_bucket"]
    assert ttft[(("le", "0.1"), *base_rt)] == 0
    assert ttft[(("le", "0.25"), *base_rt)] == 2
    assert ttft[(("le", "+Inf"), *base_rt)] == 2
    assert got["hotswap:time_to_first_token_seconds_count"] == {base_rt: 2}
    assert got["hotswap:time_to_first_token_seconds_sum"][base_rt] == pytest.approx(0.4)
    itl = got["hotswap:inter_token_latency_seconds_bucket"]
    assert (itl[(("le", "0.1"), *base_rt)], itl[(("le", "0.2"), *base_rt)], itl[(("le", "+Inf"), *base_rt)]) == (3, 4, 4)
    sizes = got["hotswap:batch_size_bucket"]
    assert sizes[(("le", "1.0"), ("model", lora), ("priority", "realtime"))] == 1
    assert sizes[(("le", "1.0"), *base_rt)] == 0 and sizes[(("le", "2.0"), *base_rt)] == 1
    assert got["hotswap:e2e_request_latency_seconds_count"] == {base_rt: 2}  # the failed one is not a latency

    # Another replica, same Redis: the same numbers.
    from api.app import create_app

    with LiveServer(create_app(metrics_api.server.config.app.state.settings)) as other:
        assert scrape(other.url) == got


def test_redis_down_is_a_503_not_a_500(metrics_api, redis_url, monkeypatch):
    import redis

    app = metrics_api.server.config.app
    monkeypatch.setattr(app.state, "metrics_registry", None, raising=False)
    real = app.state.redis
    app.state.redis = redis.Redis(port=1, socket_connect_timeout=0.5)
    try:
        resp = httpx.get(metrics_api.url + "/metrics")
    finally:
        app.state.redis = real
        app.state.metrics_registry = None
    assert resp.status_code == 503 and "Redis" in resp.text
