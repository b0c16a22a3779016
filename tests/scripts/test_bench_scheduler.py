"""scripts/bench_scheduler.py end to end at a tiny size: both sides run through real Redis and finish every
request exactly once (no assertions on the policy's figures: those are the benchmark's output)."""

from __future__ import annotations

import json

import pytest

from tests.script_modules import loaded_script

TINY = ["--backlog", "200", "--duration", "10", "--rt-rate", "5", "--adapters", "10", "--full-ranks", "3,6,9"]


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_scheduler") as module:
        yield module


def check_side(figures: dict, requests: int, realtime: int) -> None:
    check = figures["check"]
    assert check["requests"] == check["sim_finished"] == requests
    assert check["done"] == requests and check["states"] == {"done": requests}  # every one finished, in Redis
    assert check["with_one_result"] == requests  # each output stream holds exactly one result
    assert check["queued_left"] == 0 and check["inflight_left"] == 0
    assert figures["requests"] == requests and figures["realtime_requests"] == realtime
    assert 1 <= figures["mean_batch_size"] <= figures["max_batch_size"]
    assert figures["batches"] * figures["mean_batch_size"] == pytest.approx(requests)
    for key in ("realtime_queue_wait_s", "realtime_start_wait_s", "batch_queue_wait_s", "batch_start_wait_s"):
        waits = figures[key]
        assert 0 <= waits["p50"] <= waits["p99"] <= waits["max"], key
    assert figures["realtime_queue_wait_s"]["p99"] <= figures["realtime_start_wait_s"]["max"]
    assert figures["swaps_per_1000"] >= 0 and figures["makespan_s"] > 0 and figures["mean_batch_time_s"] > 0


@pytest.mark.parametrize("engine", ["continuous", "sequential"])
def test_both_sides_finish_every_request_once(bench, tmp_path, engine):
    out = tmp_path / "bench.json"
    returned = bench.main([*TINY, "--engine", engine, "--json", str(out)])
    report = json.loads(out.read_text())
    workload = report["workload"]
    assert workload["requests"] == workload["backlog"] + workload["realtime"] and workload["backlog"] == 200
    assert workload["realtime"] > 0
    for side in ("policy", "fifo"):
        check_side(report[side], workload["requests"], workload["realtime"])
    assert set(report["goals"]) >= {"batch_size_goal_met", "swap_goal_met", "realtime_goal_met"}
    assert returned["policy"]["mean_batch_size"] == pytest.approx(report["policy"]["mean_batch_size"])


def test_workload_is_seeded_zipf_over_the_catalog(bench):
    args = bench.parse_args(TINY)
    a, b = bench.make_workload(args), bench.make_workload(args)
    assert [(r.id, r.model_key, r.arrival) for r in a] == [(r.id, r.model_key, r.arrival) for r in b]
    assert [r.arrival for r in a] == sorted(r.arrival for r in a)
    assert sum(r.priority == "batch" and r.arrival < 0 for r in a) == 200  # the backlog is queued before t=0
    assert all(0 < r.arrival < 10 for r in a if r.priority == "realtime")
    catalog = bench.model_keys(10, 3, 1, [3, 6, 9])
    assert len(catalog) == 14 and catalog[0] == "base" and catalog[2] == "full:bench/f1@1"
    counts = {k: sum(r.model_key == k for r in a) for k in catalog}
    assert counts["base"] > counts[catalog[-1]]  # rank 1 beats rank 14


def test_bad_ranks_are_refused(bench):
    with pytest.raises(ValueError, match="distinct ranks"):
        bench.model_keys(10, 3, 1, [1, 6, 9])
    with pytest.raises(ValueError, match="names 2 ranks"):
        bench.model_keys(10, 3, 1, [3, 6])


@pytest.mark.parametrize("engine", ["continuous", "sequential"])
def test_stand_in_engine_batch_time_and_swap(bench, engine):
    args = bench.parse_args(["--engine", engine, "--work-spread", "0", "--fixed-s", "0.5", "--per-request-s", "0.1",
                             "--swap-s", "2"])
    eng = bench.ENGINES[engine]("w", args)
    spec = None

    def req(key):
        return bench.Req(f"r{key}", key, "batch", 0.0, 1.0, spec)

    batch = [req("lora:t/a@1"), req("base")]
    eng.receive(batch)
    eng.admit(0.0)
    assert eng.next_event() == pytest.approx(0.7)  # fixed + 2 x per_request
    assert eng.advance(eng.next_event()) == batch and eng.holds == ["lora:t/a@1"] and eng.swaps == 0
    full = [req("full:t/f@1")]
    eng.receive(full)
    eng.admit(0.7)
    if engine == "continuous":  # the swap is its own event, then the request runs
        assert eng.next_event() == pytest.approx(2.7)
        assert eng.advance(eng.next_event()) == []
        eng.admit(2.7)
    assert eng.next_event() == pytest.approx(2.7 + 0.6)
    assert eng.advance(eng.next_event()) == full and eng.swaps == 1 and eng.weights == "full:t/f@1"
