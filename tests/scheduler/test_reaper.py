"""`scheduler.workers` on a real Redis server: registration, leases, `live_workers` and the reaper."""

from __future__ import annotations

import time

import pytest

from hotswap.protocol import GenerationRequest, ModelTarget, SamplingSpec
from hotswap import keys
from scheduler.queues import Queues
from scheduler.workers import WorkerInfo, deregister, heartbeat, live_workers, reap, rejoin

BASE = "tiny"
LORA = "lora:t1/a@1"
LONG, SHORT = 60.0, 0.2  # lease seconds


def info(wid="w1", base=BASE, **kw) -> WorkerInfo:
    return WorkerInfo(id=wid, base_model=base, queue=keys.celery_queue(base, wid), max_inflight=8, **kw)


@pytest.fixture
def queues(redis_client) -> Queues:
    return Queues(redis_client, result_ttl_s=60)


def submit(queues: Queues, model_key="base") -> GenerationRequest:
    req = GenerationRequest(tenant="t1", base_model=BASE, model=model_key, target=ModelTarget.from_key(model_key),
                            prompt_token_ids=[1], sampling=SamplingSpec(max_tokens=2))
    queues.submit(req)
    return req


def assign(queues: Queues, wid: str, model_key="base", claim=False) -> GenerationRequest:
    req = submit(queues, model_key)
    assert queues.take(keys.queue(BASE, "realtime", model_key), 1, wid, 100) == [req.id]
    if claim:
        assert queues.claim(req.id, wid) is not None
    return req


def do_reap(redis_client, queues, claim_timeout_s=60.0, max_attempts=3) -> dict:
    return reap(redis_client, queues, max_attempts=max_attempts, isolate_after=2, claim_timeout_s=claim_timeout_s)


def lapse(redis_client, wid: str) -> None:
    """Let a short lease run out (and make sure it did)."""
    time.sleep(SHORT + 0.1)
    assert not redis_client.exists(keys.worker_alive(wid))


# -- registration and heartbeats --------------------------------------------------------------------


def test_first_heartbeat_registers_and_takes_the_lease(redis_client):
    assert heartbeat(redis_client, info(), LONG, first=True) is True
    assert redis_client.exists(keys.worker_alive("w1"))
    assert 0 < redis_client.pttl(keys.worker_alive("w1")) <= LONG * 1000
    assert WorkerInfo.model_validate_json(redis_client.hget(keys.WORKERS, "w1")).queue == keys.celery_queue(BASE, "w1")


def test_first_heartbeat_is_refused_while_another_holds_the_id(redis_client):
    assert heartbeat(redis_client, info(), LONG, first=True)
    assert heartbeat(redis_client, info(), LONG, first=True) is False


def test_heartbeat_renews_the_lease(redis_client):
    heartbeat(redis_client, info(), 0.4, first=True)
    for _ in range(4):  # 0.6 s in all: longer than one lease
        time.sleep(0.15)
        assert heartbeat(redis_client, info(), 0.4) is True
    assert redis_client.exists(keys.worker_alive("w1"))


def test_heartbeat_after_a_lapse_returns_false(redis_client):
    heartbeat(redis_client, info(), SHORT, first=True)
    lapse(redis_client, "w1")
    assert heartbeat(redis_client, info(), LONG) is False
    assert not redis_client.exists(keys.worker_alive("w1"))


def test_heartbeat_without_registering_first_returns_false(redis_client):
    assert heartbeat(redis_client, info(), LONG) is False
    assert live_workers(redis_client) == []


def test_deregister_removes_lease_and_registration(redis_client):
    heartbeat(redis_client, info(), LONG, first=True)
    deregister(redis_client, "w1")
    assert live_workers(redis_client) == []
    assert not redis_client.hexists(keys.WORKERS, "w1")


# -- live_workers -----------------------------------------------------------------------------------


