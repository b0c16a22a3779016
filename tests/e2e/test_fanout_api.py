"""Several prompts, n > 1 and the output controls through a live stack (real Redis, scheduler,
Celery worker with the demo model, the API over HTTP), with the official `openai` client and raw SSE."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest

from hotswap import keys
from scheduler.queues import Queues

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name a famous painter."}]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, a fox"]


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.key, max_retries=0, timeout=120)


def post(live_stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(live_stack.url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {live_stack.key}"})


def sse(live_stack, path: str, body: dict) -> list:
    """The data of every server-sent event, parsed; the literal "[DONE]" kept as a string."""
    events = []
    with httpx.stream("POST", live_stack.url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {live_stack.key}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def request_id(response_id: str) -> str:
    return "req_" + response_id.split("-", 1)[1]


def latest_spec(live_stack):
    """The request most recently written to Redis (a failed stream may carry no response id)."""
    queues = Queues(live_stack.redis)
    specs = [queues.spec(keys.text(key).removeprefix(keys.request(""))) for key in
             live_stack.redis.scan_iter(match=keys.request("*"), count=1000)]
    return max((s for s in specs if s is not None), key=lambda s: s.created_at)


def engine_has(field: str) -> bool:
    from worker.engine.sampling_params import SamplingParams

    return field in {f.name for f in dataclasses.fields(SamplingParams)}


# -- the prompt contract ----------------------------------------------------------------------------

def test_list_of_id_lists_answers_each_prompt_as_if_alone(live_stack, client, demo_tokenizer):
    ids = [demo_tokenizer.encode(p) for p in PROMPTS]
    alone = [client.completions.create(model=BASE, prompt=p, max_tokens=8, temperature=0) for p in ids]
    together = client.completions.create(model=BASE, prompt=ids, max_tokens=8, temperature=0)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert [c.finish_reason for c in together.choices] == [a.choices[0].finish_reason for a in alone]
    assert together.usage.prompt_tokens == sum(map(len, ids))
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    # The same prompts as text, and one prompt as a flat id list, answer the same.
    texts = client.completions.create(model=BASE, prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in texts.choices] == [c.text for c in together.choices]
    flat = client.completions.create(model=BASE, prompt=ids[1], max_tokens=8, temperature=0)
    assert flat.choices[0].text == together.choices[1].text


def test_token_ids_are_used_as_sent(live_stack, demo_tokenizer):
    """No re-tokenizing and no BOS: the stored request holds exactly the ids sent."""
    ids = [demo_tokenizer.encode(" fox")[0]] * 3 + demo_tokenizer.encode("jumps")
    events = sse(live_stack, "/v1/completions", {"model": BASE, "prompt": [ids], "max_tokens": 2, "temperature": 0,
                                                 "stream": True})
    spec = Queues(live_stack.redis).spec(request_id(events[0]["id"]))
    assert spec.prompt_token_ids == ids


@pytest.mark.parametrize("body, param", [
    ({"prompt": [[1, 2], [3, 10**7]]}, "prompt.1.1"),
    ({"prompt": [5, -1]}, "prompt.1"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], []]}, "prompt.1"),
    ({"prompt": [[1], "x"]}, "prompt.1"),
    ({"prompt": [[1]] * 33}, "prompt"),  # HOTSWAP_MAX_PROMPTS_PER_REQUEST (32)
    ({"prompt": "hi", "n": 9}, "n"),  # HOTSWAP_MAX_N (8)
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"prompt": "hi", "presence_penalty": -3}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "min_tokens": 20}, "min_tokens"),  # over the default max_tokens (16)
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "hi", "stop_token_ids": [10**7]}, "stop_token_ids.0"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),  # OpenAI's legacy limit is 5
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
])
def test_bad_prompts_and_controls_are_400s_naming_the_field(live_stack, body, param):
    waiting = Queues(live_stack.redis).waiting("realtime")
    r = post(live_stack, "/v1/completions", {"model": BASE, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"
    assert Queues(live_stack.redis).waiting("realtime") == waiting  # nothing was queued


def test_chat_refusals_that_remain(live_stack):
    unenforceable = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"const": 1}}}}
    for extra, param in [({"response_format": unenforceable}, "response_format"),
                         ({"top_logprobs": 2}, "top_logprobs"), ({"n": 9}, "n")]:
        r = post(live_stack, "/v1/chat/completions", {"model": BASE, "messages": MESSAGES, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# -- n > 1 ------------------------------------------------------------------------------------------

def test_greedy_n_gives_identical_choices(client):
    one = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=10, temperature=0)
    three = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=10, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens_details.cached_tokens <= three.usage.prompt_tokens


def _prefix_cache_samples(live_stack) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(live_stack.url + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("hotswap:prefix_cache_") and s.labels == {"base": BASE}}


def test_n_choices_prefill_their_prompt_once(live_stack, client, demo_tokenizer):
    """The engine counts prompt tokens looked up and found in the prefix cache: with n=4, the
    prompt's full blocks are computed by one choice and found by the three others (the engine holds a
    sibling back one step rather than compute a block another sequence is computing)."""
    prompt = f"Run {time.time_ns()}: " + "List the steps to reset a password on the support portal. " * 6
    n = len(demo_tokenizer.encode(prompt))
    full = (n - 1) // 16 * 16  # the engine's 16-token blocks; the last prompt token is always computed
    time.sleep(2.5)  # earlier requests are finished and flushed (heartbeat_s = 1)
    before = _prefix_cache_samples(live_stack)
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0, n=4)
    assert len({c.text for c in out.choices}) == 1
    deadline = time.monotonic() + 10
    while True:  # workers flush their counters with each heartbeat
        after = _prefix_cache_samples(live_stack)
        grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        if grown.get("hotswap:prefix_cache_queries_total", 0) >= 4 * n or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert grown["hotswap:prefix_cache_queries_total"] == 4 * n
    assert grown["hotswap:prefix_cache_hits_total"] == 3 * full > 0  # computed once, found three times


def test_seeded_n_differs_and_reproduces(client):
    kwargs = dict(model=BASE, prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=1234, n=3)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    again = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == again
    assert len(set(first)) > 1
    single = client.completions.create(**{**kwargs, "n": 1}).choices[0].text
    assert single == first[0]  # choice 0 keeps the request's own seed


def test_streamed_n_interleaves_indexes_and_sums_usage(live_stack, client, demo_tokenizer):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=BASE, prompt=prompt, max_tokens=10, temperature=0, n=2)
    events = sse(live_stack, "/v1/completions", {"model": BASE, "prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                 "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    usage, chunks = chunks[-1], chunks[:-1]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(demo_tokenizer.encode(prompt))
    assert usage["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole.choices[index].text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [whole.choices[index].finish_reason]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


def test_streamed_several_prompts_times_n(live_stack, client):
    body = {"model": BASE, "prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0, "n": 2}
    whole = client.completions.create(**body)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.choices[0].text == whole.choices[1].text and whole.choices[2].text == whole.choices[3].text
    events = sse(live_stack, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    for index in range(4):
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == index)
        assert text == whole.choices[index].text


def test_chat_n_streamed_and_not(client):
    kwargs = dict(model=BASE, messages=MESSAGES, max_tokens=8, temperature=0, n=2)
    whole = client.chat.completions.create(**kwargs)
    assert len(whole.choices) == 2 and whole.choices[0].message.content == whole.choices[1].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]  # each choice opens with its role
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def _unfinished(live_stack) -> list[str]:
    """Requests of this stack still queued, assigned or running."""
    r = live_stack.redis
    ids = []
    for key in r.scan_iter(match=keys.request("*"), count=1000):
        state = r.hget(key, "state")
        if state in (b"queued", b"assigned", b"running"):
            ids.append(keys.text(key))
    return ids


def test_client_disconnect_cancels_every_choice(live_stack):
    assert _unfinished(live_stack) == []
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 400, "temperature": 0.8, "n": 3, "stream": True}
    with httpx.stream("POST", live_stack.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {live_stack.key}"}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: ") and '"content"' in line)  # tokens flow
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _unfinished(live_stack):
        time.sleep(0.1)
    assert _unfinished(live_stack) == []


# -- output controls --------------------------------------------------------------------------------

CONTROLS = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.3, "min_tokens": 2,
            "stop_token_ids": [7, 11]}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "1, 1, 1, 1,"}),
])
def test_output_controls_reach_the_stored_request(live_stack, path, body):
    """Every control is carried to the GenerationRequest the worker reads, with the values sent."""
    events = sse(live_stack, path, {"model": BASE, **body, **CONTROLS, "max_tokens": 6, "temperature": 0,
                                    "stream": True})
    assert events[-1] == "[DONE]"
    spec = latest_spec(live_stack)
    assert {name: getattr(spec.sampling, name) for name in CONTROLS} == CONTROLS
    if not engine_has("frequency_penalty"):  # the engine's penalties are another branch's: a clear 400 until then
        error = next(e for e in events[:-1] if "error" in e)["error"]
        assert "does not support" in error["message"] and "frequency_penalty" in error["message"]


def test_stop_token_ids_stop_generation(live_stack, client):
    """stop_token_ids reach the engine: stopping on the greedy answer's third token ends it there."""
    prompt = "The three primary colors are"
    events = sse(live_stack, "/v1/completions", {"model": BASE, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                 "stream": True})
    greedy = Queues(live_stack.redis).result(request_id(events[0]["id"]))
    if len(set(greedy.token_ids[:3])) < 3:
        pytest.skip("the greedy answer repeats a token early")
    stopped = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [greedy.token_ids[2]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 3
    assert greedy.text.startswith(stopped.choices[0].text)


@pytest.mark.skipif(not engine_has("frequency_penalty"), reason="needs the engine's penalties (SamplingParams."
                                                                "frequency_penalty), another branch's work")
def test_a_strong_frequency_penalty_changes_a_repeating_greedy_answer(client):
    kwargs = dict(model=BASE, prompt="1, 1, 1, 1, 1, 1, 1, 1,", max_tokens=12, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    penalised = client.completions.create(**kwargs, frequency_penalty=2.0).choices[0].text
    assert plain != penalised
    assert plain.count("1") > penalised.count("1")
