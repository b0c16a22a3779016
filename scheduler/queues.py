"""Per-model request queues in Redis and every state change of a request (atomic, via `scheduler.lua`).

Used by the API (submit, cancel, read results), the dispatcher (stats, take, reap) and the
workers (claim, complete, release). Plain synchronous redis-py; the async API wraps the same
scripts in `scheduler/client.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hotswap.protocol import GenerationRequest, GenerationResult
from hotswap import keys
from scheduler import lua

DEFAULT_RESULT_TTL_S = 24 * 3600


class QueueFull(Exception):
    """A backpressure cap was hit; the API answers 429 with Retry-After."""

    def __init__(self, message: str, scope: str):
        super().__init__(message)
        self.scope = scope  # "global" | "tenant"


@dataclass(frozen=True)
class QueueStat:
    name: str  # the queue's Redis key
    base_model: str
    qclass: str
    model_key: str
    length: int
    oldest_score: float  # enqueue time of its oldest request



class Queues:
    def __init__(self, redis_client, *, result_ttl_s: int = DEFAULT_RESULT_TTL_S):
        self.redis = redis_client
        self.ttl = result_ttl_s
        self._enqueue = redis_client.register_script(lua.ENQUEUE)
        self._take = redis_client.register_script(lua.TAKE)
        self._claim = redis_client.register_script(lua.CLAIM)
        self._complete = redis_client.register_script(lua.COMPLETE)
        self._requeue = redis_client.register_script(lua.REQUEUE)
        self._cancel = redis_client.register_script(lua.CANCEL)

    # -- API side ---------------------------------------------------------------------------------

    def submit(self, req: GenerationRequest, *, cap: int = 0, tenant_cap: int = 0) -> None:
        """Queue `req` at its priority. Caps of 0 mean unbounded. Raises QueueFull."""
        check_enqueued(self._enqueue(args=enqueue_args(req, cap, tenant_cap)), req, cap, tenant_cap)

    def cancel(self, request_id: str, tenant: str | None = None) -> str:
        """'cancelled' (it was not running), 'cancelling' (its worker will abort it), 'unknown', or the
        state it already finished in ('done', 'failed', 'cancelled')."""
        return keys.text(self._cancel(args=[request_id, tenant or "", self.ttl, time.time()]))

    def state(self, request_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(keys.request(request_id))
        return {keys.text(k): keys.text(v) for k, v in raw.items() if keys.text(k) != "spec"}

    def spec(self, request_id: str) -> GenerationRequest | None:
        raw = self.redis.hget(keys.request(request_id), "spec")
        return GenerationRequest.model_validate_json(raw) if raw else None

    def result(self, request_id: str) -> GenerationResult | None:
        raw = self.redis.hget(keys.request(request_id), "result")
        return GenerationResult.model_validate_json(raw) if raw else None

    def waiting(self, qclass: str, tenant: str | None = None) -> int:
        return int(self.redis.get(keys.waiting(qclass, tenant)) or 0)

    # -- dispatcher side --------------------------------------------------------------------------

    def stats(self, base_model: str) -> list[QueueStat]:
        names = sorted(keys.text(n) for n in self.redis.smembers(keys.queue_index(base_model)))
        if not names:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcard(name)
                pipe.zrange(name, 0, 0, withscores=True)
            raw = pipe.execute()
        out = []
        for i, name in enumerate(names):
            length, head = raw[2 * i], raw[2 * i + 1]
            if length and head:
                base, qclass, model_key = keys.parse_queue(name)
                out.append(QueueStat(name, base, qclass, model_key, int(length), float(head[0][1])))
        return out

    def take(self, queue_name: str, n: int, worker_id: str, max_inflight: int, *, isolate: bool = False) -> list[str]:
        """Atomically move up to `n` of the queue's oldest requests to `worker_id` (never more than
        the worker's free room, never to a worker whose lease has lapsed)."""
        ids = self._take(args=[queue_name, n, worker_id, max_inflight, int(isolate), time.time()])
        return [keys.text(i) for i in ids]

    def requeue(self, request_id: str, worker_id: str, *, crashed: bool, max_attempts: int = 3,
                isolate_after: int = 2) -> str:
        """'requeued' | 'dead' | 'cancelled' | 'skip' (not that worker's any more)."""
        return keys.text(self._requeue(args=[request_id, worker_id, int(crashed), max_attempts, isolate_after,
                                         self.ttl, time.time()]))

    def stale_assignments(self, older_than_s: float) -> list[tuple[str, str]]:
        """(request id, worker id) of requests dispatched but never claimed (a lost Celery message)."""
        ids = [keys.text(i) for i in self.redis.zrangebyscore(keys.ASSIGNED, "-inf", time.time() - older_than_s)]
        with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hget(keys.request(rid), "worker")
            workers = pipe.execute()
        return [(rid, keys.text(w)) for rid, w in zip(ids, workers) if w]

    # -- worker side ------------------------------------------------------------------------------

    def claim(self, request_id: str, worker_id: str) -> tuple[GenerationRequest, int] | None:
        """The request and its attempt number if it is still assigned to `worker_id`, else None
        (already finished, cancelled, or given to another worker: a redelivered message)."""
        got = self._claim(args=[request_id, worker_id, time.time()])
        if not got:
            return None
        return GenerationRequest.model_validate_json(got[0]), int(got[1])

    def complete(self, result: GenerationResult, worker_id: str, attempt: int) -> bool:
        """Record the result once; False if this worker no longer owns the request (nothing written)."""
        state = {"completed": "done", "failed": "failed", "cancelled": "cancelled"}[result.status]
        return bool(self._complete(args=[result.id, worker_id, attempt, state, result.model_dump_json(), self.ttl]))

    def inflight(self, worker_id: str) -> set[str]:
        return {keys.text(i) for i in self.redis.smembers(keys.worker_inflight(worker_id))}

    def pop_cancels(self, worker_id: str) -> list[str]:
        with self.redis.pipeline() as pipe:
            pipe.lrange(keys.worker_cancels(worker_id), 0, -1)
            pipe.delete(keys.worker_cancels(worker_id))
            ids, _ = pipe.execute()
        return [keys.text(i) for i in ids]


def enqueue_args(req: GenerationRequest, cap: int, tenant_cap: int) -> list:
    return [req.id, req.model_dump_json(), req.base_model, req.target.key, req.priority, repr(req.created_at),
            req.tenant, req.batch_id or "", cap, tenant_cap]


def check_enqueued(answer, req: GenerationRequest, cap: int, tenant_cap: int) -> None:
    answer = keys.text(answer)
    if answer == "full":
        raise QueueFull(f"the server's {req.priority} queue is full ({cap} waiting requests)", "global")
    if answer == "full_tenant":
        raise QueueFull(f"tenant {req.tenant!r} has {tenant_cap} {req.priority} requests waiting, the most allowed",
                        "tenant")
    if answer == "exists":
        raise ValueError(f"request id {req.id!r} already exists")
