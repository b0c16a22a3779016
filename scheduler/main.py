"""`hotswap scheduler`: the dispatcher loop (and, with it, the reaper) and the batch job runner
(a thread beside it) until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("hotswap.scheduler")


def run_scheduler(settings) -> None:
    import redis

    from scheduler.celery_app import make_celery
    from scheduler.dispatcher import Dispatcher
    from scheduler.batchjobs.runner import JobRunner

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=30)
    dispatcher = Dispatcher(client, make_celery(settings.redis_url), settings)
    jobs = JobRunner.from_settings(client, settings)  # redis-py clients are thread-safe (a pool)
    jobs_thread = threading.Thread(target=jobs.run, name="hotswap-jobs", daemon=True)

    def stop(*_):
        dispatcher.stop()
        jobs.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    jobs_thread.start()
    try:
        dispatcher.run()
    finally:
        jobs.stop()
        jobs_thread.join(timeout=30)
    log.info("scheduler stopped")