def test_live_workers_shows_inflight_counts_and_models_from_redis(redis_client, queues):
    heartbeat(redis_client, info(weights="base", holds=[LORA]), LONG, first=True)
    assign(queues, "w1", LORA)
    assign(queues, "w1", LORA, claim=True)
    assign(queues, "w1", "base")
    (w,) = live_workers(redis_client)
    assert (w.id, w.inflight, w.inflight_models, w.holds, w.isolated) == ("w1", 3, {LORA: 2, "base": 1}, [LORA], False)


def test_live_workers_drops_finished_models_and_shows_isolation(redis_client, queues):
    heartbeat(redis_client, info(), LONG, first=True)
    req = assign(queues, "w1", claim=True)
    queues.requeue(req.id, "w1", crashed=False)
    assert live_workers(redis_client)[0].inflight_models == {}
    queues.take(keys.queue(BASE, "realtime", "base"), 1, "w1", 8, isolate=True)
    (w,) = live_workers(redis_client)
    assert w.isolated and w.inflight == 1


def test_live_workers_ignores_the_worker_side_counts(redis_client):
    heartbeat(redis_client, info(inflight=5, inflight_models={"base": 5}, isolated=True), LONG, first=True)
    (w,) = live_workers(redis_client)
    assert (w.inflight, w.inflight_models, w.isolated) == (0, {}, False)


def test_live_workers_filters_by_base_and_by_lease(redis_client):
    heartbeat(redis_client, info("w1"), LONG, first=True)
    heartbeat(redis_client, info("w2", base="other"), LONG, first=True)
    heartbeat(redis_client, info("w3"), SHORT, first=True)
    assert {w.id for w in live_workers(redis_client)} == {"w1", "w2", "w3"}
    assert {w.id for w in live_workers(redis_client, BASE)} == {"w1", "w3"}
    lapse(redis_client, "w3")
    assert {w.id for w in live_workers(redis_client, BASE)} == {"w1"}


# -- the reaper -------------------------------------------------------------------------------------


def test_reaper_leaves_live_workers_alone(redis_client, queues):
    heartbeat(redis_client, info(), LONG, first=True)
    req = assign(queues, "w1", claim=True)
    assert do_reap(redis_client, queues)["workers"] == 0
    assert queues.state(req.id)["state"] == "running"


def test_reaper_requeues_a_dead_workers_running_requests_as_an_attempt(redis_client, queues):
    heartbeat(redis_client, info(), SHORT, first=True)
    req = assign(queues, "w1", LORA, claim=True)
    lapse(redis_client, "w1")
    counts = do_reap(redis_client, queues)
    assert counts["workers"] == 1 and counts["requeued"] == 1
    st = queues.state(req.id)
    assert (st["state"], st["attempts"], st["worker"]) == ("queued", "1", "")
    assert queues.stats(BASE)[0].model_key == LORA


def test_reaper_requeues_assigned_but_unclaimed_requests_without_an_attempt(redis_client, queues):
    heartbeat(redis_client, info(), SHORT, first=True)
    req = assign(queues, "w1")
    lapse(redis_client, "w1")
    do_reap(redis_client, queues)
    st = queues.state(req.id)
    assert (st["state"], st["attempts"]) == ("queued", "0")


def test_reaper_removes_a_dead_workers_registration_and_keys(redis_client, queues):
    heartbeat(redis_client, info(), SHORT, first=True)
    assign(queues, "w1", LORA, claim=True)
    redis_client.rpush(keys.worker_cancels("w1"), "x")
    redis_client.set(keys.worker_isolated("w1"), "x")
    redis_client.rpush(keys.celery_queue(BASE, "w1"), "a celery message")
    lapse(redis_client, "w1")
    do_reap(redis_client, queues)
    assert not redis_client.hexists(keys.WORKERS, "w1")
    for key in (keys.worker_inflight("w1"), keys.worker_models("w1"), keys.worker_cancels("w1"),
                keys.worker_isolated("w1"), keys.celery_queue(BASE, "w1")):
        assert not redis_client.exists(key), key
    assert do_reap(redis_client, queues)["workers"] == 0


