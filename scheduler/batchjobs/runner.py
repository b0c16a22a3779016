"""The job runner: advances every active batch job a little each tick (a thread of `hotswap scheduler`).

One step of a job, by status (records, keys and the what-goes-where rule: `scheduler/batchjobs/records.py`):
- validating: read the input file once, judge every line (`lines.validate_lines`), store the
  requests that will run as prepared objects, then in one transaction: -> in_progress (refused
  bodies already in the error list) or -> failed (errors.data). A runner that dies meanwhile
  simply validates again: nothing was published.
- in_progress: collect finished requests, then feed: keep at most HOTSWAP_BATCH_FEED_WINDOW of
  the job's requests in the queues (priority "batch", no global cap), so a 50k-line job neither
  floods Redis nor starves others. Past expires_at: -> finalizing (ending "expired").
- cancelling / finalizing: cancel what is open (cancel or expiry), wait until every open request
  has finished, write the output and error files, -> completed | cancelled | expired.

Exactly once, across restarts (all state is in Redis and storage; a restarted runner resumes):
- feeding: the requests queued in a tick, their ids added to the job's open set and the cursor
  moved past them are one MULTI: a crash either did all of it or nothing (and should a request id
  ever be queued twice, the queue refuses the second with 'exists').
- collecting: ids are read from the head of the job's finished list (each is pushed exactly once by
  the queues), and their result lines appended, the head trimmed, the ids removed from the open
  set and the counts updated in one MULTI; an id not in the open set is dropped, never written.
- files: written under fixed names and looked up before writing, so a runner that died after
  writing one reuses it.
- every write is fenced by the runner lease (`hotswap:jobs:runner`): with several schedulers only
  the holder works, and one that stalled past its lease cannot write anything.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from redis.exceptions import RedisError

from hotswap.base_model import BaseModelMissing, ServedBase, load_served_base
from hotswap.openai_logprobs import needs_tokenizer
from scheduler.batchjobs.files import FileNotFound
from hotswap.protocol import GenerationRequest, GenerationResult
from hotswap.storage import StorageError
from hotswap import keys
from scheduler import lua
from scheduler.batchjobs.lines import validate_lines
from scheduler.batchjobs.output import classify, expired_line, iter_redis_list, unrun_line, write_result_file
from scheduler.batchjobs.prepared import ChunkWriter, PreparedReader, served_model
from scheduler.batchjobs.records import PREPARED_CHUNK, TERMINAL, JobNotFound, JobRecord, JobStore, LockLost, job_prefix, update
from scheduler.prepare import ServedModel
from scheduler.queues import Queues, enqueue_args

log = logging.getLogger("hotswap.jobs")

LEASE_S = 15.0
COLLECT_CHUNK = 1000
VALIDATION_ATTEMPTS = 3  # a validation that raised this often in a row fails its batch instead of looping


class JobRunner:
    def __init__(self, redis_client, store, files, registry, settings, *, served: ServedModel | None = None,
                 runner_id: str | None = None):
        self.redis, self.store, self.files, self.registry, self.settings = redis_client, store, files, registry, settings
        self.jobs = JobStore(redis_client, window_s=settings.batch_completion_window_s)
        self.queues = Queues(redis_client, result_ttl_s=settings.result_ttl_s)
        self._enqueue = redis_client.register_script(lua.ENQUEUE)
        self._renew = redis_client.register_script(lua.RENEW_LEASE)
        self._release = redis_client.register_script(lua.RELEASE_LEASE)
        self.id = runner_id or f"{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._served = served
        self._base: ServedBase | None = None  # loaded on the first validation
        self.prepared = PreparedReader(store)
        self._cancel_sent: set[str] = set()
        self._waiting: set[str] = set()  # jobs we said cannot be validated yet (said once)
        self._validation_failures: dict[str, int] = {}  # job id -> validations that raised in a row
        self.stop_event = threading.Event()

    @classmethod
    def from_settings(cls, redis_client, settings) -> "JobRunner":
        from adapters.registry import Registry
        from scheduler.batchjobs.files import FileCatalog
        from hotswap.storage import open_store

        store = open_store(settings)
        return cls(redis_client, store, FileCatalog(redis_client, store), Registry(redis_client, store), settings)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        log.info("job runner %s running", self.id)
        while not self.stop_event.is_set():
            wait = self.settings.batch_poll_s
            try:
                self.tick()
            except Exception:  # Redis hiccup: log, back off, go on; jobs are all in Redis
                log.exception("job runner round failed")
                wait = max(wait, 1.0)
            self.stop_event.wait(wait)
        try:
            self.release()  # a successor need not wait for the lease to lapse
        except Exception:
            log.warning("could not release the job runner lease; it lapses in %.0f s", LEASE_S)
        log.info("job runner %s stopped", self.id)

    def stop(self) -> None:
        self.stop_event.set()

    def tick(self) -> int:
        """Advance every active job one step; returns how many there were (0 if another runner holds
        the lease)."""
        if not self.acquire():
            self.prepared.forget()
            self._cancel_sent.clear()
            return 0
        members = [keys.text(m) for m in self.redis.zrange(keys.JOBS_ACTIVE, 0, -1)]
        for member in members:
            tenant, _, batch_id = member.partition("/")
            try:
                self.step(tenant, batch_id)
            except LockLost:
                return 0
            except RedisError:
                log.exception("batch %s: step failed on Redis (retried next round)", batch_id)
            except Exception:
                log.exception("batch %s: step failed (retried next round)", batch_id)
                self._give_up_validating(tenant, batch_id)
        return len(members)

    def acquire(self) -> bool:
        ms = int(LEASE_S * 1000)
        return bool(self.redis.set(keys.JOBS_RUNNER, self.id, nx=True, px=ms)
                    or self._renew(keys=[keys.JOBS_RUNNER], args=[self.id, ms]))

    def release(self) -> None:
        self._release(keys=[keys.JOBS_RUNNER], args=[self.id])

    def _keep_lease(self, _n: int = 0) -> None:
        if not self.acquire():
            raise LockLost(f"runner {self.id} lost its lease")

    def _update(self, record: JobRecord, change) -> JobRecord:
        return update(self.redis, record.tenant, record.id, change, lock=(keys.JOBS_RUNNER, self.id))

    # -- one job ----------------------------------------------------------------------------------

    def step(self, tenant: str, batch_id: str) -> JobRecord | None:
        try:
            record = self.jobs.get(tenant, batch_id)
        except JobNotFound:
            self.redis.zrem(keys.JOBS_ACTIVE, f"{tenant}/{batch_id}")
            return None
        if record.status in TERMINAL:
            self.redis.zrem(keys.JOBS_ACTIVE, record.member)
            return record
        now = time.time()
        if record.status == "validating":
            if now >= record.expires_at:
                return self._finish(self._end_soon(record, "expired", from_status="validating"))
            record = self._validate(record)
            if record.status in ("validating", "failed"):
                return record
        if record.status == "in_progress":
            if now >= record.expires_at:
                record = self._end_soon(record, "expired", from_status="in_progress")
            else:
                record = self._feed(self._collect(record))
                if self._all_in(record):
                    record = self._end_soon(record, "completed", from_status="in_progress")
                if record.status == "in_progress":
                    return record
        return self._finish(record)

    def _end_soon(self, record: JobRecord, ending: str, *, from_status: str) -> JobRecord:
        def change(r: JobRecord, _pipe):
            if r.status != from_status:
                return None
            return r.model_copy(update={"status": "finalizing", "finalizing_at": int(time.time()), "ending": ending})

        return self._update(record, change)

    def _all_in(self, record: JobRecord) -> bool:
        if record.status != "in_progress" or record.fed < record.prepared:
            return False
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.scard(keys.job_open(record.id))
            pipe.llen(keys.job_finished(record.id))
            open_, finished = pipe.execute()
        return open_ == 0 and finished == 0

    # -- validating -------------------------------------------------------------------------------

    def served_model(self) -> ServedModel:
        if self._served is not None:
            return self._served
        if self._base is None:
            self._base = load_served_base(self.settings)
        return served_model(self.redis, self._base)

    def tokenizer(self):
        """The served base model's tokenizer: lines that ask for logprobs or echo need it for their output."""
        if self._served is not None:
            return self._served.tokenizer
        if self._base is None:
            self._base = load_served_base(self.settings)
        return self._base.tokenizer

    def _validate(self, record: JobRecord) -> JobRecord:
        try:
            served = self.served_model()
        except BaseModelMissing as exc:
            if record.id not in self._waiting:
                self._waiting.add(record.id)
                log.warning("batch %s waits in validating: %s", record.id, exc)
            return record
        self.store.delete_prefix(job_prefix(record.tenant, record.id))  # a half-done earlier try
        writer = ChunkWriter(self.store, record.tenant, record.id)
        try:
            result = validate_lines(self.files.iter_lines(record.tenant, record.input_file_id),
                                    endpoint=record.endpoint, tenant=record.tenant, batch_id=record.id,
                                    served=served, registry=self.registry, max_lines=self.settings.batch_max_lines,
                                    sink=writer.add, progress=self._keep_lease)
            writer.close()
            errors, error_count = result.errors, result.error_count
        except FileNotFound:
            errors = [{"code": "file_not_found", "message": f"the input file {record.input_file_id} was deleted "
                       "before the batch started", "param": "input_file_id", "line": None}]
            error_count = 1
        except StorageError as exc:  # a checksum mismatch: the whole file is suspect
            errors = [{"code": "file_unreadable", "message": f"the input file could not be read intact: {exc}",
                       "param": "input_file_id", "line": None}]
            error_count = 1
        if errors:
            if error_count > len(errors):
                errors = [*errors, {"code": "too_many_errors", "message": f"{error_count - len(errors)} more "
                                    "problems are not listed", "param": None, "line": None}]
            return self._fail(record, errors)

        models = sorted(result.models)

        def change(r: JobRecord, pipe):
            if r.status != "validating":
                return None  # cancelled meanwhile: _finish cleans up
            for i in range(0, len(result.refused), 1000):
                pipe.rpush(keys.job_errors(r.id), *result.refused[i:i + 1000])
            return r.model_copy(update={"status": "in_progress", "in_progress_at": int(time.time()),
                                        "total": result.total, "failed": len(result.refused),
                                        "prepared": result.prepared, "fed": 0,
                                        "model": models[0] if len(models) == 1 else None})

        new = self._update(record, change)
        log.info("batch %s: %d requests, %d refused, now %s", record.id, result.total, len(result.refused), new.status)
        return new

    def _give_up_validating(self, tenant: str, batch_id: str) -> None:
        """A validation that keeps raising is our bug, not the file's: after VALIDATION_ATTEMPTS the
        batch fails with a server error instead of retrying every round until it expires."""
        failures = self._validation_failures[batch_id] = self._validation_failures.get(batch_id, 0) + 1
        if failures < VALIDATION_ATTEMPTS:
            return
        record = self.jobs.get(tenant, batch_id)
        if record.status == "validating":
            self._fail(record, [{"code": "internal_error", "message": f"the server failed to validate this batch "
                                 f"{failures} times and logged why; retry it, or report it if it fails again",
                                 "param": None, "line": None}])
        self._validation_failures.pop(batch_id, None)

    def _fail(self, record: JobRecord, errors: list[dict]) -> JobRecord:
        self.store.delete_prefix(job_prefix(record.tenant, record.id))

        def change(r: JobRecord, pipe):
            if r.status != "validating":
                return None
            pipe.zrem(keys.JOBS_ACTIVE, r.member)
            return r.model_copy(update={"status": "failed", "failed_at": int(time.time()), "errors": errors})

        new = self._update(record, change)
        log.info("batch %s failed validation: %s", record.id, errors[0]["message"])
        return new

    # -- in progress ------------------------------------------------------------------------------

    def _feed(self, record: JobRecord) -> JobRecord:
        if record.status != "in_progress" or record.fed >= record.prepared:
            return record
        room = self.settings.batch_feed_window - self.redis.scard(keys.job_open(record.id))
        if room <= 0:
            return record
        now = time.time()  # queue age counts from feeding, not from validation
        requests = [r.model_copy(update={"created_at": now}) for r in self.prepared.read(record, record.fed, room)]

        def change(r: JobRecord, pipe):
            if r.status != "in_progress" or r.fed != record.fed:
                return None
            for req in requests:
                self._enqueue(args=enqueue_args(req, 0, 0), client=pipe)  # no cap: the window is the cap
            pipe.sadd(keys.job_open(r.id), *[req.id for req in requests])
            return r.model_copy(update={"fed": r.fed + len(requests)})

        return self._update(record, change)

    def _collect(self, record: JobRecord) -> JobRecord:
        finished = keys.job_finished(record.id)
        ids = [keys.text(i) for i in self.redis.lrange(finished, 0, COLLECT_CHUNK - 1)]
        if not ids:
            return record
        with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hmget(keys.request(rid), "spec", "result")
            pipe.smismember(keys.job_open(record.id), ids)
            *rows, members = pipe.execute()
        lines: dict[str, list[str]] = {"output": [], "errors": []}
        counts = {"completed": 0, "failed": 0, "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0}
        collected: dict[str, None] = {}
        for rid, (spec, result), member in zip(ids, rows, members):
            if not member or rid in collected:
                continue  # not (or no longer) open, or twice in this read: never write a line twice
            collected[rid] = None
            if spec is None or result is None:
                lines["errors"].append(unrun_line(None, "result_lost", f"the result of request {rid} expired from "
                                                  "Redis before it was collected"))
                counts["failed"] += 1
                continue
            spec, result = GenerationRequest.model_validate_json(spec), GenerationResult.model_validate_json(result)
            tokenizer = self.tokenizer() if needs_tokenizer(spec) else None
            where, line = classify(spec, result, record.kind, record.ending, tokenizer)
            if where is None:
                continue
            lines[where].append(line)
            counts["completed" if where == "output" else "failed"] += 1
            if where == "output":
                counts["input_tokens"] += result.prompt_tokens
                counts["cached_tokens"] += result.cached_tokens
                counts["output_tokens"] += result.completion_tokens

        def change(r: JobRecord, pipe):
            if r.status != record.status or r.ending != record.ending:
                return None  # cancelled meanwhile: classify again next round
            if lines["output"]:
                pipe.rpush(keys.job_output(r.id), *lines["output"])
            if lines["errors"]:
                pipe.rpush(keys.job_errors(r.id), *lines["errors"])
            pipe.ltrim(finished, len(ids), -1)
            if collected:
                pipe.srem(keys.job_open(r.id), *collected)
            return r.model_copy(update={k: getattr(r, k) + v for k, v in counts.items()})

        return self._update(record, change)

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, record: JobRecord) -> JobRecord:
        """cancelling / finalizing: wait for the open requests (cancelling them first unless the job
        completes), then write the files and end the job."""
        ending = record.ending or ("cancelled" if record.status == "cancelling" else "completed")
        if ending != "completed" and record.id not in self._cancel_sent:
            for rid in self.redis.smembers(keys.job_open(record.id)):
                self.queues.cancel(keys.text(rid))
            self._cancel_sent.add(record.id)
        record = self._collect(record)
        if self.redis.scard(keys.job_open(record.id)) or self.redis.llen(keys.job_finished(record.id)):
            return record  # cancelled requests that were running finish soon; collect them first

        unfed = record.prepared - record.fed if ending == "expired" else 0
        output_file_id = error_file_id = None
        if self.redis.llen(keys.job_output(record.id)):
            output_file_id = write_result_file(self.files, record.tenant, f"{record.id}_output.jsonl",
                                               iter_redis_list(self.redis, keys.job_output(record.id)))
        if self.redis.llen(keys.job_errors(record.id)) or unfed:
            lines = _chain(iter_redis_list(self.redis, keys.job_errors(record.id)), self._unfed_lines(record, unfed))
            error_file_id = write_result_file(self.files, record.tenant, f"{record.id}_error.jsonl", lines)
        self.store.delete_prefix(job_prefix(record.tenant, record.id))
        self.prepared.forget(record.id)

        def change(r: JobRecord, pipe):
            if r.status != record.status:
                return None
            pipe.zrem(keys.JOBS_ACTIVE, r.member)
            pipe.delete(keys.job_open(r.id), keys.job_output(r.id), keys.job_errors(r.id), keys.job_finished(r.id))
            return r.model_copy(update={"status": ending, f"{ending}_at": int(time.time()), "failed": r.failed + unfed,
                                        "output_file_id": output_file_id, "error_file_id": error_file_id})

        new = self._update(record, change)
        if new.status == ending:
            self._cancel_sent.discard(record.id)
            self._waiting.discard(record.id)
            log.info("batch %s %s: %d completed, %d failed", record.id, ending, new.completed, new.failed)
        return new

    def _unfed_lines(self, record: JobRecord, unfed: int):
        """batch_expired lines for the requests never fed, a chunk at a time."""
        pos, end = record.fed, record.fed + unfed
        while pos < end:
            requests = self.prepared.read(record, pos, min(PREPARED_CHUNK, end - pos))
            yield from (expired_line(req) for req in requests)
            pos += len(requests)


def _chain(*iterables):
    for it in iterables:
        yield from it
