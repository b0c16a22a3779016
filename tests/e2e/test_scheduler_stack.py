"""The scheduler and worker service end to end: real Redis, real `hotswap worker` Celery
subprocesses running the demo model on CPU, a real `hotswap scheduler` subprocess.

Covers what the scheduler issue must show: requests for several adapters come back equal to the
engine run directly and were dispatched in per-model batches; kill -9 of a worker mid-batch loses
and duplicates nothing and requeues within the lease; a poison request ends in dead-letter after K
tries while the others complete; SIGTERM drains without losing anything.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from hotswap import keys
from hotswap.protocol import GenerationRequest, ModelTarget, SamplingSpec
from scheduler.queues import Queues
from tests.stack import Stack, stack_env, wait_results

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):", "Once upon a time,"]


@pytest.fixture
def file_storage(tmp_path):
    return {"HOTSWAP_STORAGE_URL": f"file://{tmp_path / 'store'}"}


@pytest.fixture
def registered_adapters(redis_client, file_storage, demo_model_dir, tmp_path_factory):
    """Three LoRA adapters of tenant acme in the registry (files in the stack's storage)."""
    from adapters.format import inspect_lora_adapter
    from adapters.registry import Registry
    from hotswap.storage import open_store
    from tests.factories import make_peft_adapter

    registry = Registry(redis_client, open_store(url=file_storage["HOTSWAP_STORAGE_URL"]))
    base_config = json.loads((demo_model_dir / "config.json").read_text())
    out = {}
    for i, name in enumerate(["support-bot", "sql-helper", "poet"]):
        path = make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("lora") / name, seed=i + 1, r=8,
                                 lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
        record = registry.register("acme", name, "lora", BASE, path, inspect_lora_adapter(path, base_config))
        out[name] = (record, path)
    return out


def make_request(tok, prompt: str, target: ModelTarget, *, max_tokens: int = 16, priority: str = "batch",
                 batch_id: str | None = None) -> GenerationRequest:
    return GenerationRequest(tenant="acme", base_model=BASE, model=target.ref or BASE, target=target,
                             prompt_token_ids=tok.encode(prompt), priority=priority, batch_id=batch_id,
                             sampling=SamplingSpec(max_tokens=max_tokens, temperature=0.0))


def lora(record) -> ModelTarget:
    return ModelTarget(kind="lora", ref=f"acme/{record.ref}", digest=record.digest)


def result_entries(client, request_id: str) -> int:
    return sum(1 for _, fields in client.xrange(keys.output(request_id)) if b"result" in fields)


def test_mixed_adapters_match_the_engine_and_run_in_per_model_batches(
        redis_client, file_storage, registered_adapters, demo_model_dir, demo_tokenizer, tmp_path):
    env = stack_env(redis_url_of(redis_client), file_storage, demo_model_dir, tmp_path / "cache")
    queues = Queues(redis_client)
    targets = {"base": ModelTarget(kind="base")} | {n: lora(r) for n, (r, _) in registered_adapters.items()}
    with Stack(env, tmp_path / "logs", workers=1):
        # Made now: a request's age counts from its creation, and all must arrive within the window.
        requests = [make_request(demo_tokenizer, p, t) for p in PROMPTS for t in targets.values()]
        for req in requests:
            queues.submit(req)
        results = wait_results(queues, [r.id for r in requests])

    # Equal to the engine run directly on the same weights.
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", max_loras=4, kv_cache_gb=0.1,
                                  cpu_tuning="off"))  # the workers' matmul paths: see tests/stack.py
    for name, (_, path) in registered_adapters.items():
        engine.register_adapter(name, path)
    names = [None if name == "base" else name for name in targets]
    direct = engine.generate([demo_tokenizer.encode(p) for p in PROMPTS for _ in names],
                             SamplingParams(max_tokens=16, temperature=0.0),
                             adapters=[n for _ in PROMPTS for n in names])
    for req, want in zip(requests, direct):
        got = results[req.id]
        assert got.status == "completed", got.error
        assert got.token_ids == want.token_ids, (req.model, req.prompt_token_ids)
        assert got.text == want.text

    # Dispatched in batches of one model each, several requests per batch.
    log = [json.loads(e) for e in redis_client.lrange(keys.DISPATCH_LOG, 0, -1)]
    by_queue: dict[str, int] = {}
    for entry in log:
        models = {json.loads(redis_client.hget(keys.request(i), "spec"))["target"]["kind"] for i in entry["ids"]}
        assert len(models) == 1
        by_queue[entry["queue"]] = by_queue.get(entry["queue"], 0) + 1
    assert sum(len(e["ids"]) for e in log) == len(requests)
    assert len(by_queue) == len(targets)
    assert len(log) < len(requests) / 2, f"{len(log)} batches for {len(requests)} requests: not grouped"


