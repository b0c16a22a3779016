"""The thin Celery tasks: (de)serialization and retries around plain functions.

The scheduler sends tasks by name and never imports the worker; the worker binds the name to its
own handler with `register_worker_tasks`.
"""

from __future__ import annotations

from typing import Callable

from celery import Celery

RUN_BATCH = "hotswap.run_batch"


def send_batch(app: Celery, queue: str, request_ids: list[str], worker_id: str) -> None:
    app.send_task(RUN_BATCH, args=[request_ids, worker_id], queue=queue, retry=True,
                  retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5})


def register_worker_tasks(app: Celery, on_batch: Callable[[list[str]], None]) -> None:
    """Bind `hotswap.run_batch` to `on_batch(request_ids)`, which claims and starts the requests."""
    import redis

    @app.task(name=RUN_BATCH, bind=True, acks_late=True, autoretry_for=(redis.ConnectionError,),
              max_retries=5, retry_backoff=True)
    def run_batch(self, request_ids: list[str], worker_id: str) -> None:
        on_batch(list(request_ids))
