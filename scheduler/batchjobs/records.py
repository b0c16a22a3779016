"""Batch jobs (the OpenAI Batch API): records in Redis, and what the API does to them.

A job goes validating -> in_progress -> finalizing -> completed, or ends failed (its file did not
pass validation), cancelled (cancelling first) or expired. The API creates and cancels jobs
(`JobStore`); everything else is the `JobRunner` (scheduler/batchjobs/runner.py), run by `hotswap
scheduler`. Every change of a record is a check-and-set (WATCH + MULTI), so the API's cancel and
the runner's progress never overwrite each other.

    Redis: the job keys in hotswap/keys.py (hotswap:jobs:*, hotswap:job:{batch}:*)
    tenants/{tenant}/batches/{batch}/prepared/{k:06d}.jsonl
                                   (object storage) the validated requests, GenerationRequest JSON
                                   one a line, PREPARED_CHUNK lines an object; fed from a cursor

What goes where when a line is wrong (the same rule everywhere):
- The *envelope* of a line is the file's business: not JSON / not an object, custom_id missing,
  not a string or used twice, method not POST, url not the batch's endpoint, body missing or not
  an object, a key other than custom_id/method/url/body. Also an empty file and a file over
  HOTSWAP_BATCH_MAX_LINES requests. Any of these fails the whole batch (status "failed") with
  `errors.data` = [{code, message, param, line}] (line numbers are 1-based lines of the file; at
  most 100 are listed), and nothing runs: as OpenAI does with a malformed batch file.
- The *body* is judged exactly like the same body sent to the live endpoint (the same pydantic
  models, then `scheduler.prepare.build_request`): bad or unsupported parameters, stream=true,
  an unknown model (404), a prompt over the context length (400). Such a line does not run and
  goes to the error file with the response the live API would have given, while the other lines
  run: {"id", "custom_id", "response": {"status_code": 400|404, "request_id": null, "body":
  {"error": {...the OpenAI error envelope...}}}, "error": {"code", "message"}}. This is how
  OpenAI reports per-request API errors (a response line with a 4xx), so one bad request among
  50,000 never costs the other 49,999. Lines may name different models.
- A request that fails on a worker (a model that cannot be loaded, a crash dead-letter) goes to
  the error file the same way with status 503/500.
- Cancelled batches (OpenAI's behaviour): lines already finished keep their results in the output
  and error files; lines cancelled or never started go nowhere and are not counted.
- Expired batches (OpenAI's behaviour): finished lines keep their results; every line that did
  not finish in time goes to the error file as {"response": null, "error": {"code":
  "batch_expired", ...}} and counts as failed.

request_counts: total = non-blank lines of the file (0 for a failed batch), completed = lines in
the output file, failed = lines in the error file.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

import redis as redis_lib
from pydantic import BaseModel

from hotswap import keys
from hotswap.errors import NotFound

__all__ = ["ENDPOINTS", "JobNotFound", "JobRecord", "JobStateError", "JobStore", "TERMINAL",
           "PREPARED_CHUNK", "job_prefix", "new_batch_id", "prepared_key"]

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
TERMINAL = ("failed", "completed", "expired", "cancelled")
MAX_METADATA = 16

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]


PREPARED_CHUNK = 1000  # validated requests per prepared object


def job_prefix(tenant: str, batch_id: str) -> str:
    """Object-storage prefix of a job's internal objects (deleted when the job ends)."""
    return f"tenants/{tenant}/batches/{batch_id}/"


def prepared_key(tenant: str, batch_id: str, chunk: int) -> str:
    return f"{job_prefix(tenant, batch_id)}prepared/{chunk:06d}.jsonl"


def new_batch_id(now_us: int | None = None) -> str:
    """"batch_" + 24 hex digits, time-ordered like file ids (13 of microseconds, 11 random)."""
    now_us = time.time_ns() // 1000 if now_us is None else now_us
    return f"batch_{now_us:013x}{secrets.token_hex(6)[:11]}"


class JobNotFound(NotFound):
    """No such batch for this tenant."""


class JobStateError(ValueError):
    """The job is not in a state that allows this (e.g. cancelling a completed batch)."""


class JobRecord(BaseModel):
    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: Status = "validating"
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None  # errors.data: [{code, message, param, line}]
    metadata: dict[str, str] | None = None
    model: str | None = None  # set when every request names the same model
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens, those served from the engines' prefix caches
    output_tokens: int = 0
    # Internal (never shown): how the job ends once its open requests are in, and the feed cursor.
    ending: Literal["completed", "cancelled", "expired"] | None = None
    prepared: int = 0  # validated lines that become requests (lines of prepared.jsonl)
    fed: int = 0  # how many of them were queued (the cursor into prepared.jsonl)

    @property
    def kind(self) -> str:
        return ENDPOINTS[self.endpoint]

    @property
    def member(self) -> str:
        return f"{self.tenant}/{self.id}"

    def to_openai(self) -> dict:
        """The public Batch object."""
        body = self.model_dump(include={
            "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
            "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at", "metadata", "model"})
        body["object"] = "batch"
        body["errors"] = {"object": "list", "data": self.errors} if self.errors else None
        body["request_counts"] = {"total": self.total, "completed": self.completed, "failed": self.failed}
        body["usage"] = {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                         "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": self.input_tokens + self.output_tokens}
        return body



