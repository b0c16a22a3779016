"""`hotswap scheduler`: the dispatcher loop (and, with it, the reaper) until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("hotswap.scheduler")


def run_scheduler(settings) -> None:
    import redis

    from scheduler.celery_app import make_celery
    from scheduler.dispatcher import Dispatcher

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=30)
    dispatcher = Dispatcher(client, make_celery(settings.redis_url), settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: dispatcher.stop())
    dispatcher.run()
    log.info("scheduler stopped")
