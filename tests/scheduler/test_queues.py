"""`scheduler.queues.Queues` on a real Redis server: every state change of a request (Lua scripts)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec
from hotswap import keys
from scheduler.queues import QueueFull, Queues

BASE = "tiny"
LORA = "lora:t1/a@1"


def make_req(tenant="t1", model_key="base", priority="realtime", created_at=None, batch_id=None) -> GenerationRequest:
    return GenerationRequest(tenant=tenant, base_model=BASE, model=model_key, target=ModelTarget.from_key(model_key),
                             prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=4), priority=priority,
                             created_at=time.time() if created_at is None else created_at, batch_id=batch_id)


def result(rid: str, status="completed", **kw) -> GenerationResult:
    fields = {"id": rid, "status": status, "text": "hi", "token_ids": [7], "finish_reason": "stop", **kw}
    return GenerationResult(**fields)


def alive(r: redis.Redis, wid: str) -> str:
    r.set(keys.worker_alive(wid), "1", px=60_000)
    return wid


@pytest.fixture
def queues(redis_client) -> Queues:
    return Queues(redis_client, result_ttl_s=60)


@pytest.fixture
def w1(redis_client) -> str:
    return alive(redis_client, "w1")


def submit(queues: Queues, n=1, **kw) -> list[GenerationRequest]:
    reqs = []
    for i in range(n):
        req = make_req(**{"created_at": 1000.0 + i, **kw})
        queues.submit(req)
        reqs.append(req)
    return reqs


def qname(model_key="base", qclass="realtime") -> str:
    return keys.queue(BASE, qclass, model_key)


def running(queues: Queues, wid: str, **kw) -> GenerationRequest:
    """A submitted request taken and claimed by `wid`."""
    req = make_req(**kw)
    queues.submit(req)
    assert queues.take(keys.queue(BASE, req.priority, req.target.key), 1, wid, 100) == [req.id]
    assert queues.claim(req.id, wid) is not None
    return req


def out_results(r: redis.Redis, rid: str) -> list[GenerationResult]:
    return [GenerationResult.model_validate_json(f[b"result"]) for _, f in r.xrange(keys.output(rid)) if b"result" in f]


# -- submit and stats -------------------------------------------------------------------------------


def test_submit_shows_in_stats_with_length_oldest_score_class_and_model(queues):
    submit(queues, 2, model_key=LORA, priority="batch")
    submit(queues, 1)
    stats = {s.name: s for s in queues.stats(BASE)}
    lora = stats[qname(LORA, "batch")]
    assert (lora.base_model, lora.qclass, lora.model_key, lora.length, lora.oldest_score) == (
        BASE, "batch", LORA, 2, 1000.0)
    base = stats[qname()]
    assert (base.qclass, base.model_key, base.length) == ("realtime", "base", 1)
    assert queues.stats("other-base") == []


def test_submit_sets_state_queued_and_counts_waiting(queues):
    (req,) = submit(queues, tenant="acme")
    st = queues.state(req.id)
    assert (st["state"], st["qclass"], st["attempts"], st["worker"]) == ("queued", "realtime", "0", "")
    assert queues.waiting("realtime") == 1 and queues.waiting("realtime", "acme") == 1
    assert queues.waiting("batch") == 0


def test_submit_twice_with_one_id_is_refused(queues):
    (req,) = submit(queues)
    with pytest.raises(ValueError, match="already exists"):
        queues.submit(req)
    assert queues.waiting("realtime") == 1


def test_submit_wakes_the_dispatcher(queues, redis_client):
    submit(queues)
    assert redis_client.llen(keys.WAKE) == 1


# -- take -------------------------------------------------------------------------------------------


def test_take_moves_oldest_first_up_to_n(queues, w1):
    reqs = [make_req(created_at=t) for t in (30.0, 10.0, 20.0)]
    for r in reqs:
        queues.submit(r)
    assert queues.take(qname(), 2, w1, 100) == [reqs[1].id, reqs[2].id]
    assert queues.state(reqs[1].id)["state"] == "assigned" and queues.state(reqs[1].id)["worker"] == w1
    assert queues.state(reqs[0].id)["state"] == "queued"
    assert queues.inflight(w1) == {reqs[1].id, reqs[2].id}
    assert queues.waiting("realtime") == 1


def test_take_never_exceeds_the_workers_room(queues, w1):
    submit(queues, 10)
    assert len(queues.take(qname(), 8, w1, 3)) == 3
    assert queues.take(qname(), 8, w1, 3) == []
    assert len(queues.take(qname(), 8, w1, 5)) == 2
    assert len(queues.inflight(w1)) == 5


def test_take_counts_inflight_across_queues(queues, w1):
    submit(queues, 3)
    submit(queues, 3, model_key=LORA)
    assert len(queues.take(qname(), 3, w1, 4)) == 3
    assert len(queues.take(qname(LORA), 3, w1, 4)) == 1


def test_take_records_the_model_on_the_worker(queues, w1, redis_client):
    submit(queues, 2, model_key=LORA)
    queues.take(qname(LORA), 2, w1, 10)
    assert redis_client.hget(keys.worker_models(w1), LORA) == b"2"


@pytest.mark.parametrize("n", [0, -1])
def test_take_of_nothing_takes_nothing(queues, w1, n):
    submit(queues, 2)
    assert queues.take(qname(), n, w1, 10) == []
    assert queues.stats(BASE)[0].length == 2


def test_take_refuses_a_worker_without_its_alive_key(queues, redis_client):
    submit(queues, 2)
    assert queues.take(qname(), 2, "ghost", 10) == []
    assert queues.stats(BASE)[0].length == 2
    assert queues.inflight("ghost") == set()


def test_take_of_the_whole_queue_removes_it_from_the_index(queues, w1, redis_client):
    submit(queues, 2)
    queues.take(qname(), 5, w1, 10)
    assert queues.stats(BASE) == []
    assert redis_client.smembers(keys.queue_index(BASE)) == set()


def test_take_with_isolate_marks_the_worker(queues, w1, redis_client):
    (req,) = submit(queues)
    queues.take(qname(), 1, w1, 10, isolate=True)
    assert redis_client.get(keys.worker_isolated(w1)) == req.id.encode()


def _take_all(url: str, wid: str, got: list[str], barrier: threading.Barrier) -> None:
    r = redis.Redis.from_url(url)
    qs = Queues(r)
    alive(r, wid)
    barrier.wait()
    while ids := qs.take(qname(), 3, wid, 10_000):
        got.extend(ids)
    r.close()


def test_concurrent_takes_never_hand_out_one_id_twice(queues, redis_url):
    ids = {r.id for r in submit(queues, 600)}
    got = {wid: [] for wid in ("w1", "w2", "w3")}
    barrier = threading.Barrier(len(got))
    threads = [threading.Thread(target=_take_all, args=(redis_url, wid, lst, barrier)) for wid, lst in got.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [i for lst in got.values() for i in lst]
    assert len(everything) == len(set(everything)) == 600
    assert set(everything) == ids
    assert all(got.values()), "every taker should have won some"
    assert queues.waiting("realtime") == 0


# -- claim ------------------------------------------------------------------------------------------


def test_claim_only_by_the_assigned_worker_and_only_once(queues, redis_client, w1):
    alive(redis_client, "w2")
    (req,) = submit(queues)
    queues.take(qname(), 1, w1, 10)
    assert queues.claim(req.id, "w2") is None
    claimed, attempt = queues.claim(req.id, w1)
    assert claimed == req and attempt == 0
    assert queues.state(req.id)["state"] == "running"
    assert queues.claim(req.id, w1) is None
    assert redis_client.zscore(keys.ASSIGNED, req.id) is None


def test_claim_of_a_queued_or_unknown_request_fails(queues, w1):
    (req,) = submit(queues)
    assert queues.claim(req.id, w1) is None
    assert queues.claim("req_nope", w1) is None


# -- complete ---------------------------------------------------------------------------------------


def test_complete_records_once_and_frees_the_worker(queues, redis_client, w1):
    req = running(queues, w1)
    assert queues.complete(result(req.id), w1, 0) is True
    assert queues.state(req.id)["state"] == "done"
    assert queues.result(req.id).text == "hi"
    assert queues.inflight(w1) == set()
    assert redis_client.hgetall(keys.worker_models(w1)) == {}
    assert queues.complete(result(req.id, text="again"), w1, 0) is False
    assert queues.result(req.id).text == "hi"
    assert len(out_results(redis_client, req.id)) == 1


@pytest.mark.parametrize("wid, attempt", [("w2", 0), ("w1", 1), ("w1", 5)])
def test_complete_by_another_worker_or_attempt_changes_nothing(queues, redis_client, w1, wid, attempt):
    req = running(queues, w1)
    assert queues.complete(result(req.id), wid, attempt) is False
    assert queues.state(req.id)["state"] == "running"
    assert queues.result(req.id) is None
    assert queues.inflight(w1) == {req.id}
    assert out_results(redis_client, req.id) == []


def test_complete_of_an_unclaimed_request_is_refused(queues, w1):
    (req,) = submit(queues)
    queues.take(qname(), 1, w1, 10)
    assert queues.complete(result(req.id), w1, 0) is False
    assert queues.state(req.id)["state"] == "assigned"


@pytest.mark.parametrize("status, state", [("completed", "done"), ("failed", "failed"), ("cancelled", "cancelled")])
def test_complete_maps_status_to_state(queues, w1, status, state):
    req = running(queues, w1)
    assert queues.complete(result(req.id, status=status), w1, 0)
    assert queues.state(req.id)["state"] == state


def test_output_stream_ends_with_the_result(queues, redis_client, w1):
    req = running(queues, w1)
    redis_client.xadd(keys.output(req.id), {"event": "{}"})
    queues.complete(result(req.id), w1, 0)
    entries = redis_client.xrange(keys.output(req.id))
    assert b"result" not in entries[0][1]
    last = GenerationResult.model_validate_json(entries[-1][1][b"result"])
    assert (last.id, last.status, last.text) == (req.id, "completed", "hi")


def test_finished_request_expires_after_the_result_ttl(queues, redis_client, w1):
    req = running(queues, w1)
    queues.complete(result(req.id), w1, 0)
    assert 0 < redis_client.ttl(keys.request(req.id)) <= 60
    assert 0 < redis_client.ttl(keys.output(req.id)) <= 60


# -- cancel -----------------------------------------------------------------------------------------


def test_cancel_queued_removes_it_from_queue_and_counters(queues, redis_client):
    (req,) = submit(queues, tenant="acme")
    assert queues.cancel(req.id) == "cancelled"
    assert queues.state(req.id)["state"] == "cancelled"
    assert queues.stats(BASE) == []
    assert queues.waiting("realtime") == 0 and queues.waiting("realtime", "acme") == 0
    res = queues.result(req.id)
    assert (res.status, res.finish_reason) == ("cancelled", "abort")
    assert out_results(redis_client, req.id)[-1].status == "cancelled"


def test_cancel_assigned_cancels_and_frees_the_worker(queues, w1):
    (req,) = submit(queues)
    queues.take(qname(), 1, w1, 10)
    assert queues.cancel(req.id) == "cancelled"
    assert queues.state(req.id)["state"] == "cancelled"
    assert queues.inflight(w1) == set()
    assert queues.claim(req.id, w1) is None


def test_cancel_running_asks_its_worker(queues, w1):
    req = running(queues, w1)
    assert queues.cancel(req.id) == "cancelling"
    assert queues.state(req.id)["state"] == "running"
    assert queues.pop_cancels(w1) == [req.id]
    assert queues.pop_cancels(w1) == []
    assert queues.complete(result(req.id, status="cancelled", finish_reason="abort"), w1, 0)
    assert queues.state(req.id)["state"] == "cancelled"


@pytest.mark.parametrize("status, state", [("completed", "done"), ("failed", "failed"), ("cancelled", "cancelled")])
def test_cancel_finished_returns_its_state(queues, w1, status, state):
    req = running(queues, w1)
    queues.complete(result(req.id, status=status), w1, 0)
    assert queues.cancel(req.id) == state
    assert queues.state(req.id)["state"] == state


def test_cancel_unknown_or_other_tenant(queues):
    (req,) = submit(queues, tenant="acme")
    assert queues.cancel("req_nope") == "unknown"
    assert queues.cancel(req.id, tenant="other") == "unknown"
    assert queues.state(req.id)["state"] == "queued"
    assert queues.cancel(req.id, tenant="acme") == "cancelled"


# -- backpressure -----------------------------------------------------------------------------------


def test_global_cap_raises_queue_full_and_frees_after_take(queues, w1):
    for i in range(3):
        queues.submit(make_req(tenant=f"t{i}"), cap=3)
    with pytest.raises(QueueFull) as err:
        queues.submit(make_req(tenant="t9"), cap=3)
    assert err.value.scope == "global"
    queues.take(qname(), 1, w1, 10)
    assert queues.waiting("realtime") == 2
    queues.submit(make_req(tenant="t9"), cap=3)


def test_tenant_cap_raises_queue_full_and_frees_after_cancel(queues):
    first = make_req(tenant="acme")
    queues.submit(first, tenant_cap=2)
    queues.submit(make_req(tenant="acme"), tenant_cap=2)
    with pytest.raises(QueueFull) as err:
        queues.submit(make_req(tenant="acme"), tenant_cap=2)
    assert err.value.scope == "tenant"
    queues.submit(make_req(tenant="other"), tenant_cap=2)  # another tenant is not held back
    queues.cancel(first.id)
    assert queues.waiting("realtime", "acme") == 1
    queues.submit(make_req(tenant="acme"), tenant_cap=2)


def test_caps_are_per_class(queues):
    queues.submit(make_req(priority="batch"), cap=1)
    queues.submit(make_req(priority="realtime"), cap=1)
    with pytest.raises(QueueFull):
        queues.submit(make_req(priority="batch"), cap=1)


def test_refused_submit_writes_nothing(queues, redis_client):
    queues.submit(make_req(), cap=1)
    req = make_req()
    with pytest.raises(QueueFull):
        queues.submit(req, cap=1)
    assert not redis_client.exists(keys.request(req.id))
    assert queues.waiting("realtime") == 1


# -- requeue ----------------------------------------------------------------------------------------


def test_requeue_after_a_crash_counts_an_attempt(queues, w1):
    req = running(queues, w1)
    assert queues.requeue(req.id, w1, crashed=True) == "requeued"
    st = queues.state(req.id)
    assert (st["state"], st["attempts"], st["qclass"], st["worker"]) == ("queued", "1", "realtime", "")
    assert queues.inflight(w1) == set()
    assert queues.waiting("realtime") == 1


@pytest.mark.parametrize("claimed", [True, False])
def test_requeue_without_a_crash_does_not_count(queues, w1, claimed):
    req = running(queues, w1) if claimed else submit(queues)[0]
    if not claimed:
        queues.take(qname(), 1, w1, 10)
    assert queues.requeue(req.id, w1, crashed=False) == "requeued"
    assert queues.state(req.id)["attempts"] == "0"


def test_requeue_of_an_unclaimed_request_never_counts_even_as_a_crash(queues, w1):
    (req,) = submit(queues)
    queues.take(qname(), 1, w1, 10)
    assert queues.requeue(req.id, w1, crashed=True) == "requeued"
    assert queues.state(req.id)["attempts"] == "0"


def test_crashes_go_suspect_then_dead_letter(queues, redis_client, w1):
    req = running(queues, w1, priority="batch")
    assert queues.requeue(req.id, w1, crashed=True, max_attempts=3, isolate_after=2) == "requeued"
    assert queues.state(req.id)["qclass"] == "batch"

    assert queues.take(qname("base", "batch"), 1, w1, 10) == [req.id]
    assert queues.claim(req.id, w1)[1] == 1
    assert queues.requeue(req.id, w1, crashed=True, max_attempts=3, isolate_after=2) == "requeued"
    assert queues.state(req.id)["qclass"] == "suspect"
    assert [s.qclass for s in queues.stats(BASE)] == ["suspect"]
    assert queues.waiting("suspect") == 1 and queues.waiting("batch") == 0

    assert queues.take(qname("base", "suspect"), 1, w1, 10, isolate=True) == [req.id]
    assert queues.claim(req.id, w1)[1] == 2
    assert queues.requeue(req.id, w1, crashed=True, max_attempts=3, isolate_after=2) == "dead"
    res = queues.result(req.id)
    assert (res.status, res.error["code"], res.attempts) == ("failed", "dead_letter", 3)
    assert queues.state(req.id)["state"] == "failed"
    assert redis_client.zscore(keys.DEAD, req.id) is not None
    assert out_results(redis_client, req.id)[-1].error["code"] == "dead_letter"
    assert queues.stats(BASE) == [] and queues.waiting("suspect") == 0
    assert redis_client.get(keys.worker_isolated(w1)) is None


def test_requeue_keeps_the_original_score_at_the_front(queues, w1):
    old, new = make_req(created_at=100.0), make_req(created_at=200.0)
    queues.submit(old)
    queues.take(qname(), 1, w1, 10)
    queues.claim(old.id, w1)
    queues.submit(new)
    queues.requeue(old.id, w1, crashed=True)
    assert queues.stats(BASE)[0].oldest_score == 100.0
    assert queues.take(qname(), 1, w1, 10) == [old.id]


def test_requeue_by_another_worker_or_after_finish_is_skipped(queues, redis_client, w1):
    req = running(queues, w1)
    assert queues.requeue(req.id, "w2", crashed=True) == "skip"
    assert queues.state(req.id)["state"] == "running"
    queues.complete(result(req.id), w1, 0)
    assert queues.requeue(req.id, w1, crashed=True) == "skip"
    assert queues.state(req.id)["state"] == "done"


def test_requeue_of_a_cancelling_request_finishes_it_cancelled(queues, redis_client, w1):
    req = running(queues, w1)
    queues.cancel(req.id)
    assert queues.requeue(req.id, w1, crashed=True) == "cancelled"
    assert queues.state(req.id)["state"] == "cancelled"
    assert queues.stats(BASE) == []


def test_a_requeued_request_is_claimed_with_its_new_attempt(queues, redis_client, w1):
    alive(redis_client, "w2")
    req = running(queues, w1)
    queues.requeue(req.id, w1, crashed=True)
    queues.take(qname(), 1, "w2", 10)
    assert queues.claim(req.id, "w2")[1] == 1
    assert queues.complete(result(req.id), "w2", 0) is False
    assert queues.complete(result(req.id), w1, 1) is False  # the old worker's late result
    assert queues.complete(result(req.id), "w2", 1) is True


# -- batch jobs -------------------------------------------------------------------------------------


def test_batch_request_is_reported_finished_exactly_once(queues, redis_client, w1):
    req = running(queues, w1, priority="batch", batch_id="batch_1")
    queues.complete(result(req.id), w1, 0)
    queues.complete(result(req.id), w1, 0)
    queues.cancel(req.id)
    queues.requeue(req.id, w1, crashed=True)
    assert redis_client.lrange(keys.job_finished("batch_1"), 0, -1) == [req.id.encode()]


@pytest.mark.parametrize("how", ["cancel_queued", "cancel_assigned", "dead_letter"])
def test_batch_request_finished_otherwise_is_reported_once(queues, redis_client, w1, how):
    (req,) = submit(queues, priority="batch", batch_id="b2")
    if how == "cancel_assigned":
        queues.take(qname("base", "batch"), 1, w1, 10)
    if how == "dead_letter":
        queues.take(qname("base", "batch"), 1, w1, 10)
        queues.claim(req.id, w1)
        assert queues.requeue(req.id, w1, crashed=True, max_attempts=1) == "dead"
    else:
        assert queues.cancel(req.id) == "cancelled"
    queues.cancel(req.id)
    assert redis_client.lrange(keys.job_finished("b2"), 0, -1) == [req.id.encode()]


def test_realtime_request_pushes_no_job_entry(queues, redis_client, w1):
    req = running(queues, w1)
    queues.complete(result(req.id), w1, 0)
    assert redis_client.keys(keys.PREFIX + "job:*") == []
