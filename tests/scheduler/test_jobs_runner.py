"""The batch job runner's state machine on a real Redis and real file:// object storage.

The runner's `tick` is driven directly, and requests are run by `FakeWorker`, which takes, claims
and completes them through `Queues` exactly as a worker does (only the text is made up), so these
tests are fast and deterministic. The live stack with real workers: tests/e2e/test_batch_stack.py.
"""

from __future__ import annotations

import json
import time

import pytest

from hotswap.protocol import GenerationResult
from hotswap import keys
from scheduler.batchjobs.runner import JobRunner
from scheduler.batchjobs.records import JobStateError, JobStore
from scheduler.prepare import ServedModel
from scheduler.queues import Queues

BASE = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"


class FakeWorker:
    """Takes queued requests, claims and completes them through `Queues`, as `hotswap worker` does."""

    def __init__(self, redis_client, worker_id: str = "fake-w1"):
        self.redis, self.id = redis_client, worker_id
        self.queues = Queues(redis_client)

    def take(self, n: int = 10_000) -> list:
        """Assign and claim up to n queued requests; returns [(request, attempt)]."""
        self.redis.set(keys.worker_alive(self.id), "1", px=60_000)
        got = []
        for stat in self.queues.stats(BASE):
            for rid in self.queues.take(stat.name, n - len(got), self.id, 100_000):
                claimed = self.queues.claim(rid, self.id)
                if claimed:
                    got.append(claimed)
        return got

    def finish(self, claimed, status: str = "completed", error: dict | None = None) -> None:
        req, attempt = claimed
        text = f"answer to {req.custom_id} by {req.model}"
        result = GenerationResult(id=req.id, status=status, text=text if status == "completed" else "",
                                  token_ids=[1, 2, 3], finish_reason="length" if status == "completed" else None,
                                  prompt_tokens=len(req.prompt_token_ids), completion_tokens=3, error=error,
                                  worker=self.id, attempts=attempt)
        assert self.queues.complete(result, self.id, attempt)

    def run(self, n: int = 10_000) -> int:
        claimed = self.take(n)
        for c in claimed:
            self.finish(c)
        return len(claimed)

    def apply_cancels(self) -> int:
        ids = self.queues.pop_cancels(self.id)
        for rid in ids:
            req_raw = self.redis.hget(keys.request(rid), "attempts")
            self.queues.complete(GenerationResult(id=rid, status="cancelled", finish_reason="abort"), self.id,
                                 int(req_raw))
        return len(ids)


def chat_line(custom_id: str, model: str = BASE, content: str = "Say hi.", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT,
                       "body": {"model": model, "messages": [{"role": "user", "content": content}],
                                "max_tokens": 4, **body}})


@pytest.fixture
def env(redis_client, tmp_path, demo_tokenizer):
    from adapters.registry import Registry
    from scheduler.batchjobs.files import FileCatalog
    from hotswap.settings import Settings
    from hotswap.storage import open_store

    settings = Settings(storage_url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache",
                        data_dir=tmp_path / "data", batch_feed_window=5, batch_poll_s=0.05)
    store = open_store(settings)
    files = FileCatalog(redis_client, store)
    registry = Registry(redis_client, store)
    served = ServedModel(BASE, demo_tokenizer, 512)

    class Env:
        pass

    e = Env()
    e.redis, e.settings, e.store, e.files, e.registry, e.served = redis_client, settings, store, files, registry, served
    e.jobs = JobStore(redis_client, window_s=settings.batch_completion_window_s)
    e.worker = FakeWorker(redis_client)
    e.runner = lambda runner_id="r1": JobRunner(redis_client, store, files, registry, settings, served=served,
                                                runner_id=runner_id)

    def submit(lines: list[str], endpoint: str = CHAT, tenant: str = "acme", window_s: float | None = None):
        f = files.create(tenant, "batch", "in.jsonl", ("\n".join(lines) + "\n").encode())
        return jobs_create(e.jobs, tenant, f.id, endpoint, window_s)

    e.submit = submit
    return e


def jobs_create(jobs, tenant, file_id, endpoint, window_s):
    return jobs.create(tenant, file_id, endpoint, {"team": "nlp"}, window_s=window_s)


def read_jsonl(files, tenant: str, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in files.read_bytes(tenant, file_id).decode().splitlines()]


def run_to_end(env, runner, job, rounds: int = 200):
    for _ in range(rounds):
        runner.tick()
        env.worker.run()
        record = env.jobs.get(job.tenant, job.id)
        if record.status in ("completed", "failed", "cancelled", "expired"):
            return record
    raise AssertionError(f"job did not end: {record}")


