"""scripts/benchkit: the metric definitions on synthetic timelines, SSE parsing on a scripted stream,
exact prompt lengths with the demo tokenizer, arrivals and mixes, and the random-model cache."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from tests.script_modules import benchkit_module


@pytest.fixture(scope="module")
def workload():
    with benchkit_module("workload") as module:
        yield module


@pytest.fixture(scope="module")
def client():
    with benchkit_module("client") as module:
        yield module


@pytest.fixture(scope="module")
def stats():
    with benchkit_module("stats") as module:
        yield module


def record(client, ttft, gaps, output_tokens=None, model="m", max_tokens=None, status=200, success=True):
    """A finished request whose text chunks came at ttft, ttft+gaps[0], ...; e2el = the last one."""
    n = output_tokens if output_tokens is not None else len(gaps) + 1
    r = client.RequestRecord(model, prompt_len=10, max_tokens=max_tokens or n)
    r.ttft, r.itl, r.e2el = ttft, list(gaps), ttft + sum(gaps)
    r.output_tokens, r.success, r.status, r.chunks = n, success, status, len(gaps) + 1
    r.prompt_tokens, r.usage_reported = 10, True
    return r


# -- workload -------------------------------------------------------------------------------------


def test_shapes_rates_and_mixes_parse(workload):
    assert workload.parse_shape("128x4") == workload.Shape(128, 4)
    assert workload.parse_shape("2000X100").name == "2000x100"
    for bad in ("128", "0x4", "axb"):
        with pytest.raises(Exception):
            workload.parse_shape(bad)
    assert workload.parse_rates("0.5,2,inf") == [0.5, 2.0, math.inf]
    with pytest.raises(Exception):
        workload.parse_rates("0")
    assert workload.parse_mix("base,lora-a:2,lora-b", "smol") == [("smol", 1.0), ("lora-a", 2.0), ("lora-b", 1.0)]
    with pytest.raises(ValueError):
        workload.parse_mix("base:0", "smol")
    weights = dict(workload.zipf_mix(["a", "b", "c", "d"], 1.0))
    assert weights == pytest.approx({"a": 1.0, "b": 0.5, "c": 1 / 3, "d": 0.25})


def test_poisson_arrivals_are_seeded_with_the_asked_mean_gap(workload):
    a = workload.arrival_offsets(4000, 2.0, seed=1)
    assert a == workload.arrival_offsets(4000, 2.0, seed=1)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert np.mean(np.diff(a)) == pytest.approx(0.5, rel=0.05)  # exponential gaps of mean 1/rate
    bursty = np.diff(workload.arrival_offsets(4000, 2.0, burstiness=0.25, seed=1))
    assert np.mean(bursty) == pytest.approx(0.5, rel=0.1) and np.std(bursty) > 1.5 * np.std(np.diff(a))
    assert workload.arrival_offsets(5, math.inf) == [0.0] * 5


def test_model_assignment_follows_the_weights(workload):
    models = workload.assign_models(3000, [("base", 3.0), ("a", 1.0)], seed=0)
    assert models == workload.assign_models(3000, [("base", 3.0), ("a", 1.0)], seed=0)
    assert models.count("base") / 3000 == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_have_the_exact_token_length(workload, demo_tokenizer, chat):
    maker = workload.PromptMaker(demo_tokenizer, chat=chat)
    for n in (40, 128, 2000) if chat else (1, 7, 32, 128, 2000):
        prompts = {maker.make(n, i, seed=0) for i in range(3)}
        assert len(prompts) == 3  # rotated per request
        assert all(maker.count(p) == n for p in prompts), n
    assert maker.make(64, 0, seed=0) == maker.make(64, 0, seed=0)


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_follow_vllm_definitions_on_a_synthetic_timeline(client, stats):
    records = [
        record(client, 0.10, [0.02, 0.03, 0.05]),          # 4 tokens: TPOT (0.2 - 0.1) / 3
        record(client, 0.30, [0.04] * 9),                   # 10 tokens
        record(client, 0.05, [], output_tokens=1),          # 1 token: no TPOT, counts 0 for goodput
        record(client, 0.0, [], status=503, success=False),
    ]
    records[3].output_tokens = 0
    m = stats.compute_metrics(records, duration_s=2.0, slo_ms={"ttft": 200, "tpot": 35}, gpu_hour_usd=3.6)
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


def test_tpot_and_early_stops(client, stats):
    assert stats.tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert stats.tpot(1.0, 0.1, 1) is None
    short = record(client, 0.1, [0.1], max_tokens=16)  # stopped at EOS after 2 of 16
    assert stats.compute_metrics([short], 1.0)["early_stops"] == 1
    empty = stats.compute_metrics([], 1.0)
    assert empty["completed"] == 0 and empty["ttft_ms"]["p99"] == 0.0


# -- the SSE client on a scripted stream ----------------------------------------------------------


def _sse(events: list) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _run(client, handler, chat=False):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            r = client.RequestRecord("m", 5, 3)
            body = client.request_body("m", "hi", 3, chat, 0.0, {})
            return await client.send_one(http, "http://x/v1/completions", {}, body, r, chat), body

    return asyncio.run(go())


def test_client_reads_a_chat_stream_like_vllm(client):
    import httpx

    def chunk(delta, finish=None):
        return {"id": "chatcmpl-abc", "choices": [{"delta": delta, "finish_reason": finish}]}

    events = [chunk({"role": "assistant"}), chunk({"content": "He"}), chunk({"content": "llo"}),
              chunk({"content": "!"}), chunk({}, "length"),
              {"id": "chatcmpl-abc", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "[DONE]"]
    r, body = _run(client, lambda req: httpx.Response(200, content=_sse(events)), chat=True)
    assert body["stream_options"] == {"include_usage": True} and body["messages"][0]["content"] == "hi"
    assert r.success and r.text == "Hello!" and r.chunks == 3 and len(r.itl) == 2  # the role chunk is not a token
    assert (r.output_tokens, r.prompt_tokens, r.finish_reason, r.response_id) == (3, 5, "length", "chatcmpl-abc")
    assert 0 < r.ttft <= r.e2el


def test_client_records_refusals_and_broken_streams(client):
    import httpx

    r, _ = _run(client, lambda req: httpx.Response(503, json={"error": {"message": "no worker", "code": "no_worker"}}))
    assert not r.success and r.status == 503 and r.error == "no worker"
    mid = [{"id": "cmpl-1", "choices": [{"text": "a"}]}, {"error": {"code": "dead_letter", "message": "crashed"}}]
    r, _ = _run(client, lambda req: httpx.Response(200, content=_sse(mid)))
    assert not r.success and "dead_letter" in r.error
    cut = [{"id": "cmpl-1", "choices": [{"text": "a"}]}]
    r, _ = _run(client, lambda req: httpx.Response(200, content=_sse(cut)))
    assert not r.success and "without [DONE]" in r.error

    def boom(req):
        raise httpx.ConnectError("refused")

    r, _ = _run(client, boom)
    assert not r.success and r.status == 0 and r.error.startswith("transport")


# -- random models --------------------------------------------------------------------------------


def test_random_model_dir_is_built_once_and_reused(tmp_path):
    """--random-model-dir: a finished model of the same shape and seed is reused (the GPU proof's steps share one)."""
    import torch

    cpu = torch.device("cpu")
    with benchkit_module("random_models") as rm:
        model_dir = rm.ensure_random_model("llama3-tiny", tmp_path / "m", cpu, seed=0)
        weights = model_dir / "model.safetensors"
        built = weights.stat().st_mtime_ns
        assert rm.ensure_random_model("llama3-tiny", model_dir, cpu, seed=0) == model_dir
        assert weights.stat().st_mtime_ns == built
        rm.ensure_random_model("llama3-tiny", model_dir, cpu, seed=1)  # another seed: rebuilt in place
        assert weights.stat().st_mtime_ns != built and "seed 1" in (model_dir / rm.DONE_MARKER).read_text()


def test_a_servable_random_model_carries_the_tokenizer(tmp_path, demo_model_dir):
    """bench_serving's --random-model: vocab = the tokenizer's, its files copied, 8192 positions."""
    from hotswap.tokenizer import Tokenizer

    with benchkit_module("random_models") as rm:
        out = rm.build_servable_random_model("llama3-tiny", tmp_path / "m", demo_model_dir, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == Tokenizer(demo_model_dir).vocab_size
    assert config["max_position_embeddings"] == 8192 and config["hidden_size"] == 128
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
