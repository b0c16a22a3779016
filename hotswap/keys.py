"""Every Redis key of hotswap, in one place (the Lua scripts in scheduler/lua.py build the same
names from PREFIX inside Redis).

    hotswap:req:{id}              HASH   spec (GenerationRequest JSON), state, attempts, worker, queue,
                                         qclass, model_key, score, tenant, cancel, result ...
    hotswap:out:{id}              STREAM token events; the last entry carries `result`
    hotswap:q:{base}:{qclass}:{model_key}
                                  ZSET   queued request ids, scored by first enqueue time (a requeued
                                         request keeps its place at the front)
    hotswap:qidx:{base}           SET    names of that base's non-empty queues
    hotswap:waiting:{qclass}[:{tenant}]
                                  STRING queued-request counters (the backpressure caps)
    hotswap:workers               HASH   worker id -> WorkerInfo JSON (its registration)
    hotswap:w:{wid}:alive         STRING the worker's lease: expires unless heartbeats renew it
    hotswap:w:{wid}:inflight      SET    ids assigned to or running on the worker
    hotswap:w:{wid}:models        HASH   model_key -> number of inflight requests for it
    hotswap:w:{wid}:cancels       LIST   ids the worker must abort
    hotswap:w:{wid}:isolated      STRING id of a suspect request the worker runs alone
    hotswap:assigned              ZSET   ids dispatched but not yet claimed, by dispatch time
    hotswap:dead                  ZSET   dead-lettered ids, by time
    hotswap:wake                  LIST   nudges the dispatcher when work or room appears
    hotswap:jobs:{tenant}         HASH   batch id -> JobRecord JSON (one tenant's jobs: isolation by key)
    hotswap:jobs:active           ZSET   "tenant/batch id" of unfinished jobs, by creation time
    hotswap:jobs:runner           STRING id of the runner that works on jobs now (a lease; one at a time)
    hotswap:job:{batch}:open      SET    ids of the job's requests fed to the queues, not yet collected
    hotswap:job:{batch}:finished  LIST   ids of its finished requests (RPUSHed once each, by the queues)
    hotswap:job:{batch}:output    LIST   output.jsonl lines collected so far
    hotswap:job:{batch}:errors    LIST   errors.jsonl lines collected so far
    hotswap:scheduler:alive       STRING the scheduler's heartbeat (expires unless renewed)
    hotswap:dispatch_log          LIST   the latest dispatched batches (JSON), newest first
    hotswap:apikeys               HASH   sha256 of an API key -> {"tenant"} JSON
    hotswap:files:{tenant}        HASH   file id -> FileRecord JSON (one tenant's files)
    hotswap:reg:...               the adapter registry (adapters/registry.py: names, versions)
    hotswap:metrics:...           counters and histograms the processes flush (hotswap/metrics.py)

qclass is "realtime", "batch", or "suspect" (a request whose runs crashed a worker more than once
is run alone, so the next crash is blamed on it and not on its neighbours).
"""

from __future__ import annotations

PREFIX = "hotswap:"
QCLASSES = ("realtime", "batch", "suspect")

WORKERS = PREFIX + "workers"
ASSIGNED = PREFIX + "assigned"
DEAD = PREFIX + "dead"
WAKE = PREFIX + "wake"
JOBS_ACTIVE = PREFIX + "jobs:active"
JOBS_RUNNER = PREFIX + "jobs:runner"
SCHEDULER_ALIVE = PREFIX + "scheduler:alive"
DISPATCH_LOG = PREFIX + "dispatch_log"
API_KEYS = PREFIX + "apikeys"
REGISTRY = PREFIX + "reg"
METRICS = PREFIX + "metrics:"


def request(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}"


def output(request_id: str) -> str:
    return f"{PREFIX}out:{request_id}"


def queue(base_model: str, qclass: str, model_key: str) -> str:
    return f"{PREFIX}q:{base_model}:{qclass}:{model_key}"


def parse_queue(name: str) -> tuple[str, str, str]:
    """`queue()` backwards: (base_model, qclass, model_key). Base names never contain ':'."""
    base, qclass, model_key = name[len(PREFIX) + 2:].split(":", 2)
    return base, qclass, model_key


def queue_index(base_model: str) -> str:
    return f"{PREFIX}qidx:{base_model}"


def waiting(qclass: str, tenant: str | None = None) -> str:
    return f"{PREFIX}waiting:{qclass}" + (f":{tenant}" if tenant else "")


def worker_alive(worker_id: str) -> str:
    return f"{PREFIX}w:{worker_id}:alive"


def worker_inflight(worker_id: str) -> str:
    return f"{PREFIX}w:{worker_id}:inflight"


def worker_models(worker_id: str) -> str:
    return f"{PREFIX}w:{worker_id}:models"


def worker_cancels(worker_id: str) -> str:
    return f"{PREFIX}w:{worker_id}:cancels"


def worker_isolated(worker_id: str) -> str:
    return f"{PREFIX}w:{worker_id}:isolated"


def job_records(tenant: str) -> str:
    return f"{PREFIX}jobs:{tenant}"


def job_open(batch_id: str) -> str:
    return f"{PREFIX}job:{batch_id}:open"


def job_finished(batch_id: str) -> str:
    return f"{PREFIX}job:{batch_id}:finished"


def job_output(batch_id: str) -> str:
    return f"{PREFIX}job:{batch_id}:output"


def job_errors(batch_id: str) -> str:
    return f"{PREFIX}job:{batch_id}:errors"


def files(tenant: str) -> str:
    return f"{PREFIX}files:{tenant}"


def text(value) -> str:
    """A Redis reply (bytes, or str when decode_responses is on) as str."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def celery_queue(base_model: str, worker_id: str) -> str:
    """The Celery queue one worker consumes (explicit: per base model and per worker)."""
    return f"hotswap.{base_model}.{worker_id}"