def test_lines_run_at_batch_priority_and_results_join_by_custom_id(env):
    lines = [chat_line(f"c{i}", content=f"Question {i}?") for i in range(7)]
    lines.append(chat_line("bad-model", model="no-such-model"))
    job = env.submit(lines)
    assert job.status == "validating" and job.to_openai()["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    runner = env.runner()
    runner.tick()
    record = env.jobs.get("acme", job.id)
    assert record.status == "in_progress" and record.in_progress_at
    assert (record.total, record.failed, record.prepared, record.model) == (8, 1, 7, BASE)
    # Fed at batch priority, carrying the batch id and custom id.
    claimed = env.worker.take()
    assert len(claimed) == 5  # the feed window
    assert {req.priority for req, _ in claimed} == {"batch"} and {req.batch_id for req, _ in claimed} == {job.id}
    for c in claimed:
        env.worker.finish(c)

    done = run_to_end(env, runner, job)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert (done.total, done.completed, done.failed) == (8, 7, 1)
    assert done.to_openai()["usage"]["output_tokens"] == 21
    out = read_jsonl(env.files, "acme", done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"c{i}" for i in range(7))
    for line in out:
        body = line["response"]["body"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
        assert body["object"] == "chat.completion" and body["model"] == BASE
        assert body["choices"][0]["message"]["content"] == f"answer to {line['custom_id']} by {BASE}"
    errors = read_jsonl(env.files, "acme", done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad-model"]
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors[0]["error"]["code"] == "model_not_found"
    assert env.files.get("acme", done.output_file_id).purpose == "batch_output"
    # Nothing of the job is left behind in Redis or storage.
    assert env.redis.zcard(keys.JOBS_ACTIVE) == 0
    assert not env.redis.exists(keys.job_open(job.id), keys.job_finished(job.id))
    assert not env.store.list(f"tenants/acme/batches/{job.id}/")


def test_completions_endpoint_builds_text_completions(env):
    lines = [json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": BASE, "prompt": f"Count to {i}:", "max_tokens": 3}}) for i in range(3)]
    done = run_to_end(env, env.runner(), env.submit(lines, endpoint="/v1/completions"))
    out = read_jsonl(env.files, "acme", done.output_file_id)
    assert done.status == "completed" and done.error_file_id is None
    assert {line["response"]["body"]["object"] for line in out} == {"text_completion"}
    assert all(line["response"]["body"]["choices"][0]["text"].startswith("answer to p") for line in out)


def test_feeding_keeps_at_most_the_window_queued(env):
    job = env.submit([chat_line(f"c{i}") for i in range(23)])
    runner = env.runner()
    queues = Queues(env.redis)
    runner.tick()
    assert queues.waiting("batch") == 5 and env.redis.scard(keys.job_open(job.id)) == 5
    seen = []
    for _ in range(100):
        runner.tick()
        assert queues.waiting("batch") + len(env.worker.queues.inflight(env.worker.id)) <= 5
        claimed = env.worker.take(2)  # a slow worker: two at a time
        seen += [req.custom_id for req, _ in claimed]
        for c in claimed:
            env.worker.finish(c)
        if env.jobs.get("acme", job.id).status == "completed":
            break
    assert sorted(seen) == sorted(f"c{i}" for i in range(23))  # each line ran exactly once
    assert len(read_jsonl(env.files, "acme", env.jobs.get("acme", job.id).output_file_id)) == 23


def test_a_restarted_runner_resumes_and_writes_nothing_twice(env):
    job = env.submit([chat_line(f"c{i}") for i in range(12)])
    first = env.runner("r1")
    first.tick()
    env.worker.run(3)
    # The runner dies (kill -9) with 3 results uncollected: its lease lapses, and a new process with
    # a clean memory takes over where the records say the job is.
    env.redis.delete(keys.JOBS_RUNNER)
    second = env.runner("r2")
    assert second.tick() == 1
    record = env.jobs.get("acme", job.id)
    assert (record.completed, record.fed) == (3, 8)
    assert first.tick() == 0  # the old one, were it only stalled, cannot work any more
    # A finished id pushed twice (a replayed message) and an id of no open request are not written.
    some = next(iter(env.redis.smembers(keys.job_open(job.id)))).decode()
    env.worker.run()
    env.redis.rpush(keys.job_finished(job.id), some, "req_not_of_this_job")
    done = run_to_end(env, second, job)
    assert done.status == "completed" and (done.completed, done.failed) == (12, 0)
    out = read_jsonl(env.files, "acme", done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"c{i}" for i in range(12))


def test_a_stalled_runner_cannot_write_after_its_lease_moved(env):
    from scheduler.batchjobs.records import LockLost

    job = env.submit([chat_line("a")])
    first = env.runner("r1")
    first.tick()
    env.worker.run()
    env.redis.set(keys.JOBS_RUNNER, "r2")  # r1 stalled past its lease; r2 took over
    with pytest.raises(LockLost):
        first.step("acme", job.id)
    assert env.jobs.get("acme", job.id).completed == 0  # nothing written: r2 will collect it
    assert env.redis.llen(keys.job_finished(job.id)) == 1


def test_output_files_are_not_written_twice_after_a_crash_while_finalizing(env):
    from scheduler.batchjobs.output import write_result_file

    job = env.submit([chat_line(f"c{i}") for i in range(3)])
    runner = env.runner()
    runner.tick()
    env.worker.run()
    # As if a runner had written the output file and died before recording it on the job.
    early = write_result_file(env.files, "acme", f"{job.id}_output.jsonl", [json.dumps({"custom_id": "c0"})])
    done = run_to_end(env, runner, job)
    assert done.output_file_id == early
    assert [f.filename for f in env.files.list("acme", purpose="batch_output")] == [f"{job.id}_output.jsonl"]


def test_cancel_keeps_finished_results_and_drops_the_rest(env):
    job = env.submit([chat_line(f"c{i}") for i in range(10)])
    runner = env.runner()
    runner.tick()
    claimed = env.worker.take(3)
    env.worker.finish(claimed[0])  # done
    env.worker.finish(claimed[1], "failed", {"code": "model_unavailable", "message": "cannot load it"})
    running = claimed[2]  # still running when the cancel comes
    runner.tick()

    cancelling = env.jobs.cancel("acme", job.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert env.jobs.cancel("acme", job.id).status == "cancelling"  # idempotent
    runner.tick()  # queued ones are cancelled at once; the running one is told to abort
    assert Queues(env.redis).waiting("batch") == 0
    assert env.jobs.get("acme", job.id).status == "cancelling"
    assert env.worker.apply_cancels() == 1
    runner.tick()
    done = env.jobs.get("acme", job.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert (done.total, done.completed, done.failed) == (10, 1, 1)
    assert [line["custom_id"] for line in read_jsonl(env.files, "acme", done.output_file_id)] == [claimed[0][0].custom_id]
    errors = read_jsonl(env.files, "acme", done.error_file_id)
    assert [e["custom_id"] for e in errors] == [claimed[1][0].custom_id]
    assert errors[0]["response"]["status_code"] == 503 and errors[0]["error"]["code"] == "model_unavailable"
    assert running[0].custom_id not in {line["custom_id"] for line in errors}


def test_cancel_while_validating_ends_without_running_anything(env):
    job = env.submit([chat_line("a"), chat_line("b")])
    env.jobs.cancel("acme", job.id)
    runner = env.runner()
    runner.tick()
    done = env.jobs.get("acme", job.id)
    assert done.status == "cancelled" and done.output_file_id is None and done.error_file_id is None
    assert Queues(env.redis).waiting("batch") == 0


def test_a_finished_batch_cannot_be_cancelled(env):
    done = run_to_end(env, env.runner(), env.submit([chat_line("a")]))
    with pytest.raises(JobStateError, match="completed"):
        env.jobs.cancel("acme", done.id)


def test_expiry_cancels_what_is_left_and_reports_it_as_batch_expired(env):
    job = env.submit([chat_line(f"c{i}") for i in range(9)], window_s=1.5)
    runner = env.runner()
    runner.tick()
    env.worker.run(2)
    runner.tick()
    claimed = env.worker.take(1)  # running when the window closes
    time.sleep(max(0.0, env.jobs.get("acme", job.id).expires_at - time.time()) + 0.1)
    runner.tick()  # -> finalizing (expired); the queued requests are cancelled, the running one told to
    assert env.jobs.get("acme", job.id).status == "finalizing"
    assert env.worker.apply_cancels() == 1 and claimed
    for _ in range(3):
        runner.tick()
    done = env.jobs.get("acme", job.id)
    assert done.status == "expired" and done.expired_at
    out = read_jsonl(env.files, "acme", done.output_file_id)
    errors = read_jsonl(env.files, "acme", done.error_file_id)
    assert len(out) == 2 and (done.completed, done.failed, done.total) == (2, 7, 9)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and {e["response"] for e in errors} == {None}
    assert sorted(line["custom_id"] for line in out + errors) == sorted(f"c{i}" for i in range(9))


def test_a_bad_file_fails_the_batch_with_errors_per_line(env):
    lines = [chat_line("a"), "not json", chat_line("a"), json.dumps({"custom_id": "c", "method": "GET", "url": CHAT,
                                                                     "body": {}})]
    job = env.submit(lines)
    runner = env.runner()
    runner.tick()
    done = env.jobs.get("acme", job.id)
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    errors = done.to_openai()["errors"]
    assert errors["object"] == "list"
    assert [(e["line"], e["code"]) for e in errors["data"]] == [(2, "invalid_json_line"), (3, "duplicate_custom_id"),
                                                                 (4, "invalid_method")]
    assert Queues(env.redis).waiting("batch") == 0 and env.redis.zcard(keys.JOBS_ACTIVE) == 0
    assert done.to_openai()["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_only_the_lease_holder_runs_jobs(env):
    job = env.submit([chat_line("a")])
    one, two = env.runner("r1"), env.runner("r2")
    assert one.tick() == 1
    assert two.tick() == 0
    assert env.jobs.get("acme", job.id).status == "in_progress"
    one.release()
    assert two.tick() == 1 and one.tick() == 0


def test_the_runner_thread_runs_a_job_to_the_end(env):
    import threading

    job = env.submit([chat_line(f"c{i}") for i in range(6)])
    runner = env.runner()
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while env.jobs.get("acme", job.id).status != "completed" and time.monotonic() < deadline:
            env.worker.run()
            time.sleep(0.02)
    finally:
        runner.stop()
        thread.join(timeout=10)
    assert env.jobs.get("acme", job.id).status == "completed"
    assert not env.redis.exists(keys.JOBS_RUNNER)  # released on stop


def test_prepared_requests_read_back_from_any_position_across_chunks(env):
    from hotswap.protocol import GenerationRequest, ModelTarget, SamplingSpec
    from scheduler.batchjobs.prepared import ChunkWriter, PreparedReader
    from scheduler.batchjobs.records import PREPARED_CHUNK, JobRecord

    n = 2 * PREPARED_CHUNK + 345
    writer = ChunkWriter(env.store, "acme", "batch_x")
    made = [GenerationRequest(tenant="acme", base_model=BASE, model=BASE, target=ModelTarget(kind="base"),
                              prompt_token_ids=[1, i], sampling=SamplingSpec(max_tokens=1), custom_id=f"c{i}")
            for i in range(n)]
    for req in made:
        writer.add(req)
    writer.close()
    assert len(env.store.list("tenants/acme/batches/batch_x/prepared/")) == 3
    record = JobRecord(id="batch_x", tenant="acme", endpoint=CHAT, input_file_id="f", created_at=0, expires_at=1,
                       prepared=n)
    reader = PreparedReader(env.store)
    for start, count in [(0, 5), (995, 10), (PREPARED_CHUNK, 1), (1999, 1200), (n - 3, 100)]:
        got = reader.read(record, start, count)
        assert [r.id for r in got] == [r.id for r in made[start:start + count]]


def test_a_large_job_is_fed_gradually_and_does_not_starve_a_small_one(env):
    big_lines = [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": BASE, "prompt": [1, 2, 3, i % 1000], "max_tokens": 2}})
                 for i in range(2500)]
    big = env.submit(big_lines, endpoint="/v1/completions")
    small = env.submit([chat_line(f"s{i}") for i in range(3)])
    env.settings = env.settings.model_copy(update={"batch_feed_window": 1000})
    from scheduler.batchjobs.runner import JobRunner

    runner = JobRunner(env.redis, env.store, env.files, env.registry, env.settings, served=env.served)
    runner.tick()
    queues = Queues(env.redis)
    assert queues.waiting("batch") == 1000 + 3  # the window of the big job, all of the small one
    assert env.redis.scard(keys.job_open(big.id)) == 1000 and env.redis.scard(keys.job_open(small.id)) == 3
    for _ in range(50):
        runner.tick()
        env.worker.run()
        if env.jobs.get("acme", big.id).status == "completed":
            break
    done = env.jobs.get("acme", big.id)
    assert done.status == "completed" and (done.total, done.completed) == (2500, 2500)
    assert env.jobs.get("acme", small.id).status == "completed"
    out = read_jsonl(env.files, "acme", done.output_file_id)
    assert len({line["custom_id"] for line in out}) == len(out) == 2500
