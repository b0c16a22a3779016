"""scripts/bench_serving.py: the metric definitions on synthetic timelines, SSE parsing on a scripted
stream, exact prompt lengths with the demo tokenizer, and one tiny run against a live local stack
(no timing asserts)."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from tests.script_modules import loaded_script


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_serving", "_stack") as module:
        yield module


def record(bench, ttft, gaps, output_tokens=None, model="m", max_tokens=None, status=200, success=True):
    """A finished request whose text chunks came at ttft, ttft+gaps[0], ...; e2el = the last one."""
    n = output_tokens if output_tokens is not None else len(gaps) + 1
    r = bench.RequestRecord(model, prompt_len=10, max_tokens=max_tokens or n)
    r.ttft, r.itl, r.e2el = ttft, list(gaps), ttft + sum(gaps)
    r.output_tokens, r.success, r.status, r.chunks = n, success, status, len(gaps) + 1
    r.prompt_tokens, r.usage_reported = 10, True
    return r


# -- workload -------------------------------------------------------------------------------------


def test_shapes_rates_and_mixes_parse(bench):
    assert bench.parse_shape("128x4") == bench.Shape(128, 4)
    assert bench.parse_shape("2000X100").name == "2000x100"
    for bad in ("128", "0x4", "axb"):
        with pytest.raises(Exception):
            bench.parse_shape(bad)
    assert bench.parse_rates("0.5,2,inf") == [0.5, 2.0, math.inf]
    with pytest.raises(Exception):
        bench.parse_rates("0")
    assert bench.parse_mix("base,lora-a:2,lora-b", "smol") == [("smol", 1.0), ("lora-a", 2.0), ("lora-b", 1.0)]
    with pytest.raises(ValueError):
        bench.parse_mix("base:0", "smol")
    weights = dict(bench.zipf_mix(["a", "b", "c", "d"], 1.0))
    assert weights == pytest.approx({"a": 1.0, "b": 0.5, "c": 1 / 3, "d": 0.25})


def test_poisson_arrivals_are_seeded_with_the_asked_mean_gap(bench):
    a = bench.arrival_offsets(4000, 2.0, seed=1)
    assert a == bench.arrival_offsets(4000, 2.0, seed=1)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert np.mean(np.diff(a)) == pytest.approx(0.5, rel=0.05)  # exponential gaps of mean 1/rate
    bursty = np.diff(bench.arrival_offsets(4000, 2.0, burstiness=0.25, seed=1))
    assert np.mean(bursty) == pytest.approx(0.5, rel=0.1) and np.std(bursty) > 1.5 * np.std(np.diff(a))
    assert bench.arrival_offsets(5, math.inf) == [0.0] * 5


def test_model_assignment_follows_the_weights(bench):
    models = bench.assign_models(3000, [("base", 3.0), ("a", 1.0)], seed=0)
    assert models == bench.assign_models(3000, [("base", 3.0), ("a", 1.0)], seed=0)
    assert models.count("base") / 3000 == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_have_the_exact_token_length(bench, demo_tokenizer, chat):
    maker = bench.PromptMaker(demo_tokenizer, chat=chat)
    for n in (40, 128, 2000) if chat else (1, 7, 32, 128, 2000):
        prompts = {maker.make(n, i, seed=0) for i in range(3)}
        assert len(prompts) == 3  # rotated per request
        assert all(maker.count(p) == n for p in prompts), n
    assert maker.make(64, 0, seed=0) == maker.make(64, 0, seed=0)


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_follow_vllm_definitions_on_a_synthetic_timeline(bench):
    records = [
        record(bench, 0.10, [0.02, 0.03, 0.05]),          # 4 tokens: TPOT (0.2 - 0.1) / 3
        record(bench, 0.30, [0.04] * 9),                   # 10 tokens
        record(bench, 0.05, [], output_tokens=1),          # 1 token: no TPOT, counts 0 for goodput
        record(bench, 0.0, [], status=503, success=False),
    ]
    records[3].output_tokens = 0
    m = bench.compute_metrics(records, duration_s=2.0, slo_ms={"ttft": 200, "tpot": 35}, gpu_hour_usd=3.6)
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, {"503": 1})
    assert m["total_output_tokens"] == 15 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(7.5)
    assert m["total_token_throughput"] == pytest.approx(22.5)
    tpots_ms = [(0.2 - 0.1) / 3 * 1e3, 0.04 * 1e3]
    assert m["tpot_ms"]["mean"] == pytest.approx(np.mean(tpots_ms))
    assert m["tpot_ms"]["p50"] == pytest.approx(np.percentile(tpots_ms, 50))
    ttfts_ms = [100, 300, 50]
    for q in (50, 90, 99):
        assert m["ttft_ms"][f"p{q}"] == pytest.approx(np.percentile(ttfts_ms, q))
    itls_ms = [20, 30, 50] + [40] * 9
    assert m["itl_ms"]["mean"] == pytest.approx(np.mean(itls_ms))
    assert m["itl_ms"]["p99"] == pytest.approx(np.percentile(itls_ms, 99))
    assert m["e2el_ms"]["p50"] == pytest.approx(np.percentile([200, 660, 50], 50))
    # goodput: #1 passes (TTFT 100, TPOT 33.3), #2 fails TTFT, #3 passes (TPOT counts 0), #4 failed
    assert m["good_requests"] == 2 and m["request_goodput"] == pytest.approx(1.0)
    assert m["goodput_fraction"] == pytest.approx(0.5)
    # $3.6/h = $0.001/s at 7.5 output tok/s -> $133.33 per 1M output tokens
    assert m["usd_per_1m_output_tokens"] == pytest.approx(0.001 / 7.5 * 1e6)
    assert m["usd_per_1m_total_tokens"] == pytest.approx(0.001 / 22.5 * 1e6)
    assert m["early_stops"] == 0 and m["requests_per_model"] == {"m": 4}


def test_tpot_and_early_stops(bench):
    assert bench.tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert bench.tpot(1.0, 0.1, 1) is None
    short = record(bench, 0.1, [0.1], max_tokens=16)  # stopped at EOS after 2 of 16
    assert bench.compute_metrics([short], 1.0)["early_stops"] == 1
    empty = bench.compute_metrics([], 1.0)
    assert empty["completed"] == 0 and empty["ttft_ms"]["p99"] == 0.0


# -- the SSE client on a scripted stream ----------------------------------------------------------


def _sse(events: list) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _run(bench, handler, chat=False):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            r = bench.RequestRecord("m", 5, 3)
            body = bench.request_body("m", "hi", 3, chat, 0.0, {})
            return await bench.send_one(client, "http://x/v1/completions", {}, body, r, chat), body

    return asyncio.run(go())


def test_client_reads_a_chat_stream_like_vllm(bench):
    import httpx

    def chunk(delta, finish=None):
        return {"id": "chatcmpl-abc", "choices": [{"delta": delta, "finish_reason": finish}]}

    events = [chunk({"role": "assistant"}), chunk({"content": "He"}), chunk({"content": "llo"}),
              chunk({"content": "!"}), chunk({}, "length"),
              {"id": "chatcmpl-abc", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "[DONE]"]
    r, body = _run(bench, lambda req: httpx.Response(200, content=_sse(events)), chat=True)
    assert body["stream_options"] == {"include_usage": True} and body["messages"][0]["content"] == "hi"
    assert r.success and r.text == "Hello!" and r.chunks == 3 and len(r.itl) == 2  # the role chunk is not a token
    assert (r.output_tokens, r.prompt_tokens, r.finish_reason, r.response_id) == (3, 5, "length", "chatcmpl-abc")
    assert 0 < r.ttft <= r.e2el


def test_client_records_refusals_and_broken_streams(bench):
    import httpx

    r, _ = _run(bench, lambda req: httpx.Response(503, json={"error": {"message": "no worker", "code": "no_worker"}}))
    assert not r.success and r.status == 503 and r.error == "no worker"
    mid = [{"id": "cmpl-1", "choices": [{"text": "a"}]}, {"error": {"code": "dead_letter", "message": "crashed"}}]
    r, _ = _run(bench, lambda req: httpx.Response(200, content=_sse(mid)))
    assert not r.success and "dead_letter" in r.error
    cut = [{"id": "cmpl-1", "choices": [{"text": "a"}]}]
    r, _ = _run(bench, lambda req: httpx.Response(200, content=_sse(cut)))
    assert not r.success and "without [DONE]" in r.error

    def boom(req):
        raise httpx.ConnectError("refused")

    r, _ = _run(bench, boom)
    assert not r.success and r.status == 0 and r.error.startswith("transport")


# -- one tiny run on a live local stack ----------------------------------------------------------


def test_compare_run_on_a_local_stack_writes_json_and_plot(bench, tmp_path, demo_model_dir):
    out = tmp_path / "serving.json"
    report = bench.main(["--compare", "--no-transformers", "--adapters", "1", "--num-prompts", "3", "--shape", "8x4",
                         "--rates", "inf", "--concurrency", "2", "--slo-ttft-ms", "60000", "--gpu-hour-usd", "1",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["series"] == json.loads(json.dumps(report["series"]))
    labels = [s["label"] for s in saved["series"]]
    assert labels == ["hotswap base", "hotswap mixed"]
    assert [m for m, _ in saved["series"][1]["mix"]] == ["smollm2-135m-instruct", "lora-0"]
    for s in saved["series"]:
        (point,) = s["points"]
        m = point["metrics"]
        assert point["shape"] == {"input_len": 8, "output_len": 4} and point["rate"] is None
        assert point["concurrency"] == 2
        assert m["completed"] == 3 and m["failed"] == 0
        assert m["total_input_tokens"] == 24  # the server's prompt_tokens: the prompts are exactly 8 tokens
        assert 3 <= m["total_output_tokens"] <= 12
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(m[key]) == {"mean", "std", "p50", "p90", "p99"}
        assert m["output_throughput"] > 0 and m["request_goodput"] > 0 and m["usd_per_1m_output_tokens"] > 0
    assert saved["comparisons"][0]["series"] == "hotswap mixed"
    assert saved["comparisons"][0]["against"] == "hotswap base"
    assert sum(saved["series"][1]["points"][0]["metrics"]["requests_per_model"].values()) == 3
    png = out.with_suffix(".png")
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
