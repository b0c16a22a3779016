"""`scheduler.policy`: which queue's batch goes to which worker, as pure functions (no servers)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scheduler.policy import (
    Assignment,
    PolicyConfig,
    QueueView,
    WorkerView,
    affinity,
    next_check_s,
    plan,
    room_for,
    spareable,
    starving,
    urgency,
)

CFG = PolicyConfig(max_batch=8, realtime_window_s=0.0, batch_window_s=0.05, realtime_boost_s=30.0,
                   affinity_wait_s=2.0, swap_wait_s=2.0, realtime_reserve=0.0)
LORA_A, LORA_B = "lora:t/a@1", "lora:t/b@1"
FULL_A, FULL_B = "full:t/fa@1", "full:t/fb@1"


def q(model_key="base", qclass="realtime", length=1, age=0.0, name=None) -> QueueView:
    return QueueView(name or f"q:{qclass}:{model_key}", model_key, qclass, length, age)


def w(wid="w1", max_inflight=8, inflight=0, **kw) -> WorkerView:
    return WorkerView(wid, max_inflight, inflight, **kw)


def cfg(**kw) -> PolicyConfig:
    return replace(CFG, **kw)


def by_queue(assignments: list[Assignment]) -> dict[str, Assignment]:
    return {a.queue: a for a in assignments}


# -- urgency: real-time first, aging ----------------------------------------------------------------


def test_realtime_is_dispatched_before_batch_when_room_is_short():
    rt, batch = q(qclass="realtime", length=4, age=0.0), q(LORA_A, qclass="batch", length=8, age=1.0)
    out = plan([batch, rt], [w(max_inflight=4)], CFG)
    assert out == [Assignment(rt.name, "w1", 4)]


def test_aged_batch_queue_beats_a_fresh_realtime_one():
    rt, batch = q(qclass="realtime", length=4, age=0.0), q(LORA_A, qclass="batch", length=8, age=31.0)
    out = plan([rt, batch], [w(max_inflight=4)], CFG)
    assert out == [Assignment(batch.name, "w1", 4)]


@pytest.mark.parametrize("qclass, age, length, expected", [
    ("realtime", 0.0, 1, (2, 30.0)), ("realtime", 1.5, 1, (2, 31.5)),
    ("batch", 0.0, 5, (1, 5.0)),  # not starving: biggest batch first
    ("batch", 31.0, 5, (2, 31.0)),  # unserved past realtime_boost_s: ranks with real-time
    ("suspect", 0.0, 1, (3, 0.0)),
])
def test_urgency(qclass, age, length, expected):
    assert urgency(q(qclass=qclass, age=age, length=length), CFG) == expected


def test_starving_counts_from_the_last_service_not_the_oldest_request():
    backlog = QueueView("q", LORA_A, "batch", 500, oldest_age_s=300.0, idle_s=1.0)
    assert not starving(backlog, CFG)
    assert starving(replace(backlog, idle_s=31.0), CFG)
    assert starving(replace(backlog, idle_s=None), CFG)  # never served: its oldest request's age


# -- batching window --------------------------------------------------------------------------------


@pytest.mark.parametrize("length, age, dispatched", [
    (3, 0.01, False),  # short and young: held to fill
    (8, 0.0, True),  # a full batch goes at once
    (20, 0.0, True),  # more than a batch: goes at once
    (3, 0.05, True),  # the window ended
    (1, 10.0, True),
])
def test_batch_window_holds_short_young_queues(length, age, dispatched):
    out = plan([q(qclass="batch", length=length, age=age)], [w(max_inflight=64)], CFG)
    assert bool(out) == dispatched
    if dispatched:
        assert out[0].count == min(length, CFG.max_batch)


def test_realtime_window_zero_sends_a_single_request_at_once():
    assert plan([q(qclass="realtime", length=1, age=0.0)], [w()], CFG) == [Assignment("q:realtime:base", "w1", 1)]


def test_realtime_window_is_honoured_when_set():
    c = cfg(realtime_window_s=0.02)
    assert plan([q(length=1, age=0.01)], [w()], c) == []
    assert plan([q(length=1, age=0.02)], [w()], c) == [Assignment("q:realtime:base", "w1", 1)]


def test_batch_waits_until_the_whole_batch_fits_unless_starving():
    worker = w(max_inflight=8, inflight=5)  # room for 3 of a full batch of 8
    assert plan([q(qclass="batch", length=8, age=0.01)], [worker], CFG) == []
    served_lately = QueueView("q:batch:base", "base", "batch", 8, oldest_age_s=60.0, idle_s=1.0)
    assert plan([served_lately], [worker], CFG) == []  # an old backlog still waits ...
    fits = replace(worker, inflight=0)
    assert plan([q(qclass="batch", length=8, age=60.0)], [fits], CFG) == [Assignment("q:batch:base", "w1", 8)]
    starved = QueueView("q:batch:base", "base", "batch", 8, oldest_age_s=60.0, idle_s=31.0)
    assert plan([starved], [worker], CFG) == [Assignment("q:batch:base", "w1", 3)]  # ... unless unserved too long


def test_partial_room_goes_at_once_for_realtime():
    assert plan([q(length=8)], [w(max_inflight=8, inflight=5)], CFG) == [Assignment("q:realtime:base", "w1", 3)]


# -- real-time reserve ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_inflight, reserve, inflight, batch_room, rt_room", [
    (10, 0.2, 0, 8, 10), (10, 0.2, 8, 0, 2), (10, 0.0, 3, 7, 7), (4, 0.1, 0, 4, 4), (10, 0.2, 9, 0, 1),
])
def test_room_for_batch_leaves_the_realtime_reserve(max_inflight, reserve, inflight, batch_room, rt_room):
    c, worker = cfg(realtime_reserve=reserve), w(max_inflight=max_inflight, inflight=inflight)
    assert room_for(worker, "batch", c) == batch_room
    assert room_for(worker, "realtime", c) == rt_room
    assert room_for(worker, "suspect", c) == rt_room


def test_batch_work_leaves_room_for_realtime_in_the_same_plan():
    c = cfg(max_batch=32, realtime_reserve=0.25)
    batch, rt = q(LORA_A, qclass="batch", length=32, age=40.0), q(LORA_B, length=5)
    out = by_queue(plan([batch, rt], [w(max_inflight=16)], c))
    assert out[batch.name].count == 12  # 16 less the reserve of 4; it aged past the boost, so it went first
    assert out[rt.name].count == 4  # the reserve is real-time's


def test_batch_is_not_sent_to_a_worker_whose_only_room_is_the_reserve():
    c = cfg(realtime_reserve=0.25)
    assert plan([q(qclass="batch", length=3, age=5.0)], [w(max_inflight=8, inflight=6)], c) == []


# -- affinity: LoRA adapters ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["holds", "inflight"])
def test_lora_goes_to_the_worker_that_has_it(how):
    has = {"holds": frozenset({LORA_A})} if how == "holds" else {"inflight_models": {LORA_A: 1}, "inflight": 1}
    workers = [w("w1", max_inflight=64), w("w2", max_inflight=8, **has), w("w3", max_inflight=64)]
    assert plan([q(LORA_A, length=4)], workers, CFG) == [Assignment(f"q:realtime:{LORA_A}", "w2", 4)]


@pytest.mark.parametrize("age, expected_worker", [(0.0, None), (1.99, None), (2.0, "w2"), (5.0, "w2")])
def test_lora_waits_for_its_full_holder_until_affinity_wait(age, expected_worker):
    holder = w("w1", max_inflight=4, inflight=4, holds=frozenset({LORA_A}))
    other = w("w2", max_inflight=8)
    out = plan([q(LORA_A, length=2, age=age)], [holder, other], CFG)
    assert [a.worker_id for a in out] == ([expected_worker] if expected_worker else [])


def test_lora_with_no_holder_goes_to_any_base_worker_at_once():
    workers = [w("w1", max_inflight=8, holds=frozenset({LORA_B})), w("w2", max_inflight=8, weights=FULL_A)]
    assert plan([q(LORA_A, length=2, age=0.0)], workers, CFG) == [Assignment(f"q:realtime:{LORA_A}", "w1", 2)]


@pytest.mark.parametrize("worker, key, expected", [
    (w(), "base", 2),
    (w(holds=frozenset({LORA_A})), LORA_A, 2),
    (w(inflight_models={LORA_A: 2}, inflight=2), LORA_A, 2),
    (w(inflight_models={LORA_A: 0}), LORA_A, 1),
    (w(), LORA_A, 1),
    (w(weights=FULL_A), LORA_A, 0),
    (w(weights=FULL_A), FULL_A, 2),
    (w(inflight_models={FULL_A: 1}, inflight=1), FULL_A, 2),  # it was sent that fine-tune: it will swap
    (w(inflight_models={FULL_A: 1}, inflight=1), "base", 0),
    (w(weights=FULL_A), FULL_B, 0),
])
def test_affinity_levels(worker, key, expected):
    weights = key if key.startswith("full:") else "base"
    assert affinity(worker, key, weights) == expected


# -- affinity: full fine-tunes and swaps ------------------------------------------------------------


def test_full_finetune_goes_to_the_worker_that_has_it_resident():
    workers = [w("w1", max_inflight=64), w("w2", max_inflight=8, weights=FULL_A)]
    assert plan([q(FULL_A, length=3)], workers, CFG) == [Assignment(f"q:realtime:{FULL_A}", "w2", 3)]


def test_full_finetune_goes_to_the_worker_it_was_already_sent_to():
    workers = [w("w1", max_inflight=64), w("w2", max_inflight=8, inflight=2, inflight_models={FULL_A: 2})]
    assert plan([q(FULL_A, length=3)], workers, CFG) == [Assignment(f"q:realtime:{FULL_A}", "w2", 3)]


def test_full_finetune_waits_for_its_busy_worker_rather_than_swap_another():
    workers = [w("w1", max_inflight=8), w("w2", max_inflight=4, inflight=4, weights=FULL_A)]
    assert plan([q(FULL_A, length=2, age=1.0)], workers, CFG) == []
    assert plan([q(FULL_A, length=2, age=2.0)], workers, CFG) == [Assignment(f"q:realtime:{FULL_A}", "w1", 2)]


def test_idle_worker_swaps_when_nothing_waits_for_its_weights():
    assert plan([q(FULL_B, length=2)], [w(weights=FULL_A)], CFG) == [Assignment(f"q:realtime:{FULL_B}", "w1", 2)]


def test_idle_base_worker_swaps_to_a_finetune():
    assert plan([q(FULL_B, length=2)], [w()], CFG) == [Assignment(f"q:realtime:{FULL_B}", "w1", 2)]


def test_no_swap_while_the_current_weights_have_queued_work():
    held = q(FULL_A, qclass="batch", length=2, age=0.0)  # young: held by its batching window
    fresh = q(FULL_B, length=2, age=1.0)
    assert plan([held, fresh], [w(weights=FULL_A)], CFG) == []


def test_swap_despite_queued_work_once_the_request_waited_past_affinity_wait():
    held = q(FULL_A, qclass="batch", length=2, age=0.0)
    old = q(FULL_B, length=2, age=2.5)
    assert plan([held, old], [w(weights=FULL_A)], CFG) == [Assignment(old.name, "w1", 2)]


def test_a_worker_finishing_weights_nobody_waits_for_is_sent_the_next_finetune_at_once():
    busy = w(max_inflight=8, inflight=2, weights=FULL_A, inflight_models={FULL_A: 2})  # its engine drains, then swaps
    assert plan([q(FULL_B, length=2, age=0.0)], [busy], CFG) == [Assignment(f"q:realtime:{FULL_B}", "w1", 2)]


def test_batch_backlog_never_pulls_a_worker_off_weights_with_queued_work():
    on_a = w(max_inflight=8, weights=FULL_A)
    backlog = QueueView(f"q:batch:{FULL_B}", FULL_B, "batch", 8, oldest_age_s=300.0, idle_s=5.0)
    assert plan([q(FULL_A, qclass="batch", length=1, age=0.0), backlog], [on_a], CFG) == []


def test_swap_prefers_an_idle_worker_over_a_busier_one():
    busy = w("w1", max_inflight=64, inflight=1, weights=FULL_A, inflight_models={FULL_A: 1})
    idle = w("w2", max_inflight=8, weights=FULL_A)
    out = plan([q(FULL_B, length=2, age=3.0)], [busy, idle], CFG)
    assert [a.worker_id for a in out] == ["w2"]


def test_a_starving_backlog_waits_for_the_busy_worker_with_its_weights_instead_of_swapping_another():
    # w1 (base) is full; w2 holds FULL_A with room. A base backlog starving for 40 s must not swap w2.
    base_full = w("w1", max_inflight=8, inflight=8, inflight_models={LORA_A: 8})
    on_a = w("w2", max_inflight=8, inflight=2, weights=FULL_A, inflight_models={FULL_A: 2})
    starving_lora = QueueView(f"q:batch:{LORA_B}", LORA_B, "batch", 8, oldest_age_s=300.0, idle_s=40.0)
    assert plan([starving_lora], [base_full, on_a], CFG) == []


def test_a_backlog_may_swap_an_idle_worker_whose_weights_nobody_waits_for():
    base_full = w("w1", max_inflight=8, inflight=8, inflight_models={LORA_A: 8})
    idle_on_a = w("w2", max_inflight=8, weights=FULL_A)
    backlog = QueueView(f"q:batch:{LORA_B}", LORA_B, "batch", 8, oldest_age_s=300.0, idle_s=5.0)
    assert plan([backlog], [base_full, idle_on_a], CFG) == [Assignment(backlog.name, "w2", 8)]


def test_a_waiting_realtime_finetune_does_not_take_the_last_worker_of_busier_weights():
    # FULL_B has waited past swap_wait. w1, the only base worker, has room but 40 base requests are
    # queued; w2 holds FULL_A (3 queued) and is full. Waiting for w2 strands less than swapping w1.
    base_worker = w("w1", max_inflight=8, inflight=2, inflight_models={"base": 2})
    on_a = w("w2", max_inflight=8, inflight=8, weights=FULL_A, inflight_models={FULL_A: 8})
    queues = [q(FULL_B, length=1, age=5.0), q("base", qclass="batch", length=40, age=0.0),
              q(FULL_A, qclass="batch", length=3, age=0.0)]
    assert [a for a in plan(queues, [base_worker, on_a], CFG) if a.queue == queues[0].name] == []
    # past realtime_boost_s the real-time request takes the least-needed worker with room anyway
    waited_long = q(FULL_B, length=1, age=31.0)
    assert [a.worker_id for a in plan([waited_long, *queues[1:]], [base_worker, on_a], CFG)
            if a.queue == waited_long.name] == ["w1"]
    # once FULL_A's queue is smaller than FULL_B's, w2 may be swapped (when it has room)
    on_a_room = replace(on_a, inflight=4, inflight_models={FULL_A: 4})
    queues[2] = q(FULL_A, qclass="batch", length=0, age=0.0)
    out = by_queue(plan(queues, [base_worker, on_a_room], CFG))
    assert out[queues[0].name].worker_id == "w2"


@pytest.mark.parametrize("worker, others, queued, ok", [
    (w(weights=FULL_A), [], set(), True),  # nothing waits for its weights
    (w(weights=FULL_A), [], {FULL_A}, False),  # its weights have queued work and nobody else has them
    (w(weights=FULL_A), [w("w2", weights=FULL_A)], {FULL_A}, True),  # another worker has them too
    (w(inflight=1, inflight_models={FULL_A: 1}), [], {FULL_A}, False),  # committed to FULL_A
    (w(), [], {"base"}, False),
])
def test_spareable(worker, others, queued, ok):
    assert spareable(worker, [worker, *others], dict.fromkeys(queued, 1)) is ok


def test_a_finetune_sent_in_this_plan_steers_later_queues_away_from_that_worker():
    # w1 gets FULL_B (swap on an idle worker); the base queue must then not be sent there too.
    full = q(FULL_B, length=2, age=5.0)
    base = q("base", qclass="batch", length=8, age=0.0)
    out = plan([full, base], [w("w1", max_inflight=16)], CFG)
    assert out == [Assignment(full.name, "w1", 2)]


# -- suspects ---------------------------------------------------------------------------------------


def test_suspect_goes_alone_to_an_idle_worker():
    sus = q(LORA_A, qclass="suspect", length=3)
    workers = [w("busy", inflight=1), w("idle")]
    assert plan([sus], workers, CFG) == [Assignment(sus.name, "idle", 1, isolate=True)]


def test_suspect_waits_when_no_worker_is_idle():
    assert plan([q(qclass="suspect", length=1)], [w("a", inflight=1), w("b", inflight=7)], CFG) == []


@pytest.mark.parametrize("worker", [w(draining=True), w(isolated=True), w(max_inflight=0)])
def test_suspect_skips_workers_that_cannot_take_work(worker):
    assert plan([q(qclass="suspect", length=1)], [worker], CFG) == []


def test_a_worker_given_a_suspect_gets_nothing_else():
    sus, rt = q(qclass="suspect", length=1), q(LORA_A, length=4)
    out = plan([rt, sus], [w("w1", max_inflight=8)], CFG)
    assert out == [Assignment(sus.name, "w1", 1, isolate=True)]


def test_two_suspect_queues_take_two_idle_workers():
    s1, s2 = q(LORA_A, qclass="suspect", name="s1"), q(LORA_B, qclass="suspect", name="s2")
    out = plan([s1, s2], [w("w1"), w("w2")], CFG)
    assert sorted((a.queue, a.count, a.isolate) for a in out) == [("s1", 1, True), ("s2", 1, True)]
    assert {a.worker_id for a in out} == {"w1", "w2"}


# -- invariants -------------------------------------------------------------------------------------


def test_no_work_means_no_assignments():
    assert plan([], [w()], CFG) == []
    assert plan([q(length=0)], [w()], CFG) == []
    assert plan([q(length=5)], [], CFG) == []


@pytest.mark.parametrize("flag", ["draining", "isolated"])
def test_draining_or_isolated_workers_get_nothing(flag):
    assert plan([q(length=5, age=10.0)], [w(**{flag: True})], CFG) == []


def test_several_queues_share_one_worker_without_exceeding_its_room():
    queues = [q(f"lora:t/{i}@1", length=3, age=float(i)) for i in range(5)]
    out = plan(queues, [w(max_inflight=8)], CFG)
    assert sum(a.count for a in out) == 8
    assert len({a.queue for a in out}) == len(out)


def _random_scenario(rng: random.Random):
    keys = ["base", LORA_A, LORA_B, FULL_A, FULL_B]
    queues = []
    for i in range(rng.randint(0, 8)):
        qclass = rng.choice(["realtime", "realtime", "batch", "batch", "suspect"])
        queues.append(q(rng.choice(keys), qclass, rng.randint(0, 40), rng.choice([0.0, 0.01, 0.1, 1.0, 3.0, 40.0]),
                        name=f"q{i}"))
    workers = []
    for i in range(rng.randint(1, 4)):
        mx = rng.randint(1, 40)
        inflight = rng.randint(0, mx)
        models = {rng.choice(keys): inflight} if inflight else {}
        workers.append(w(f"w{i}", mx, inflight, weights=rng.choice(["base", "base", FULL_A, FULL_B]),
                         holds=frozenset(rng.sample([LORA_A, LORA_B], rng.randint(0, 2))), inflight_models=models,
                         isolated=rng.random() < 0.1, draining=rng.random() < 0.1))
    c = cfg(max_batch=rng.choice([1, 4, 16, 32]), realtime_reserve=rng.choice([0.0, 0.1, 0.5]))
    return queues, workers, c


@pytest.mark.parametrize("seed", range(300))
def test_plan_invariants_on_random_snapshots(seed):
    queues, workers, c = _random_scenario(random.Random(seed))
    out = plan(queues, workers, c)
    qs, ws = {x.name: x for x in queues}, {x.id: x for x in workers}
    assert len({a.queue for a in out}) == len(out), "at most one assignment per queue"
    used: dict[str, int] = {}
    for a in out:
        assert 1 <= a.count <= min(qs[a.queue].length, c.max_batch)
        assert a.isolate == (qs[a.queue].qclass == "suspect")
        if a.isolate:
            assert a.count == 1 and ws[a.worker_id].inflight == 0
        used[a.worker_id] = used.get(a.worker_id, 0) + a.count
    for wid, n in used.items():
        assert n <= ws[wid].free, "capacity exceeded"
        if any(a.isolate and a.worker_id == wid for a in out):
            assert n == 1, "an isolated worker got other work"


# -- next_check_s -----------------------------------------------------------------------------------


@pytest.mark.parametrize("queues, expected", [
    ([], 0.5),
    ([q(qclass="batch", age=0.01)], 0.04),  # the batch window ends first
    ([q(qclass="realtime", age=1.7)], 0.3),  # the affinity bound
    ([q(qclass="realtime", age=10.0)], 0.5),  # nothing pending: the idle wait
    ([q(qclass="batch", age=0.05 - 1e-9)], 0.001),  # never below 1 ms
    ([q(qclass="batch", age=1.0), q(qclass="batch", age=0.03)], 0.02),
])
def test_next_check_s(queues, expected):
    assert next_check_s(queues, CFG) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(50))
def test_next_check_s_stays_within_bounds(seed):
    queues, _, c = _random_scenario(random.Random(seed))
    assert 0.001 <= next_check_s(queues, c, idle_s=0.5) <= 0.5


# -- defects these tests found (fixed) ------------------------------------------------------------


def test_lora_does_not_wait_for_a_draining_holder():
    holder = w("w1", max_inflight=8, holds=frozenset({LORA_A}), draining=True)
    out = plan([q(LORA_A, length=2, age=0.0)], [holder, w("w2")], CFG)
    assert [a.worker_id for a in out] == ["w2"]


def test_finetune_does_not_wait_for_a_draining_resident_worker():
    resident = w("w1", max_inflight=8, weights=FULL_A, draining=True)
    out = plan([q(FULL_A, length=2, age=0.0)], [resident, w("w2")], CFG)
    assert [a.worker_id for a in out] == ["w2"]


def test_an_empty_queue_does_not_block_a_swap():
    out = plan([q(FULL_A, length=0), q(FULL_B, length=2)], [w(weights=FULL_A)], CFG)
    assert out == [Assignment(f"q:realtime:{FULL_B}", "w1", 2)]


def test_a_waiting_suspect_keeps_new_work_off_the_least_busy_worker():
    busy, less_busy = w("w1", inflight=6), w("w2", inflight=2)
    out = plan([q("base", qclass="suspect", length=1), q("base", length=4, age=1.0)], [busy, less_busy], CFG)
    assert [a.worker_id for a in out] == ["w1"]  # w2 drains for the suspect
