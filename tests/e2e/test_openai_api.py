"""The OpenAI-compatible real-time API against a live stack, through the official `openai` client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from scheduler.queues import Queues

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name a famous painter."}]


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(live_stack, demo_model_dir, demo_tokenizer):
    """The engine run directly on the same weights: what greedy answers must equal."""
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", max_loras=2, kv_cache_gb=0.1,
                                  dtype="float32", cpu_tuning="off"))  # as the workers run: see tests/stack.py
    engine.register_adapter("support-bot", live_stack.adapter_dir)

    def run(tokens: list[int], adapter: str | None, max_tokens: int) -> str:
        out = engine.generate([tokens], SamplingParams(max_tokens=max_tokens, temperature=0.0), adapters=[adapter])
        return out[0].text

    return run


@pytest.mark.parametrize("model", [BASE, "support-bot"])
def test_chat_equals_the_engine_streamed_or_not(client, direct, demo_tokenizer, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    want = direct(demo_tokenizer.encode_chat(MESSAGES), None if model == BASE else model, 12)
    assert whole.choices[0].message.content == want
    assert whole.model == model
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens == len(demo_tokenizer.encode_chat(MESSAGES))

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_adapter_changes_the_answer(client):
    kwargs = dict(messages=MESSAGES, max_tokens=12, temperature=0)
    base = client.chat.completions.create(model=BASE, **kwargs).choices[0].message.content
    tuned = client.chat.completions.create(model="support-bot@1", **kwargs).choices[0].message.content
    assert base != tuned


@pytest.mark.parametrize("model", [BASE, "support-bot"])
def test_completions_streamed_and_not(client, direct, demo_tokenizer, model):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    want = direct(demo_tokenizer.encode(prompt), None if model == BASE else model, 10)
    assert whole.choices[0].text == want
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_default_completion_length_and_stop(client):
    out = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", temperature=0)
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    stopped = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", temperature=0, max_tokens=30, stop=["7"])
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_models_lists_base_and_own_adapters_only(live_stack, client):
    ids = {m.id: m for m in client.models.list().data}
    assert BASE in ids and "support-bot" in ids
    assert ids["support-bot"].model_extra["parent"] == BASE
    other = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.other_key, max_retries=0)
    assert [m.id for m in other.models.list().data] == [BASE]


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=BASE, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


# -- bad input: a clear 4xx in the OpenAI envelope, never a 500 -----------------------------------

def post(live_stack, path: str, key: str | None = None, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live_stack.key}", **(headers or {})}
    return httpx.post(live_stack.url + path, headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize("body, param", [
    ({"model": BASE, "messages": "hello"}, "messages"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),  # over HOTSWAP_MAX_N
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_bad_bodies_get_400_naming_the_parameter(live_stack, body, param):
    r = post(live_stack, "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_malformed_json_is_a_400(live_stack):
    r = post(live_stack, "/v1/chat/completions", content=b'{"model": "x", "messages": [',
             headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_too_long_prompt_is_refused_before_queueing(live_stack):
    waiting = Queues(live_stack.redis).waiting("realtime")
    r = post(live_stack, "/v1/completions", json={"model": BASE, "prompt": "hello " * 9000, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(live_stack, "/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert Queues(live_stack.redis).waiting("realtime") == waiting


@pytest.mark.parametrize("model", ["no-such-model", "support-bot@9", "../etc/passwd"])
def test_unknown_model_is_a_404(live_stack, model):
    r = post(live_stack, "/v1/chat/completions", json={"model": model, "messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_another_tenants_adapter_is_a_404(live_stack):
    r = post(live_stack, "/v1/chat/completions", key=live_stack.other_key,
             json={"model": "support-bot", "messages": MESSAGES})
    assert r.status_code == 404


def test_missing_or_wrong_key_is_a_401(live_stack):
    r = httpx.post(live_stack.url + "/v1/chat/completions", json={"model": BASE, "messages": MESSAGES})
    assert r.status_code == 401
    r = post(live_stack, "/v1/chat/completions", key="hs-wrong", json={"model": BASE, "messages": MESSAGES})
    assert r.status_code == 401


def test_full_queue_is_a_429_with_retry_after(live_stack):
    from api.app import create_app
    from hotswap.protocol import GenerationRequest, ModelTarget, SamplingSpec
    from tests.api.conftest import LiveServer

    queues = Queues(live_stack.redis)
    # Requests for a base no worker serves wait forever: they hold the tenant's queue full.
    stuck = [GenerationRequest(tenant="acme", base_model="unserved-base", model="x", target=ModelTarget(kind="base"),
                               prompt_token_ids=[1, 2], sampling=SamplingSpec(max_tokens=1)) for _ in range(2)]
    for req in stuck:
        queues.submit(req)
    settings = live_stack.settings.model_copy(update={"max_queued_per_tenant": 2})
    try:
        with LiveServer(create_app(settings)) as api:
            r = httpx.post(api.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {live_stack.key}"},
                           json={"model": BASE, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
            assert r.status_code == 429, r.text
            assert r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
            other = httpx.post(api.url + "/v1/chat/completions",
                               headers={"Authorization": f"Bearer {live_stack.other_key}"},
                               json={"model": BASE, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
            assert other.status_code == 200  # one tenant's full queue does not block another
    finally:
        for req in stuck:
            queues.cancel(req.id)


def test_no_worker_for_the_model_is_a_503(live_stack):
    from api.app import create_app
    from tests.api.conftest import LiveServer

    settings = live_stack.settings.model_copy(update={"base_model": "llama-nobody-serves"})
    with LiveServer(create_app(settings)) as api:
        r = httpx.post(api.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {live_stack.key}"},
                       json={"model": "llama-nobody-serves", "messages": MESSAGES}, timeout=60)
    assert r.status_code == 503 and "hotswap worker" in r.json()["error"]["message"]


def test_client_disconnect_cancels_the_running_request(live_stack):
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {live_stack.key}"}
    with httpx.stream("POST", live_stack.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        next(line for line in lines if line.startswith("data: ") and '"content"' in line)  # tokens flow
    request_id = "req_" + first.split('"id":"chatcmpl-', 1)[1].split('"', 1)[0]
    queues = Queues(live_stack.redis)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and queues.state(request_id).get("state") != "cancelled":
        time.sleep(0.1)
    result = queues.result(request_id)
    assert result is not None and result.status == "cancelled" and result.finish_reason == "abort"
    assert result.completion_tokens < 400


def test_metrics_show_the_traffic(live_stack, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="support-bot", messages=MESSAGES, max_tokens=4, temperature=0)
    deadline = time.monotonic() + 10
    while True:  # workers flush their metrics with each heartbeat
        text = httpx.get(live_stack.url + "/metrics", timeout=30).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        lora = ("model", f"lora:acme/{live_stack.adapter_record.ref}")
        ttft = samples.get(("hotswap:time_to_first_token_seconds_count", (lora, ("priority", "realtime"))), 0)
        if ttft or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert ttft >= 1
    assert samples[("hotswap:generation_tokens_total", (lora, ("priority", "realtime")))] >= 4
    assert samples[("hotswap:workers_up", (("base_model", BASE),))] == 1
    assert samples[("hotswap:batch_size_count", (lora, ("priority", "realtime")))] >= 1
    assert samples[("hotswap:adapter_loads_total", (lora,))] >= 1


def _prefix_cache_samples(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("hotswap:prefix_cache_") and s.labels == {"base": BASE}}


def _wait_for_metrics(url: str, until) -> dict:
    deadline = time.monotonic() + 10
    while True:  # workers flush their metrics with each heartbeat
        samples = _prefix_cache_samples(url)
        if until(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


def test_repeated_prompt_reports_cached_tokens(live_stack, client, demo_tokenizer):
    """The first request computes its prompt (cached_tokens 0); a repeat reuses its full KV blocks
    (the last prompt token is always computed), streamed or not; /metrics counts queries and hits."""
    prompt = f"Case {time.time_ns()}: " + "Summarise the policy on refunds, returns and exchanges. " * 8
    n = len(demo_tokenizer.encode(prompt))
    full = (n - 1) // 16 * 16  # 16: the worker engine's block_size (EngineConfig's default)
    time.sleep(2.5)  # earlier tests' requests are all finished: let the worker flush them (heartbeat_s = 1)
    before = _prefix_cache_samples(live_stack.url)

    def cached(**kw) -> int:
        out = client.completions.create(model=BASE, prompt=prompt, max_tokens=2, temperature=0, **kw)
        usage = list(out)[-1].usage if kw.get("stream") else out.usage
        assert usage.prompt_tokens == n
        return usage.prompt_tokens_details.cached_tokens

    assert cached() == 0  # a prompt no request had: nothing cached
    assert cached() == full > 0
    assert cached(stream=True, stream_options={"include_usage": True}) == full
    # The adapter's weights never reuse the base's blocks.
    tuned = client.completions.create(model="support-bot", prompt=prompt, max_tokens=2, temperature=0)
    assert tuned.usage.prompt_tokens_details.cached_tokens == 0

    after = _wait_for_metrics(live_stack.url, lambda s: s.get("hotswap:prefix_cache_queries_total", 0)
                              >= before.get("hotswap:prefix_cache_queries_total", 0) + 4 * n)
    assert after["hotswap:prefix_cache_queries_total"] - before.get("hotswap:prefix_cache_queries_total", 0) == 4 * n
    assert after["hotswap:prefix_cache_hits_total"] - before.get("hotswap:prefix_cache_hits_total", 0) == 2 * full

    # Chat: the chat template's opening is shared by every conversation; a repeat hits its whole prompt.
    messages = [{"role": "user", "content": prompt}]
    n_chat = len(demo_tokenizer.encode_chat(messages))
    client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == (n_chat - 1) // 16 * 16
