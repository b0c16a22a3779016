"""The dispatcher loop (`hotswap scheduler`): snapshot queues and workers, ask the policy, take the
chosen requests atomically and send each batch to its worker's Celery queue; reap dead workers.

Several dispatchers may run at once (for availability): `Queues.take` is atomic, so they never
hand out the same request twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from hotswap.metrics import MetricsBuffer, record_finished
from hotswap import keys
from scheduler.policy import PolicyConfig, QueueView, WorkerView, next_check_s, plan
from scheduler.queues import Queues
from scheduler.tasks import send_batch
from scheduler.workers import WorkerInfo, live_workers, reap

log = logging.getLogger("hotswap.scheduler")



def policy_config(settings) -> PolicyConfig:
    return PolicyConfig(
        max_batch=settings.max_batch,
        realtime_window_s=settings.realtime_window_ms / 1000,
        batch_window_s=settings.batch_window_ms / 1000,
        realtime_boost_s=settings.realtime_boost_s,
        affinity_wait_s=settings.affinity_wait_s,
        swap_wait_s=settings.swap_wait_s,
        realtime_reserve=settings.realtime_reserve,
    )


def worker_view(w: WorkerInfo) -> WorkerView:
    return WorkerView(id=w.id, max_inflight=w.max_inflight, inflight=w.inflight, weights=w.weights,
                      holds=frozenset(w.holds), inflight_models=w.inflight_models, isolated=w.isolated,
                      draining=w.draining)


class Dispatcher:
    def __init__(self, redis_client, celery_app, settings):
        self.redis = redis_client
        self.celery = celery_app
        self.settings = settings
        self.queues = Queues(redis_client, result_ttl_s=settings.result_ttl_s)
        self.cfg = policy_config(settings)
        self._next_reap = 0.0
        self.stop_event = threading.Event()
        self.metrics = MetricsBuffer()
        self._last_taken: dict[str, float] = {}  # queue -> when it was last served (policy's idle_s)

    def reap(self) -> dict:
        s = self.settings
        return reap(self.redis, self.queues, max_attempts=s.max_attempts, isolate_after=min(2, s.max_attempts),
                    claim_timeout_s=s.claim_timeout_s, on_dead=self._record_dead)

    def _record_dead(self, request_id: str) -> None:
        """A dead-lettered request is an error of type dead_letter in /metrics, like any failed one."""
        spec, result = self.queues.spec(request_id), self.queues.result(request_id)
        if spec is not None and result is not None:
            record_finished(self.metrics, result, spec.target.key, spec.priority)

    def tick(self) -> float:
        """One round; returns how long to wait before the next unless woken."""
        now = time.time()
        if now >= self._next_reap:
            self.reap()
            self._next_reap = now + min(1.0, self.settings.lease_s / 4)
            self.redis.set(keys.SCHEDULER_ALIVE, now, px=int(self.settings.lease_s * 1000))
        workers = live_workers(self.redis)
        sleep = 0.5
        for base in sorted({w.base_model for w in workers}):
            stats = self.queues.stats(base)
            if not stats:
                continue
            views = [QueueView(s.name, s.model_key, s.qclass, s.length, max(0.0, now - s.oldest_score),
                               idle_s=now - self._last_taken[s.name] if s.name in self._last_taken else None)
                     for s in stats]
            mine = {w.id: w for w in workers if w.base_model == base}
            for a in plan(views, [worker_view(w) for w in mine.values()], self.cfg):
                self._dispatch(a.queue, mine[a.worker_id], a.count, a.isolate)
            sleep = min(sleep, next_check_s(views, self.cfg))
        self.metrics.flush(self.redis)
        return sleep

    def _dispatch(self, queue: str, worker: WorkerInfo, count: int, isolate: bool) -> None:
        ids = self.queues.take(queue, count, worker.id, worker.max_inflight, isolate=isolate)
        if not ids:
            return
        self._last_taken[queue] = time.time()
        try:
            send_batch(self.celery, worker.queue, ids, worker.id)
        except Exception:  # broker unreachable: give the requests back rather than strand them
            log.exception("could not send a batch to %s; requeueing %d requests", worker.id, len(ids))
            for rid in ids:
                self.queues.requeue(rid, worker.id, crashed=False)
            return
        _, qclass, model_key = keys.parse_queue(queue)
        self.metrics.observe("batch_size", len(ids), model=model_key, priority=qclass)
        entry = {"at": time.time(), "worker": worker.id, "queue": queue, "ids": ids}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.DISPATCH_LOG, json.dumps(entry))
            pipe.ltrim(keys.DISPATCH_LOG, 0, 999)
            pipe.execute()
        log.debug("dispatched %d from %s to %s", len(ids), queue, worker.id)

    def run(self) -> None:
        log.info("dispatcher running")
        while not self.stop_event.is_set():
            try:
                sleep = self.tick()
            except Exception:  # Redis hiccup: log, back off, go on; never die with work queued
                log.exception("dispatch round failed")
                sleep = 1.0
            if sleep > 0.001:
                try:
                    self.redis.blpop([keys.WAKE], timeout=max(0.01, sleep))
                except Exception:
                    time.sleep(sleep)

    def stop(self) -> None:
        self.stop_event.set()