def redis_url_of(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def test_kill_9_mid_batch_loses_and_duplicates_nothing(redis_client, file_storage, demo_model_dir,
                                                      demo_tokenizer, tmp_path):
    env = stack_env(redis_url_of(redis_client), file_storage, demo_model_dir, tmp_path / "cache")
    queues = Queues(redis_client)
    requests = [make_request(demo_tokenizer, PROMPTS[i % 4] + " " * (i // 4), ModelTarget(kind="base"),
                             max_tokens=40, batch_id="job1") for i in range(12)]
    with Stack(env, tmp_path / "logs", workers=2) as stack:
        for req in requests:
            queues.submit(req)

        def a_running_worker():
            states = [queues.state(r.id) for r in requests]
            return next((s["worker"] for s in states if s.get("state") == "running"), None)

        victim = wait_until(a_running_worker, 120, "no request started running")
        time.sleep(1.0)  # mid-batch: some tokens produced, none finished
        victims = [r.id for r in requests if queues.state(r.id).get("worker") == victim]
        stack.kill_worker(stack.worker_index(victim))
        killed_at = time.time()
        results = wait_results(queues, [r.id for r in requests])

    assert victims
    for rid in victims:
        state = queues.state(rid)
        assert results[rid].worker != victim
        assert int(state["attempts"]) == 1  # one crashed run, then completed elsewhere
        assert float(state["requeued_at"]) - killed_at < 2.0 + 1.5  # lease (2 s) + reaper period + slack
    for req in requests:
        assert results[req.id].status == "completed"
        assert result_entries(redis_client, req.id) == 1  # exactly one result per request
    finished = [i.decode() for i in redis_client.lrange(keys.job_finished("job1"), 0, -1)]
    assert sorted(finished) == sorted(r.id for r in requests)  # none lost, none twice


def test_poison_request_is_dead_lettered_while_others_complete(redis_client, file_storage, demo_model_dir,
                                                              demo_tokenizer, tmp_path):
    env = stack_env(redis_url_of(redis_client), file_storage, demo_model_dir, tmp_path / "cache",
                    HOTSWAP_FAULT_CRASH_MARKER="POISON-PILL", HOTSWAP_MAX_ATTEMPTS=3)
    queues = Queues(redis_client)
    poison = make_request(demo_tokenizer, "Please read POISON-PILL aloud", ModelTarget(kind="base"))
    others = [make_request(demo_tokenizer, p, ModelTarget(kind="base"), max_tokens=8) for p in PROMPTS]
    with Stack(env, tmp_path / "logs", workers=2, supervise=True) as stack:
        for req in [poison, *others]:
            queues.submit(req)
        results = wait_results(queues, [poison.id, *[r.id for r in others]], timeout=400)
        restarts = stack.restarts

    bad = results[poison.id]
    assert bad.status == "failed"
    assert bad.error["code"] == "dead_letter"
    assert "3 times" in bad.error["message"]
    assert redis_client.zscore(keys.DEAD, poison.id) is not None
    assert restarts >= 3  # each try crashed a worker, which the supervisor restarted
    for req in others:
        assert results[req.id].status == "completed", results[req.id].error
        assert int(queues.state(req.id)["attempts"]) < 3


def test_sigterm_drains_without_losing_anything(redis_client, file_storage, demo_model_dir, demo_tokenizer,
                                               tmp_path):
    env = stack_env(redis_url_of(redis_client), file_storage, demo_model_dir, tmp_path / "cache",
                    HOTSWAP_DRAIN_TIMEOUT_S=1.5)
    queues = Queues(redis_client)
    # 400 tokens without EOS take seconds: longer than the 1.5 s drain, so they are requeued
    long = [make_request(demo_tokenizer, p, ModelTarget(kind="base"), max_tokens=400) for p in PROMPTS[:2]]
    for req in long:
        req.sampling = SamplingSpec(max_tokens=400, temperature=0.0, ignore_eos=True)
    with Stack(env, tmp_path / "logs", workers=2) as stack:
        for req in long:
            queues.submit(req)
        first = wait_until(lambda: next((queues.state(r.id)["worker"] for r in long
                                         if queues.state(r.id).get("state") == "running"), None),
                           120, "nothing started")
        index = stack.worker_index(first)
        stack.kill_worker(index, signal.SIGTERM)
        assert stack.workers[index].wait(timeout=60) == 0
        exited_at = time.time()
        results = wait_results(queues, [r.id for r in long], timeout=400)

    requeued = 0
    for req in long:
        assert results[req.id].status == "completed"
        if results[req.id].worker == first:  # it finished inside the drain: allowed, before the exit
            assert results[req.id].finished_at <= exited_at
        requeued += "requeued_at" in queues.state(req.id)  # handed back by the draining worker ...
        assert int(queues.state(req.id)["attempts"]) == 0  # ... without counting as a crash
        assert result_entries(redis_client, req.id) == 1
    assert requeued >= 1  # 400 tokens cannot finish in the 1.5 s drain