def test_reaper_takes_only_the_dead_workers_requests(redis_client, queues):
    heartbeat(redis_client, info("dead"), SHORT, first=True)
    heartbeat(redis_client, info("live"), LONG, first=True)
    lost = assign(queues, "dead", claim=True)
    kept = assign(queues, "live", claim=True)
    lapse(redis_client, "dead")
    do_reap(redis_client, queues)
    assert queues.state(lost.id)["state"] == "queued"
    assert queues.state(kept.id)["state"] == "running"
    assert [w.id for w in live_workers(redis_client)] == ["live"]


def test_reaper_dead_letters_a_request_that_crashed_too_often(redis_client, queues):
    heartbeat(redis_client, info(), SHORT, first=True)
    req = assign(queues, "w1", claim=True)
    lapse(redis_client, "w1")
    assert do_reap(redis_client, queues, max_attempts=1)["dead"] == 1
    assert queues.result(req.id).error["code"] == "dead_letter"
    assert redis_client.zscore(keys.DEAD, req.id) is not None


def test_reaper_requeues_stale_assignments_without_an_attempt(redis_client, queues):
    heartbeat(redis_client, info(), LONG, first=True)
    stale = assign(queues, "w1")
    claimed = assign(queues, "w1", claim=True)
    time.sleep(0.15)
    fresh = assign(queues, "w1")
    counts = do_reap(redis_client, queues, claim_timeout_s=0.1)
    assert counts["requeued"] == 1 and counts["workers"] == 0
    st = queues.state(stale.id)
    assert (st["state"], st["attempts"]) == ("queued", "0")
    assert queues.state(claimed.id)["state"] == "running"
    assert queues.state(fresh.id)["state"] == "assigned"
    assert queues.inflight("w1") == {claimed.id, fresh.id}
    assert queues.claim(stale.id, "w1") is None  # its late Celery message finds nothing to run


def test_re_registering_after_a_lapse_does_not_strand_the_old_requests(redis_client, queues):
    heartbeat(redis_client, info(), SHORT, first=True)
    req = assign(queues, "w1", claim=True)
    lapse(redis_client, "w1")
    assert heartbeat(redis_client, info(), SHORT) is False  # the worker notices and drops its work ...
    assert rejoin(redis_client, queues, info(), LONG) == 1  # ... and comes back at once, handing it back
    do_reap(redis_client, queues)
    assert queues.state(req.id)["state"] == "queued"
    assert queues.inflight("w1") == set()


def test_a_dead_lettered_request_is_an_error_in_metrics(redis_client, queues, tmp_path):
    from prometheus_client import generate_latest

    from api.metrics import make_registry
    from hotswap.settings import Settings
    from scheduler.dispatcher import Dispatcher

    seen: list[str] = []
    heartbeat(redis_client, info(), SHORT, first=True)
    req = assign(queues, "w1", model_key=LORA, claim=True)
    lapse(redis_client, "w1")
    reap(redis_client, queues, max_attempts=1, isolate_after=2, claim_timeout_s=60.0, on_dead=seen.append)
    assert seen == [req.id]

    # Through the dispatcher: counted as request_errors_total{type="dead_letter"} of its model.
    heartbeat(redis_client, info("w2"), SHORT, first=True)
    other = assign(queues, "w2", claim=True)
    lapse(redis_client, "w2")
    settings = Settings(max_attempts=1, cache_dir=tmp_path / "cache", data_dir=tmp_path / "data")
    dispatcher = Dispatcher(redis_client, None, settings)
    assert dispatcher.reap()["dead"] == 1
    dispatcher.metrics.flush(redis_client)
    text = generate_latest(make_registry(redis_client)).decode()
    line = next(x for x in text.splitlines() if x.startswith("hotswap:request_errors_total{"))
    assert 'type="dead_letter"' in line and 'model="base"' in line and 'priority="realtime"' in line
    assert line.endswith(" 1.0") and queues.result(other.id).error["code"] == "dead_letter"
