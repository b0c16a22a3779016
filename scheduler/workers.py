"""Worker registration, leases and the reaper.

A worker writes its `WorkerInfo` and renews a lease key (`PX lease_s`) every heartbeat. A worker
whose lease lapsed is dead to the scheduler: the reaper hands each of its requests back to its
queue (a running one counts as a crashed attempt), removes its registration and drops its Celery
queue. A worker that was only slow notices the lapsed lease on its next heartbeat and drops its
work, since nothing it records would be accepted any more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from hotswap import keys
from scheduler.queues import Queues

log = logging.getLogger("hotswap.scheduler")


class WorkerInfo(BaseModel):
    id: str
    base_model: str
    queue: str  # its Celery queue
    max_inflight: int
    max_model_len: int = 0  # longest prompt + output its engine takes
    weights: str = "base"  # the full weights resident: "base" or "full:tenant/name@v"
    holds: list[str] = Field(default_factory=list)  # LoRA model keys in its GPU slots or host tier
    draining: bool = False
    hostname: str = ""
    pid: int = 0
    device: str = ""
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)
    # Filled in by `live_workers` from Redis, not by the worker:
    inflight: int = 0
    inflight_models: dict[str, int] = Field(default_factory=dict)
    isolated: bool = False


def heartbeat(redis_client, info: WorkerInfo, lease_s: float, *, first: bool = False) -> bool:
    """Renew the lease and the registration. False when the lease had lapsed (we were reaped)."""
    info.heartbeat_at = time.time()
    ms = int(lease_s * 1000)
    with redis_client.pipeline() as pipe:
        pipe.set(keys.worker_alive(info.id), info.heartbeat_at, px=ms, nx=first, xx=not first)
        pipe.hset(keys.WORKERS, info.id, info.model_dump_json(exclude={"inflight", "inflight_models", "isolated"}))
        renewed, _ = pipe.execute()
    return bool(renewed)


def rejoin(redis_client, queues: Queues, info: WorkerInfo, lease_s: float) -> int:
    """Come back after a lapsed lease with a clean slate: hand back whatever Redis still lists as
    ours (the reaper may not have run yet; it runs no more for a live worker), then take a new lease.
    Returns how many requests went back to their queues."""
    returned = sum(queues.requeue(rid, info.id, crashed=False) == "requeued" for rid in queues.inflight(info.id))
    heartbeat(redis_client, info, lease_s, first=True)
    return returned


def deregister(redis_client, worker_id: str) -> None:
    redis_client.delete(keys.worker_alive(worker_id))
    redis_client.hdel(keys.WORKERS, worker_id)


def live_workers(redis_client, base_model: str | None = None) -> list[WorkerInfo]:
    """Registered workers whose lease holds, with their inflight counts (from Redis, not hearsay)."""
    raw = redis_client.hgetall(keys.WORKERS)
    infos = [WorkerInfo.model_validate_json(v) for v in raw.values()]
    infos = [w for w in infos if base_model is None or w.base_model == base_model]
    if not infos:
        return []
    with redis_client.pipeline(transaction=False) as pipe:
        for w in infos:
            pipe.exists(keys.worker_alive(w.id))
            pipe.scard(keys.worker_inflight(w.id))
            pipe.hgetall(keys.worker_models(w.id))
            pipe.exists(keys.worker_isolated(w.id))
        raw = pipe.execute()
    out = []
    for i, w in enumerate(infos):
        alive, inflight, models, isolated = raw[4 * i: 4 * i + 4]
        if not alive:
            continue
        w.inflight = int(inflight)
        w.inflight_models = {keys.text(k): int(v) for k, v in models.items() if int(v) > 0}
        w.isolated = bool(isolated)
        out.append(w)
    return out


def reap(redis_client, queues: Queues, *, max_attempts: int, isolate_after: int, claim_timeout_s: float,
         on_dead: Callable[[str], None] | None = None) -> dict:
    """Requeue the work of workers whose lease lapsed, and dispatched requests nobody claimed;
    `on_dead(request_id)` is called for each request this dead-lettered."""
    counts = {"requeued": 0, "dead": 0, "cancelled": 0, "workers": 0}
    for raw_id in redis_client.hkeys(keys.WORKERS):
        wid = keys.text(raw_id)
        if redis_client.exists(keys.worker_alive(wid)):
            continue
        info = redis_client.hget(keys.WORKERS, wid)
        for rid in queues.inflight(wid):
            outcome = queues.requeue(rid, wid, crashed=True, max_attempts=max_attempts, isolate_after=isolate_after)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "dead" and on_dead is not None:
                on_dead(rid)
        queue = WorkerInfo.model_validate_json(info).queue if info else None
        redis_client.delete(keys.worker_inflight(wid), keys.worker_models(wid), keys.worker_cancels(wid),
                            keys.worker_isolated(wid), *([queue] if queue else []))
        redis_client.hdel(keys.WORKERS, wid)
        counts["workers"] += 1
        log.warning("worker %s lost its lease: its requests went back to their queues (%s)", wid, counts)
    for rid, wid in queues.stale_assignments(claim_timeout_s):
        outcome = queues.requeue(rid, wid, crashed=False, max_attempts=max_attempts, isolate_after=isolate_after)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts

