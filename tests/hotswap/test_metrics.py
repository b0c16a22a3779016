"""MetricsBuffer (local accumulation, one-pipeline flush into Redis hashes) and record_finished."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from hotswap.metrics import METRICS, PREFIX, MetricsBuffer, bucket_bound, labels_field, record_finished
from hotswap.protocol import GenerationResult

BASE = {"model": "base", "priority": "realtime"}
LORA = {"model": "lora:acme/bot@1", "priority": "batch"}


def read(client, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(PREFIX + name).items()}


def field(labels: dict, part: str | None = None) -> str:
    return labels_field(labels) + (f"|{part}" if part else "")


@pytest.mark.parametrize("value, bound", [
    (0.0, "0.01"), (0.01, "0.01"), (0.0100001, "0.025"), (0.3, "0.3"), (79.9, "80.0"), (80.0, "80.0"),
    (80.01, "+Inf"), (1e9, "+Inf"),
])
def test_bucket_bounds_are_inclusive_upper_edges(value, bound):
    assert bucket_bound(METRICS["inter_token_latency_seconds"], value) == bound


def test_every_histogram_has_sorted_buckets_and_counters_end_in_total():
    for m in METRICS.values():
        if m.kind == "histogram":
            assert m.buckets and list(m.buckets) == sorted(set(m.buckets))
        else:
            assert m.name.endswith("_total") and not m.buckets


def test_flush_writes_counters_and_histograms_in_one_pipeline(redis_client):
    buf = MetricsBuffer()
    buf.inc("prompt_tokens_total", 12, **BASE)
    buf.inc("prompt_tokens_total", 3, **BASE)
    buf.inc("prompt_tokens_total", 7, **LORA)
    buf.observe("batch_size", 3, **BASE)
    buf.observe("batch_size", 4, **BASE)
    buf.observe("batch_size", 1000, **BASE)
    buf.observe("time_to_first_token_seconds", 0.25, **LORA)
    buf.observe("time_to_first_token_seconds", 0.125, **LORA)
    assert buf.flush(redis_client) == 2 + 4 + 3  # fields changed: counters, batch_size, ttft
    assert len(buf) == 0 and buf.flush(redis_client) == 0  # nothing pending: no round trip

    assert read(redis_client, "prompt_tokens_total") == {field(BASE): "15", field(LORA): "7"}
    assert read(redis_client, "batch_size") == {
        field(BASE, "le=4.0"): "2", field(BASE, "le=+Inf"): "1", field(BASE, "sum"): "1007", field(BASE, "count"): "3",
    }
    ttft = read(redis_client, "time_to_first_token_seconds")
    assert ttft[field(LORA, "le=0.25")] == "2" and ttft[field(LORA, "count")] == "2"
    assert float(ttft[field(LORA, "sum")]) == pytest.approx(0.375)

    # A second flush adds to what is there (another process flushing the same hashes would too).
    other = MetricsBuffer()
    other.inc("prompt_tokens_total", 5, **BASE)
    other.observe("time_to_first_token_seconds", 0.5, **LORA)
    other.flush(redis_client)
    assert read(redis_client, "prompt_tokens_total")[field(BASE)] == "20"
    ttft = read(redis_client, "time_to_first_token_seconds")
    assert ttft[field(LORA, "le=0.5")] == "1" and ttft[field(LORA, "count")] == "3"
    assert float(ttft[field(LORA, "sum")]) == pytest.approx(0.875)


def test_integral_sums_stay_float_fields(redis_client):
    """A sum that happens to be whole must not switch its field to HINCRBY (Redis would refuse it
    once the field holds a fraction)."""
    buf = MetricsBuffer()
    buf.observe("e2e_request_latency_seconds", 1.5, **BASE)
    buf.flush(redis_client)
    buf.observe("e2e_request_latency_seconds", 2.0, **BASE)
    buf.flush(redis_client)
    assert float(read(redis_client, "e2e_request_latency_seconds")[field(BASE, "sum")]) == 3.5


def test_unknown_names_wrong_labels_and_bad_amounts_are_refused():
    buf = MetricsBuffer()
    with pytest.raises(ValueError, match="not a hotswap counter"):
        buf.inc("prompt_tokens", **BASE)
    with pytest.raises(ValueError, match="not a hotswap histogram"):
        buf.observe("prompt_tokens_total", 1.0, **BASE)
    with pytest.raises(ValueError, match="takes labels"):
        buf.inc("prompt_tokens_total", 1, model="base")
    with pytest.raises(ValueError, match="cannot grow"):
        buf.inc("prompt_tokens_total", -1, **BASE)
    with pytest.raises(ValueError, match="cannot grow"):
        buf.inc("prompt_tokens_total", 0.5, **BASE)
    assert len(buf) == 0


def test_a_failed_flush_keeps_the_increments(redis_client):
    from tests.servers import free_port

    buf = MetricsBuffer()
    buf.inc("adapter_loads_total", model="lora:acme/bot@1")
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        buf.flush(dead)
    buf.inc("adapter_loads_total", model="lora:acme/bot@1")
    buf.flush(redis_client)
    assert read(redis_client, "adapter_loads_total") == {field({"model": "lora:acme/bot@1"}): "2"}


def test_concurrent_updates_are_not_lost(redis_client):
    buf = MetricsBuffer()

    def work():
        for _ in range(2000):
            buf.inc("generation_tokens_total", 1, **BASE)
            buf.observe("inter_token_latency_seconds", 0.02, **BASE)

    def flusher():
        for _ in range(50):
            buf.flush(redis_client)

    threads = [threading.Thread(target=work) for _ in range(4)] + [threading.Thread(target=flusher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buf.flush(redis_client)
    assert read(redis_client, "generation_tokens_total") == {field(BASE): "8000"}
    itl = read(redis_client, "inter_token_latency_seconds")
    assert itl[field(BASE, "count")] == "8000" and itl[field(BASE, "le=0.025")] == "8000"


def _result(**kw) -> GenerationResult:
    base = dict(id="req_1", status="completed", finish_reason="stop", prompt_tokens=11, completion_tokens=4,
                queued_at=100.0, started_at=100.5, first_token_at=101.0, finished_at=103.0)
    return GenerationResult(**{**base, **kw})


def _flushed(redis_client, buf) -> dict[str, dict[str, str]]:
    buf.flush(redis_client)
    return {name: read(redis_client, name) for name in METRICS if redis_client.exists(PREFIX + name)}


def test_record_finished_completed(redis_client):
    buf = MetricsBuffer()
    record_finished(buf, _result(), "lora:acme/bot@1", "batch", itl_s=[0.02, 0.3, 0.04])
    got = _flushed(redis_client, buf)
    assert got["request_queue_time_seconds"] == {field(LORA, "le=0.5"): "1", field(LORA, "sum"): "0.5",
                                                 field(LORA, "count"): "1"}
    assert got["time_to_first_token_seconds"] == {field(LORA, "le=1.0"): "1", field(LORA, "sum"): "1",
                                                  field(LORA, "count"): "1"}
    assert got["e2e_request_latency_seconds"] == {field(LORA, "le=5.0"): "1", field(LORA, "sum"): "3",
                                                  field(LORA, "count"): "1"}
    itl = got["inter_token_latency_seconds"]
    assert (itl[field(LORA, "le=0.025")], itl[field(LORA, "le=0.05")], itl[field(LORA, "le=0.3")]) == ("1", "1", "1")
    assert itl[field(LORA, "count")] == "3" and float(itl[field(LORA, "sum")]) == pytest.approx(0.36)
    assert got["prompt_tokens_total"] == {field(LORA): "11"}
    assert got["generation_tokens_total"] == {field(LORA): "4"}
    assert got["request_success_total"] == {field({**LORA, "finished_reason": "stop"}): "1"}
    assert "request_errors_total" not in got


def test_record_finished_counts_prefix_cache_queries_and_hits(redis_client):
    """vLLM's prefix-cache counters, in tokens, per base model: a started prompt is a query of its
    length, its cached tokens are hits; a request no engine took queries nothing."""
    buf = MetricsBuffer()
    record_finished(buf, _result(cached_tokens=0), "base", "realtime", base="smol")
    record_finished(buf, _result(prompt_tokens=40, cached_tokens=32), "base", "batch", base="smol")
    record_finished(buf, _result(started_at=None, status="failed", error={"code": "x"}), "base", "batch", base="smol")
    got = _flushed(redis_client, buf)
    assert got["prefix_cache_queries_total"] == {field({"base": "smol"}): "51"}
    assert got["prefix_cache_hits_total"] == {field({"base": "smol"}): "32"}


def test_record_finished_failed_before_running(redis_client):
    """A request failed before any engine took it (e.g. its adapter could not be fetched): an
    error of its code, no latency that would look like a fast answer, no prompt tokens processed."""
    buf = MetricsBuffer()
    record_finished(buf, _result(status="failed", finish_reason=None, completion_tokens=0, started_at=None,
                                 first_token_at=None, error={"code": "model_unavailable", "message": "gone"}),
                    "base", "realtime", itl_s=None)
    got = _flushed(redis_client, buf)
    assert got == {"request_errors_total": {field({**BASE, "type": "model_unavailable"}): "1"}}


def test_record_finished_cancelled_counts_as_abort(redis_client):
    buf = MetricsBuffer()
    record_finished(buf, _result(status="cancelled", finish_reason="abort", first_token_at=None,
                                 completion_tokens=0), "base", "realtime", itl_s=[])
    got = _flushed(redis_client, buf)
    assert got["request_success_total"] == {field({**BASE, "finished_reason": "abort"}): "1"}
    assert set(got) == {"request_success_total", "request_queue_time_seconds", "prompt_tokens_total"}


def test_labels_field_is_canonical_json():
    assert labels_field({"priority": "batch", "model": "base"}) == '{"model":"base","priority":"batch"}'
    assert json.loads(labels_field({})) == {}