def check_metadata(metadata: dict | None) -> dict[str, str] | None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512, all strings."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object of string keys and values")
    if len(metadata) > MAX_METADATA:
        raise ValueError(f"metadata has {len(metadata)} pairs; at most {MAX_METADATA} are allowed")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("metadata keys and values must be strings")
        if len(k) > 64:
            raise ValueError(f"metadata key {k[:20]!r}... is longer than 64 characters")
        if len(v) > 512:
            raise ValueError(f"metadata value of {k!r} is longer than 512 characters")
    return dict(metadata)


class JobStore:
    """Job records per tenant. A tenant never reaches another's job: it is not in its hash."""

    def __init__(self, redis_client, *, window_s: float = 86400):
        self.redis = redis_client
        self.window_s = window_s

    def get(self, tenant: str, batch_id: str) -> JobRecord:
        raw = self.redis.hget(keys.job_records(tenant), batch_id) if batch_id.startswith("batch_") else None
        if raw is None:
            raise JobNotFound(f"No such Batch object: {batch_id}")
        return JobRecord.model_validate_json(raw)

    def list(self, tenant: str, limit: int = 20, after: str | None = None) -> list[JobRecord]:
        """Newest first; `after` (an id) starts just past that job."""
        ids = sorted((keys.text(i) for i in self.redis.hkeys(keys.job_records(tenant))), reverse=True)
        ids = [i for i in ids if after is None or i < after][:max(limit, 0)]
        raws = self.redis.hmget(keys.job_records(tenant), ids) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r is not None]

    def create(self, tenant: str, input_file_id: str, endpoint: str, metadata: dict | None = None,
               window_s: float | None = None) -> JobRecord:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        now_us = time.time_ns() // 1000
        created = now_us // 1_000_000
        window = self.window_s if window_s is None else window_s
        record = JobRecord(id=new_batch_id(now_us), tenant=tenant, endpoint=endpoint, input_file_id=input_file_id,
                           created_at=created, expires_at=int(created + window), metadata=check_metadata(metadata))
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.job_records(tenant), record.id, record.model_dump_json())
            pipe.zadd(keys.JOBS_ACTIVE, {record.member: now_us / 1e6})
            pipe.execute()
        return record

    def cancel(self, tenant: str, batch_id: str) -> JobRecord:
        """validating / in_progress -> cancelling (the runner finishes the job); a job already
        cancelling or cancelled is returned as it is; a finished one raises JobStateError."""

        def change(record: JobRecord, _pipe) -> JobRecord | None:
            if record.status in ("cancelling", "cancelled"):
                return None
            if record.status not in ("validating", "in_progress"):
                raise JobStateError(f"Cannot cancel a batch with status '{record.status}'")
            return record.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time()),
                                             "ending": "cancelled"})

        return update(self.redis, tenant, batch_id, change)


def update(redis_client, tenant: str, batch_id: str, change, *, lock: tuple[str, str] | None = None,
           retries: int = 50) -> JobRecord:
    """Check-and-set one record: `change(record, pipe)` returns the new record (it may queue more
    commands on `pipe`, which is in MULTI by then) or None to leave it as it is. With `lock`
    (key, owner), nothing is written unless `owner` still holds the lease (a runner that stalled
    past its lease cannot overwrite what its successor did). Raises JobNotFound, or LockLost."""
    hash_key = keys.job_records(tenant)
    with redis_client.pipeline() as pipe:
        for _ in range(retries):
            try:
                pipe.watch(hash_key, *([lock[0]] if lock else []))
                if lock and keys.text(pipe.get(lock[0]) or b"") != lock[1]:
                    raise LockLost(f"the job runner lease moved away from {lock[1]}")
                raw = pipe.hget(hash_key, batch_id)
                if raw is None:
                    raise JobNotFound(f"No such Batch object: {batch_id}")
                record = JobRecord.model_validate_json(raw)
                pipe.multi()
                new = change(record, pipe)
                if new is None:
                    pipe.reset()
                    return record
                pipe.hset(hash_key, batch_id, new.model_dump_json())
                pipe.execute()
                return new
            except redis_lib.WatchError:
                continue
    raise RuntimeError(f"could not update {batch_id}: too much contention")


class LockLost(Exception):
    """This runner no longer holds the job runner lease."""
